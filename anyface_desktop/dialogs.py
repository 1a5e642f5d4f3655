"""Small dialogs shared by the GUI."""

from __future__ import annotations

import traceback

from PySide6.QtWidgets import QMessageBox, QWidget

from core.errors import AnyFaceError


def show_error(parent: QWidget | None, exc: BaseException, detail: str | None = None) -> None:
    """A message box with the short text and the traceback as detail (never raises)."""
    title = getattr(exc, "title", "Error") if isinstance(exc, AnyFaceError) else "Unexpected error"
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning if isinstance(exc, AnyFaceError) else QMessageBox.Icon.Critical)
    box.setWindowTitle(title)
    short = str(exc).split("\n")[0] or type(exc).__name__
    box.setText(short)
    rest = str(exc).split("\n", 1)
    if len(rest) > 1:
        box.setInformativeText(rest[1][:2000])
    box.setDetailedText(detail or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    box.open()
