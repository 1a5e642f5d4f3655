"""AnyFace core: torch/numpy/image code only (no Qt, no training imports).

Public entry points live in their own modules: ``core.stylegan2``, ``core.clip``, ``core.cmd``,
``core.cvae``, ``core.latent_bank``, ``core.engine``, ``core.align``, ``core.inversion``,
``core.io``, ``core.batch``, ``core.weights``, ``core.device``, ``core.errors``.
"""

__version__ = "0.1.0"
