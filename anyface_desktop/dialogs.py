"""Small dialogs shared by the GUI."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QMessageBox, QPushButton, QSpinBox, QWidget)

from core.errors import AnyFaceError

log = logging.getLogger("anyface.gui")


def show_error(parent: QWidget | None, exc: BaseException, detail: str | None = None) -> QMessageBox:
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
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    _open_boxes.append(box)
    box.finished.connect(lambda *_: _open_boxes.remove(box) if box in _open_boxes else None)
    log.warning("%s: %s", title, short)
    box.open()
    return box


_open_boxes: list = []


def open_error_boxes() -> list:
    """Error boxes currently shown (tests look at these)."""
    return list(_open_boxes)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class BankDialog(QDialog):
    """Build KNN bank: how many faces (disk size estimate shown). The build runs on the worker with progress."""

    def __init__(self, pack_id: str, bytes_per_entry: int, save_dir: str, parent: QWidget | None = None, *,
                 sizes: tuple[int, int, int] = (2000, 200000, 20000), current: int = 0):
        super().__init__(parent)
        self.setWindowTitle("Build KNN bank")
        self.bytes_per_entry = int(bytes_per_entry)
        form = QFormLayout(self)
        intro = QLabel(f"The <b>KNN latent bank</b> lets pack <b>{pack_id}</b> make faces from text with no trained "
                       "model: it samples faces from the generator once and indexes them with CLIP. "
                       "More faces: better matches, a longer build.")
        intro.setWordWrap(True)
        form.addRow(intro)
        lo, hi, default = sizes
        self.size = QSpinBox()
        self.size.setRange(int(lo), int(hi))
        self.size.setSingleStep(1000 if hi - lo >= 10000 else 1)
        self.size.setGroupSeparatorShown(True)
        self.size.setSuffix(" faces")
        self.size.setValue(int(default))
        self.size.valueChanged.connect(self._update_estimate)
        self.estimate = QLabel()
        form.addRow("Bank size:", self.size)
        form.addRow("On disk:", self.estimate)
        where = QLabel(f"Saved in {save_dir}"
                       + (f"; it replaces the bank of {current:,} faces in use, now and at later starts (delete the "
                          "file to go back to the pack's own bank)." if current else "."))
        where.setWordWrap(True)
        where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(where)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Build")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.setMinimumWidth(460)
        self._update_estimate()

    def _update_estimate(self) -> None:
        n = self.size.value()
        self.estimate.setText(f"≈ {human_bytes(n * self.bytes_per_entry)}" if self.bytes_per_entry else "unknown")

    def value(self) -> int:
        return int(self.size.value())


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")


class ExportDialog(QDialog):
    """Export As: file, format, size, quality, latent alongside."""

    def __init__(self, settings, suggested_path: str, native_size: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export")
        self.setMinimumWidth(560)
        self.settings = settings
        form = QFormLayout(self)
        self.path = QLineEdit(suggested_path)
        self.path.editingFinished.connect(self._typed)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        self.fmt = QComboBox()
        for key, label in (("png", "PNG (lossless)"), ("jpg", "JPEG"), ("webp", "WebP")):
            self.fmt.addItem(label, key)
        stored = settings.export_options()
        self.fmt.setCurrentIndex(max(0, self.fmt.findData(stored["fmt"])))
        self.fmt.currentIndexChanged.connect(self._fmt_changed)
        self.size = QSpinBox()
        self.size.setRange(0, 8192)
        self.size.setSpecialValueText(f"As is ({native_size} px)")
        self.size.setSuffix(" px (longest side)")
        self.size.setValue(stored["size"])
        self.quality = QSpinBox()
        self.quality.setRange(1, 100)
        self.quality.setValue(stored["quality"])
        self.latent = QCheckBox("Save the latent (.npz) alongside")
        self.latent.setChecked(stored["save_latent"])
        note = QLabel("The file is tagged “made/edited with AnyFace Desktop” with the prompt and model pack.")
        note.setWordWrap(True)
        form.addRow("File:", row)
        form.addRow("Format:", self.fmt)
        form.addRow("Size:", self.size)
        form.addRow("Quality:", self.quality)
        form.addRow("", self.latent)
        form.addRow(note)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self._typed()  # a suggested name with its own type (a failed export's, offered again) keeps it
        self._fmt_changed()

    def _fmt_changed(self) -> None:
        key = self.fmt.currentData()
        self.quality.setEnabled(key != "png")
        text = self.path.text()
        if not text.strip():
            return
        p = Path(text)
        if p.suffix.lower().lstrip(".") not in (key, "jpeg" if key == "jpg" else key):
            # an image suffix is replaced; anything else ("John.Smith v1.2") is part of the name
            self.path.setText(str(p.with_suffix("." + key) if p.suffix.lower() in _IMAGE_SUFFIXES
                                  else p.with_name(p.name + "." + key)))

    def _typed(self) -> None:
        """A typed name's suffix picks the format ("face.JPG" is a JPEG), as Browse… does."""
        suf = Path(self.path.text().strip()).suffix.lower().lstrip(".")
        i = self.fmt.findData("jpg" if suf == "jpeg" else suf)
        if i >= 0 and i != self.fmt.currentIndex():
            self.fmt.setCurrentIndex(i)

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export", self.path.text(),
                                              "Images (*.png *.jpg *.jpeg *.webp)")
        if path:
            self.path.setText(path)
            self._confirmed = str(Path(path))  # the file dialog has asked about replacing it
            suf = Path(path).suffix.lower().lstrip(".")
            i = self.fmt.findData("jpg" if suf == "jpeg" else suf)
            if i >= 0:
                self.fmt.setCurrentIndex(i)

    def accept(self) -> None:
        """Save, unless the name is empty or names an existing file the user does not want replaced (a name picked
        with Browse… was asked about there)."""
        text = self.path.text().strip()
        if not text or not Path(text).name:
            QMessageBox.warning(self, "Export", "Choose a file name to export to.")
            return
        self._typed()
        suf = Path(text).suffix.lower()
        if suf in _IMAGE_SUFFIXES and suf.lstrip(".") not in ("png", "jpg", "jpeg", "webp"):
            QMessageBox.warning(self, "Export", f"This app exports PNG, JPEG or WebP, not {suf.lstrip('.').upper()}. "
                                "Change the name's ending, or pick a format.")
            return
        path = self._target()
        if path.is_dir():
            QMessageBox.warning(self, "Export", f"{path} is a folder. Add a file name, e.g. {path / 'face.png'}.")
            return
        try:
            under = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        except OSError:  # a folder above cannot be entered: the export says so
            under = None
        if under is not None:
            QMessageBox.warning(self, "Export", f"{path} lies under {under}, which is a file, not a folder. "
                                "Choose another folder.")
            return
        if path.exists() and str(path) != getattr(self, "_confirmed", None):
            answer = QMessageBox.question(self, "Replace file?", f"{path.name} already exists in {path.parent}.\n"
                                          "Do you want to replace it?",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                return
        super().accept()

    def _target(self) -> Path:
        """The typed file; a bare or relative name goes in the output folder (where the suggested name was)."""
        path = Path(self.path.text().strip()).expanduser()
        return path if path.is_absolute() else Path(self.settings.output_dir) / path

    def options(self) -> dict:
        opts = {"path": str(self._target()) if self.path.text().strip() else "", "fmt": self.fmt.currentData(), "size": self.size.value() or None,
                "quality": self.quality.value(), "save_latent": self.latent.isChecked()}
        self.settings.set("export/format", opts["fmt"])
        self.settings.set("export/size", self.size.value())
        self.settings.set("export/quality", opts["quality"])
        self.settings.set("export/latent", opts["save_latent"])
        return opts
