"""Batch dialog: a folder of photos x captions -> edited photos, with progress, cancel and a report."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox,
                               QVBoxLayout, QWidget)

from anyface_desktop.backend import BatchJob
from core.batch import IMAGE_SUFFIXES, iter_inputs
from anyface_desktop.captions import METHOD_LABELS, show_readings, split_captions


class BatchDialog(QDialog):
    """Runs through the main window's worker (the engine lives there); never blocks the GUI thread."""

    def __init__(self, window):
        super().__init__(window)
        self.window = window
        self.job = None
        self.report = None
        self._prefilled = False
        self.setWindowTitle("Batch edit a folder")
        self.resize(620, 520)
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.input = QLineEdit()
        self.input.setPlaceholderText("Folder with photos (PNG, JPEG, WebP…)")
        self.output = QLineEdit()
        self.captions = QLineEdit()
        self.captions.setPlaceholderText("captions separated by |   e.g.  smiling | grey hair")
        self.strength = QDoubleSpinBox()
        self.strength.setRange(0.0, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setValue(0.6)
        self.identity = QSpinBox()
        self.identity.setRange(0, 17)
        self.identity.setValue(4)
        self.identity.setToolTip("How many coarse layers (pose, face shape, identity) stay from each photo; the same "
                                 "setting as the main window's Identity lock")
        self.identity.valueChanged.connect(lambda v: self.identity.setSuffix(" layer" if v == 1 else " layers"))
        self.identity.setSuffix(" layers")
        self.method = QComboBox()
        for k, v in METHOD_LABELS.items():
            self.method.addItem(v, k)
        self.fmt = QComboBox()
        for k in ("png", "jpg", "webp"):
            self.fmt.addItem(k.upper(), k)
        form.addRow("Photos from:", self._with_browse(self.input, "Photos folder"))
        self.recursive = QCheckBox("Include subfolders (their structure is kept in the output folder)")
        form.addRow("", self.recursive)
        form.addRow("Captions:", self.captions)
        # what the pack's dictionary makes of words its text model never saw (as under the main window's captions)
        self.reading_hint = QLabel()
        self.reading_hint.setStyleSheet("QLabel { color: #2d6a8f; }")
        self.reading_hint.hide()
        form.addRow("", self.reading_hint)
        self.captions.textChanged.connect(self._update_reading_hint)
        form.addRow("Strength:", self.strength)
        form.addRow("Identity lock:", self.identity)
        form.addRow("Method:", self.method)
        form.addRow("Format:", self.fmt)
        self.latents = QCheckBox("Also save each edited face's latent (.npz)")
        form.addRow("", self.latents)
        form.addRow("Save to:", self._with_browse(self.output, "Output folder"))
        lay.addLayout(form)
        self.progress = QProgressBar()
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setPlaceholderText("The report appears here when the batch ends: every photo edited, and every photo "
                                    "that could not be (with the reason). Inputs are never modified; a batch "
                                    "started again on the same folders resumes where it stopped.")
        lay.addWidget(self.log, 1)
        row = QHBoxLayout()
        row.addStretch(1)
        self.start_btn = QPushButton("Start")
        self.start_btn.setDefault(True)
        self.start_btn.clicked.connect(self.start)
        self.cancel_btn = QPushButton("Cancel batch")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.close_btn = QPushButton("Close")
        self.close_btn.clicked.connect(self.close)
        row.addWidget(self.start_btn)
        row.addWidget(self.cancel_btn)
        row.addWidget(self.close_btn)
        lay.addLayout(row)
        window.host.worker.progress.connect(self._on_progress)

    def _with_browse(self, edit: QLineEdit, title: str) -> QWidget:
        w = QWidget()
        h = QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(edit, 1)
        b = QPushButton("Browse…")
        b.clicked.connect(lambda: self._browse(edit, title))
        h.addWidget(b)
        return w

    def _browse(self, edit: QLineEdit, title: str) -> None:
        d = QFileDialog.getExistingDirectory(self, title, edit.text())
        if d:
            edit.setText(d)

    def prefill(self, captions, strength, method, identity_layers, output_dir) -> None:
        if captions and not self.captions.text():
            self.captions.setText(" | ".join(captions))
        self._update_reading_hint()  # the pack (and its dictionary) may have changed
        info = getattr(self.window, "engine_info", None)
        if info is not None and self.job is None:  # the loaded pack's methods and layers (the pack may have changed)
            chosen = self.method.currentData()
            self.method.clear()
            for k in info.methods:
                self.method.addItem(METHOD_LABELS.get(k, k), k)
            self.method.setCurrentIndex(max(0, self.method.findData(chosen)))
            self.identity.setRange(0, max(0, int(info.num_ws) - 1))
        if self.job is None and not self._prefilled:  # the first time only: later the user's own choices stay
            self._prefilled = True
            self.strength.setValue(strength)
            self.method.setCurrentIndex(max(0, self.method.findData(method)))
            if identity_layers is not None:
                self.identity.setValue(int(identity_layers))
        if not self.output.text():
            self.output.setText(str(Path(output_dir) / "batch"))

    def _update_reading_hint(self) -> None:
        word_map = getattr(getattr(self.window, "engine_info", None), "word_map", None)
        show_readings(self.reading_hint,
                      word_map.readings_of(split_captions(self.captions.text())) if word_map is not None else [])

    def batch_job(self) -> BatchJob:
        s = self.window.settings
        return BatchJob(input_dir=self.input.text().strip(),
                        captions=split_captions(self.captions.text()), recursive=self.recursive.isChecked(),
                        output_dir=self.output.text().strip(), strength=self.strength.value(),
                        method=self.method.currentData(), identity_layers=self.identity.value(),
                        detector=s.detector, tier=s.tier, fmt=self.fmt.currentData(),
                        save_latent=self.latents.isChecked())

    def start(self) -> None:
        bj = self.batch_job()
        problem = None
        if not bj.input_dir or not Path(bj.input_dir).is_dir():
            problem = "Choose the folder that holds the photos."
        elif not bj.output_dir:
            problem = "Choose an output folder."
        elif Path(bj.output_dir).exists() and not Path(bj.output_dir).is_dir():
            problem = f"The output “{bj.output_dir}” is a file, not a folder. Choose a folder."
        elif not _has_inputs(bj):
            kinds = ", ".join(sorted(s.lstrip(".").upper() for s in IMAGE_SUFFIXES if s not in (".jpe", ".tif")))
            problem = (f"No photos ({kinds}) in {bj.input_dir}"
                       + ("" if bj.recursive else " (tick “Include subfolders” to look in its subfolders)") + ".")
        elif not bj.captions:
            problem = "Type at least one caption (separate several with |)."
        if problem:
            self.log.setPlainText(f"Not started: {problem}")  # not the last run's report, as if this one had run
            QMessageBox.warning(self, "Batch", problem)
            return
        self.report = None
        self.log.setPlainText(f"Editing photos in {bj.input_dir} …")
        self.progress.setRange(0, 0)
        self.start_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.job = self.window.run_batch(bj)

    def cancel(self) -> None:
        if self.job is not None:
            self.window.host.cancel(self.job)
            self.cancel_btn.setEnabled(False)
            self.log.appendPlainText("Cancelling… (Start again resumes where it stopped)")

    def _on_progress(self, job, done: int, total: int) -> None:
        if job is self.job and total:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
            self.progress.setFormat(f"%v / %m photos")

    def _finish(self) -> None:
        if self.progress.maximum() == 0:  # still the busy indicator of a start (a failure before any photo)
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.job = None
        self.start_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def job_done(self, report) -> None:
        self.report = report
        self.progress.setRange(0, max(1, report.total))
        self.progress.setValue(report.ok + report.failed)
        self.log.setPlainText(report.summary() if report.total else
                              f"No photos to edit in {self.input.text().strip()}: the images there are outputs of an earlier "
                              "run or hidden files.")
        self._finish()

    def job_failed(self, exc, tb) -> None:
        self.log.appendPlainText(f"Batch failed: {exc}")
        self._finish()

    def job_cancelled(self, partial=None) -> None:
        if partial is not None and not partial.cancelled:  # every photo was done before the cancel was seen
            self.job_done(partial)
            return
        self.report = partial
        if partial is not None:
            self.log.setPlainText("Batch cancelled.\n" + partial.summary())
        else:
            self.log.appendPlainText("Batch cancelled.")
        self._finish()

    def closeEvent(self, e):  # noqa: N802
        super().closeEvent(e)  # a running batch keeps running; the window's close cancels it


def _has_inputs(bj) -> bool:
    """Whether the runner would find at least one photo (or a folder it reports) there: the same walk as the batch
    (hidden files and earlier outputs skipped), stopped at the first."""
    try:
        return next(iter_inputs(bj.input_dir, recursive=bj.recursive, output_dir=bj.output_dir), None) is not None
    except Exception:  # noqa: BLE001 - an unreadable folder: the runner says why
        return True
