"""Builds the bundled weight files (the offline "tiny" pack) and trains text-to-latent models.

training/ imports core; core never imports training.
"""
