"""Persistent settings (QSettings) and the Settings dialog."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths, Qt
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLineEdit, QMessageBox, QPushButton, QWidget)

ENV_SETTINGS_FILE = "ANYFACE_SETTINGS_FILE"  # tests point this at an .ini in tmp_path
DETECTORS = [("auto", "Automatic (best available)"), ("dlib", "dlib HOG + 68 landmarks (FFHQ)"),
             ("yunet", "YuNet (OpenCV)"), ("fan", "face-alignment FAN (optional weights)")]
TIERS = [("fast", "Fast (encoder only)"), ("balanced", "Balanced (encoder + a few steps)"),
         ("best", "Best (encoder + optimisation)")]
EXPORT_FORMATS = ("png", "jpg", "webp")
MAX_EXPORT_SIDE = 8192
MAX_RECENT = 10
MAX_PROMPTS = 30


def _default_output_dir() -> str:
    pics = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.PicturesLocation) or str(Path.home())
    return str(Path(pics) / "AnyFace")


class Settings:
    """Typed access to the app's QSettings."""

    DEFAULTS = {"device": "auto", "detector": "auto", "tier": "fast", "pack": "tiny", "export/format": "png",
                "export/quality": 92, "export/size": 0, "export/latent": True, "generate/count": 4,
                "ask_before_discard": True}

    def __init__(self, qsettings: QSettings | None = None):
        if qsettings is None:
            path = os.environ.get(ENV_SETTINGS_FILE)
            qsettings = QSettings(path, QSettings.Format.IniFormat) if path else QSettings()
        self.q = qsettings

    def get(self, key: str, default=None):
        default = self.DEFAULTS.get(key, default)
        v = self.q.value(key, default)
        if isinstance(default, bool):
            return v in (True, "true", "1", 1)
        if isinstance(default, int) and not isinstance(default, bool):
            try:
                return int(v)
            except (TypeError, ValueError):
                return default
        return v

    def set(self, key: str, value) -> None:
        self.q.setValue(key, value)

    def sync(self) -> bool:
        """Write the settings to disk; False (and ``save_error``) when the file cannot be written."""
        self.q.sync()
        ok = self.q.status() == QSettings.Status.NoError
        self.save_error = "" if ok else (f"The settings could not be saved to {self.q.fileName()} "
                                         f"({'it cannot be written' if self.q.status() == QSettings.Status.AccessError else 'its format is damaged'}).")
        return ok

    # named accessors
    @property
    def device(self) -> str:
        return str(self.get("device"))

    @property
    def detector(self) -> str:
        v = str(self.get("detector"))  # a value from another version or a hand-edited file: the default
        return v if v in dict(DETECTORS) else self.DEFAULTS["detector"]

    @property
    def tier(self) -> str:
        v = str(self.get("tier"))
        return v if v in dict(TIERS) else self.DEFAULTS["tier"]

    def export_options(self) -> dict:
        """The stored export choices, each within what the Export dialog allows (a hand-edited or older settings
        file could hold a negative size, a quality of 500 or a format this app does not write)."""
        fmt = str(self.get("export/format")).lower().lstrip(".")
        fmt = {"jpeg": "jpg"}.get(fmt, fmt)
        quality = int(self.get("export/quality"))
        size = int(self.get("export/size"))
        return {"fmt": fmt if fmt in EXPORT_FORMATS else self.DEFAULTS["export/format"],
                "size": size if 0 <= size <= MAX_EXPORT_SIDE else 0,
                "quality": quality if 1 <= quality <= 100 else self.DEFAULTS["export/quality"],
                "save_latent": bool(self.get("export/latent"))}

    @property
    def output_dir(self) -> str:
        return str(self.get("output_dir", "") or _default_output_dir())

    def _list(self, key: str) -> list[str]:
        v = self.q.value(key, [])
        if isinstance(v, str):
            return [v] if v else []
        return [str(x) for x in (v or [])]

    def recent_files(self) -> list[str]:
        return [p for p in self._list("recent_files") if Path(p).exists()]

    def add_recent_file(self, path: str) -> None:
        path = str(Path(path).resolve())
        items = [p for p in self._list("recent_files") if p != path]
        self.set("recent_files", [path] + items[: MAX_RECENT - 1])

    def prompt_history(self) -> list[str]:
        return self._list("prompt_history")

    def add_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            return
        items = [p for p in self._list("prompt_history") if p != prompt]
        self.set("prompt_history", [prompt] + items[: MAX_PROMPTS - 1])


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, devices: list[str], parent: QWidget | None = None,
                 current_device: str | None = None):
        """``current_device``: the device the app runs on now when it was chosen on the command line (shown instead
        of the stored setting)."""
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        form = QFormLayout(self)
        self.device = QComboBox()
        for d in ["auto"] + [d for d in devices if d != "auto"]:
            self.device.addItem("Automatic (GPU if available)" if d == "auto" else d, d)
        self._select(self.device, current_device or settings.device)
        self._shown_device = self.device.currentData()
        # a stored device this computer does not have is shown as automatic; OK then stores what is shown
        self._stored_usable = self.device.findData(settings.device) >= 0
        self.detector = QComboBox()
        try:
            from core.align import detector_status

            status = detector_status()
        except Exception:  # noqa: BLE001 - Settings must open even if a detector backend is broken
            status = {}
        for key, label in DETECTORS:
            reason = status.get(key)
            self.detector.addItem(label + (" — unavailable" if reason else ""), key)
            if reason:
                self.detector.setItemData(self.detector.count() - 1, f"Cannot run here: {reason}",
                                          Qt.ItemDataRole.ToolTipRole)
                if key != settings.detector:  # a detector that cannot run here cannot be chosen
                    self.detector.model().item(self.detector.count() - 1).setEnabled(False)
        self._select(self.detector, settings.detector)
        self.tier = QComboBox()
        for key, label in TIERS:
            self.tier.addItem(label, key)
        self._select(self.tier, settings.tier)
        self.output = QLineEdit(settings.output_dir)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.output, 1)
        row.addWidget(browse)
        form.addRow("Device:", self.device)
        form.addRow("Face detector:", self.detector)
        form.addRow("Photo inversion:", self.tier)
        form.addRow("Default output folder:", row)
        self.ask_discard = QCheckBox("Ask before closing or opening something else over an edit that was not exported")
        self.ask_discard.setChecked(bool(settings.get("ask_before_discard")))
        form.addRow("", self.ask_discard)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    @staticmethod
    def _select(combo: QComboBox, value: str) -> None:
        i = combo.findData(value)
        combo.setCurrentIndex(max(0, i))

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Default output folder", self.output.text())
        if d:
            self.output.setText(d)

    def output_path(self) -> str:
        """The output folder typed, as an absolute path ("" = the default); a relative one is under the home folder
        (a GUI app's working folder is wherever it was started from)."""
        text = self.output.text().strip()
        if not text:
            return ""
        p = Path(text).expanduser()
        return str(p if p.is_absolute() else Path.home() / p)

    def accept(self) -> None:
        out = self.output_path()
        if out and Path(out).exists() and not Path(out).is_dir():
            QMessageBox.warning(self, "Settings", f"The output folder {out} is a file. Choose a folder.")
            return
        if out and any(p.exists() and not p.is_dir() for p in Path(out).parents):
            QMessageBox.warning(self, "Settings", f"The output folder {out} lies under a file. Choose a folder.")
            return
        super().accept()

    def apply(self) -> dict:
        """Store the choices; returns the keys that changed."""
        new = {"device": self.device.currentData(), "detector": self.detector.currentData(),
               "tier": self.tier.currentData(), "output_dir": self.output_path(),
               "ask_before_discard": self.ask_discard.isChecked()}
        now = {"detector": self.settings.detector, "tier": self.settings.tier}  # what the app runs with
        changed = {k: v for k, v in new.items() if k != "device" and str(now.get(k, self.settings.get(k, ""))) != str(v)}
        if new["device"] != self._shown_device:  # a device other than the one the app runs on now
            changed["device"] = new["device"]
        elif self._stored_usable:  # untouched: keep the stored choice (the command line may differ)
            del new["device"]
        # else: the stored device does not exist here; the one shown (and in use) replaces it
        for k, v in new.items():
            self.settings.set(k, v)
        if not self.settings.sync():  # they apply to this session still
            QMessageBox.warning(self, "Settings", self.settings.save_error + " They apply until the app is closed.")
        return changed
