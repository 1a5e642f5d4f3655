"""Main window of AnyFace Desktop."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QMainWindow, QVBoxLayout, QWidget

from core import weights


class MainWindow(QMainWindow):
    def __init__(self, pack: str | None = None, device: str | None = None):
        super().__init__()
        self.setWindowTitle("AnyFace Desktop")
        self.resize(1200, 800)
        self.pack_id = pack or "tiny"
        self.device_pref = device
        central = QWidget()
        lay = QVBoxLayout(central)
        self.empty_label = QLabel(self._empty_text())
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        lay.addWidget(self.empty_label)
        self.setCentralWidget(central)

    def _empty_text(self) -> str:
        usable = weights.usable_packs()
        if self.pack_id in usable:
            return "Open a photo (Ctrl+O) or type captions to generate faces."
        return (f"No usable model pack yet ('{self.pack_id}' is missing files).\n"
                "Build the bundled pack with `make pack`, or import the official files in Models.")

    def open_photo(self, path: str) -> None:
        self.empty_label.setText(f"Opened {path}")
