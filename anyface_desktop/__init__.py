"""AnyFace Desktop: the PySide6 GUI (``app``) and the Qt-free command line (``cli``)."""

from core import __version__

__all__ = ["__version__"]
