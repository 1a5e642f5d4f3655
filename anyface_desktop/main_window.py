"""Main window of AnyFace Desktop: canvas, captions + strength, gallery, history, export, batch, models."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PySide6.QtCore import QByteArray, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (QComboBox, QFileDialog, QLabel, QMainWindow, QMessageBox, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QStyle, QTabWidget, QToolBar, QVBoxLayout, QWidget)

from anyface_desktop.backend import Backend, EditOutcome, FaceState, PhotoState
from anyface_desktop.canvas import PhotoCanvas
from anyface_desktop.captions import CaptionEditor
from anyface_desktop.dialogs import BankDialog, ExportDialog, open_error_boxes, show_error
from anyface_desktop.gallery import Gallery
from anyface_desktop.history_panel import History, HistoryEntry, HistoryPanel
from anyface_desktop.scheduler import LiveScheduler
from anyface_desktop.settings import Settings, SettingsDialog
from anyface_desktop.worker import Job, WorkerHost
from core import weights

log = logging.getLogger("anyface.gui")
LONG_JOBS = {"load", "open", "invert", "generate", "more", "export", "exportall", "batch", "bank", "refine"}


class MainWindow(QMainWindow):
    BANK_SIZES = (2000, 200000, 20000)  # KNN bank: smallest, largest, default number of faces

    def __init__(self, pack: str | None = None, device: str | None = None, *, backend: Backend | None = None,
                 settings: Settings | None = None):
        super().__init__()
        self.setWindowTitle("AnyFace Desktop")
        self.resize(1280, 820)
        self.setAcceptDrops(True)
        self.settings = settings or Settings()
        self._startup_notes: list[str] = []  # stored choices that cannot be used here (said once models load)
        self.pack_id = pack or self._stored_pack()
        self.device_pref = device or self._stored_device()
        self.engine_info = None
        self.engine_error: BaseException | None = None
        self.photo: PhotoState | None = None
        self.face: FaceState | None = None
        self.source: HistoryEntry | None = None  # what edits start from (a photo's face or a generated face)
        self.history = History()
        # faces of the open photo left for another one: their history, to come back to (index -> FaceSession)
        self._face_sessions: dict[int, dict] = {}
        self.display = "photo"  # "photo" (pasted back into the full photo) | "crop" (the aligned face)
        self.scheduler = LiveScheduler()
        self.last_timing = ""
        self._jobs: dict[int, Job] = {}
        self._progress_job: Job | None = None
        self._closing = False
        self.model_manager = None
        self.bank_dialog: BankDialog | None = None
        self.bank_question: QMessageBox | None = None

        self.host = WorkerHost(backend or Backend(pack=self.pack_id, device=self.device_pref), parent=self)
        w = self.host.worker
        w.result.connect(self._on_result)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(self._on_cancelled)
        w.finished.connect(self._on_finished)
        w.progress.connect(self._on_progress)

        self._build_ui()
        self._build_actions()
        self.gallery.view.currentRowChanged.connect(lambda *_: self._update_actions())
        self.gallery.view.itemSelectionChanged.connect(self._update_actions)
        self._restore_geometry()
        self.captions.set_history(self.settings.prompt_history())
        self._update_actions()
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(0)
        self._preview_timer.timeout.connect(self.request_preview)
        self.load_engine()

    # ================================================================== UI
    def _build_ui(self) -> None:
        self.canvas = PhotoCanvas()
        self.canvas.filesDropped.connect(self._on_dropped)
        self.canvas.facePicked.connect(self.pick_face)
        self.captions = CaptionEditor()
        self.captions.captionsChanged.connect(lambda *_: self._schedule_preview())
        self.captions.settingsChanged.connect(self._schedule_preview)
        self.captions.method.currentIndexChanged.connect(lambda *_: self._method_changed())
        self.captions.strengthChanged.connect(lambda *_: self._schedule_preview())
        self.captions.slider.sliderReleased.connect(self._commit_current)
        self.gallery = Gallery()
        self.gallery.generateRequested.connect(self.generate)
        self.gallery.moreLikeRequested.connect(self.more_like)
        self.gallery.editRequested.connect(self.edit_generated)
        self.gallery.exportRequested.connect(lambda r: self.export_as(self._gallery_entry(r)))
        self.gallery.saveAllRequested.connect(lambda: self.export_gallery())
        self.gallery.view.currentRowChanged.connect(self._gallery_preview)
        self.history_panel = HistoryPanel()
        self.history_panel.jumpRequested.connect(self.jump_history)

        self.tabs = QTabWidget()
        self.tabs.addTab(self.gallery, "Generate")
        self.tabs.addTab(self.history_panel, "History")
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(6, 6, 6, 6)
        sl.addWidget(self.captions, 0)
        sl.addWidget(self.tabs, 1)
        # never smaller than its rows need (a fixed 340 px squeezed the gallery buttons over each other; the box
        # layout also gave the caption list its preferred height and the gallery tab less than its minimum)
        self.tabs.setMinimumHeight(self.tabs.minimumSizeHint().height())
        side.setMinimumWidth(max(340, side.minimumSizeHint().width()))
        self.splitter = QSplitter()
        self.splitter.addWidget(self.canvas)
        self.splitter.addWidget(side)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([880, 400])
        self.setCentralWidget(self.splitter)

        sb = self.statusBar()
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel_long_job)
        self.cancel_btn.hide()
        self.device_label = QLabel("Device: …")
        self.pack_label = QLabel(f"Pack: {self.pack_id}")
        self.timing_label = QLabel("")
        self.timing_label.setMinimumWidth(150)
        self.device_label.setMinimumWidth(150)
        self.pack_label.setMinimumWidth(140)
        for wdg in (self.progress, self.cancel_btn):
            sb.addWidget(wdg)
        for wdg in (self.timing_label, self.pack_label, self.device_label):
            sb.addPermanentWidget(wdg)
        self._update_canvas_empty_text()

    def _build_actions(self) -> None:
        style = self.style()
        SP = QStyle.StandardPixmap
        icons = {"&Open photo…": SP.SP_DialogOpenButton, "Export &As…": SP.SP_DialogSaveButton,
                 "&Undo": SP.SP_ArrowBack, "&Redo": SP.SP_ArrowForward, "&Fit": SP.SP_TitleBarMaxButton,
                 "&Generate faces": SP.SP_FileDialogContentsView, "&Batch…": SP.SP_DirOpenIcon,
                 "&Models…": SP.SP_DriveHDIcon, "&Settings…": SP.SP_FileDialogDetailedView}

        def act(text, slot, shortcut=None, tip=None, checkable=False):
            a = QAction(text, self)
            if text in icons:
                a.setIcon(style.standardIcon(icons[text]))
            if shortcut:
                a.setShortcut(QKeySequence(shortcut))
            if tip:
                a.setToolTip(tip)
                a.setStatusTip(tip)
            a.setCheckable(checkable)
            a.triggered.connect(slot)
            self.addAction(a)
            return a

        self.act_open = act("&Open photo…", self.open_dialog, QKeySequence.StandardKey.Open, "Open a photo (Ctrl+O)")
        self.act_open_latent = act("Open &latent (.npz)…", self.open_latent_dialog, None,
                                   "Continue editing a face exported with its latent")
        self.act_save = act("&Export", self.quick_export, "Ctrl+S", "Export to the default folder (Ctrl+S)")
        self.act_save_as = act("Export &As…", self.export_as, "Ctrl+Shift+S", "Export with options (Ctrl+Shift+S)")
        self.act_undo = act("&Undo", self.undo, "Ctrl+Z", "Undo (Ctrl+Z)")
        self.act_redo = act("&Redo", self.redo, "Ctrl+Shift+Z", "Redo (Ctrl+Shift+Z)")
        self.act_apply = act("A&pply edit", self.apply_edit, "Ctrl+Return",
                             "Keep this edit and stack the next captions on top of it (Ctrl+Enter)")
        self.act_generate = act("&Generate faces", lambda: self.generate(self.gallery.count.value(),
                                                                          self.gallery.seed.value()),
                                "Ctrl+G", "Generate new faces from the captions (Ctrl+G)")
        self.act_batch = act("&Batch…", self.open_batch, "Ctrl+B", "Edit a folder of photos (Ctrl+B)")
        self.act_models = act("&Models…", self.open_model_manager, None, "Model packs and their files")
        self.act_build_bank = act("Build &KNN bank…", self.build_bank_dialog, None,
                                  "Build the KNN latent bank of the current pack (text-to-face with no trained model)")
        self.act_refine = act("Refine with &CLIP", lambda: self.refine_current(), "Ctrl+R",
                              "A few optimisation steps that move the current face toward the captions in CLIP "
                              "space (Ctrl+R)")
        self.act_settings = act("&Settings…", self.open_settings, QKeySequence.StandardKey.Preferences, "Settings")
        self.act_fit = act("&Fit", lambda: self.canvas.fit(), "Ctrl+0", "Fit the photo in the window (Ctrl+0)")
        self.act_zoom_in = act("Zoom &in", lambda: self.canvas.zoom_by(1.25), QKeySequence.StandardKey.ZoomIn)
        self.act_zoom_out = act("Zoom &out", lambda: self.canvas.zoom_by(0.8), QKeySequence.StandardKey.ZoomOut)
        self.act_quit = act("&Quit", self.close, QKeySequence.StandardKey.Quit)
        self.view_group = QActionGroup(self)
        self.act_after = act("After", lambda: self.set_view_mode("after"), "A", "Show the edit (A)", True)
        self.act_before = act("Before", lambda: self.set_view_mode("before"), "B", "Show the original (B)", True)
        self.act_wipe = act("Wipe", lambda: self.set_view_mode("wipe"), "W", "Before | after with a divider (W)", True)
        for a in (self.act_after, self.act_before, self.act_wipe):
            self.view_group.addAction(a)
        self.act_after.setChecked(True)

        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addAction(self.act_open)
        self.recent_menu = m.addMenu("Open &recent")
        m.addAction(self.act_open_latent)
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self._fill_recent()
        m.addSeparator()
        m.addActions([self.act_save, self.act_save_as])
        m.addSeparator()
        m.addAction(self.act_batch)
        m.addSeparator()
        m.addAction(self.act_quit)
        m = mb.addMenu("&Edit")
        m.addActions([self.act_undo, self.act_redo])
        m.addSeparator()
        m.addAction(self.act_apply)
        m.addAction(self.act_refine)
        m.addSeparator()
        m.addAction(self.act_generate)
        m.addSeparator()
        m.addAction(self.act_settings)
        m = mb.addMenu("&View")
        m.addActions([self.act_after, self.act_before, self.act_wipe])
        m.addSeparator()
        m.addActions([self.act_fit, self.act_zoom_in, self.act_zoom_out])
        m = mb.addMenu("&Models")
        m.addAction(self.act_models)
        m.addAction(self.act_build_bank)

        for a, short in ((self.act_open, "Open"), (self.act_save_as, "Export"), (self.act_generate, "Generate"),
                         (self.act_apply, "Apply"), (self.act_models, "Models"), (self.act_settings, "Settings"),
                         (self.act_batch, "Batch"), (self.act_refine, "Refine")):
            a.setIconText(short)
        tb = QToolBar("Main")
        tb.setObjectName("main_toolbar")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        tb.addAction(self.act_open)
        tb.addAction(self.act_save_as)
        tb.addSeparator()
        tb.addAction(self.act_undo)
        tb.addAction(self.act_redo)
        tb.addAction(self.act_apply)
        tb.addAction(self.act_refine)
        self.refine_steps = QSpinBox()
        self.refine_steps.setRange(1, 500)
        self.refine_steps.setValue(20)
        self.refine_steps.setSuffix(" steps")
        self.refine_steps.setToolTip("Optimisation steps of Refine with CLIP")
        tb.addWidget(self.refine_steps)
        tb.addSeparator()
        tb.addAction(self.act_after)
        tb.addAction(self.act_before)
        tb.addAction(self.act_wipe)
        tb.addAction(self.act_fit)
        self.display_combo = QComboBox()
        self.display_combo.addItem("Full photo", "photo")
        self.display_combo.addItem("Aligned face", "crop")
        self.display_combo.setToolTip("Show the edited face pasted back into the photo, or the aligned crop")
        self.display_combo.currentIndexChanged.connect(lambda *_: self.set_display(self.display_combo.currentData()))
        tb.addWidget(self.display_combo)
        self.face_combo = QComboBox()
        self.face_combo.setToolTip("Which face of the photo to edit (or click a box on the photo)")
        self.face_combo.activated.connect(lambda i: self.pick_face(i))
        self.face_combo_action = tb.addWidget(self.face_combo)
        self.face_combo_action.setVisible(False)
        tb.addSeparator()
        tb.addAction(self.act_generate)
        tb.addAction(self.act_batch)
        tb.addAction(self.act_models)
        tb.addAction(self.act_settings)
        # Undo and Redo as arrows only (their tooltips and shortcuts say which): at 1280 px with the face picker shown
        # the text put Settings behind the toolbar's "»"
        for a in (self.act_undo, self.act_redo):
            tb.widgetForAction(a).setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonIconOnly)
        self.addToolBar(tb)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        files = self.settings.recent_files()
        if not files:
            a = self.recent_menu.addAction("(none yet)")
            a.setEnabled(False)
        for p in files:
            a = self.recent_menu.addAction(Path(p).name)
            a.setToolTip(p)
            a.triggered.connect(lambda _=False, p=p: self.open_photo(p))

    def _restore_geometry(self) -> None:
        g = self.settings.q.value("window/geometry")
        if isinstance(g, QByteArray):
            self.restoreGeometry(g)

    def _update_canvas_empty_text(self) -> None:
        from core.errors import MissingWeightsError

        err = self.engine_error
        if self.engine_info is None and err is not None and not isinstance(err, MissingWeightsError) \
                and self.pack_id in weights.usable_packs():  # the files are there: something else failed
            self.canvas.empty_text = (f"The models could not be loaded:\n{str(err).splitlines()[0][:300]}\n\n"
                                      "Check Settings (device) and Models, then restart.")
        elif self.engine_info is None and (err is not None or self.pack_id not in weights.usable_packs()):
            self.canvas.empty_text = (
                f"The model pack '{self.pack_id}' is not usable yet (files missing).\n\n"
                "Open Models to see which files are missing and where to put them, build the bundled pack with "
                "`make pack`, or import the official files.")
        else:
            self.canvas.empty_text = ("Drop a photo here, press Ctrl+O to open one,\n"
                                      "or type captions on the right and press Generate.")
        self.canvas.update()

    def _update_actions(self) -> None:
        has_result = self._export_entry() is not None
        self.act_undo.setEnabled(self.history.can_undo())
        self.act_redo.setEnabled(self.history.can_redo())
        cur = getattr(self, "current_entry", None)
        self.act_apply.setEnabled(cur is not None and cur.source is not None)
        self.act_save.setEnabled(has_result)
        self.act_save_as.setEnabled(has_result)
        self.act_generate.setEnabled(self.engine_info is not None)
        self.act_build_bank.setEnabled(self.engine_info is not None)
        self.act_refine.setEnabled(self.engine_info is not None
                                   and (cur is not None or self.gallery.current() is not None))
        self.gallery.generate_btn.setEnabled(self.engine_info is not None)
        self.display_combo.setEnabled(self.face is not None)

    def _set_timing(self, kind: str, seconds: float) -> None:
        self.last_timing = f"{kind} {seconds * 1000:.0f} ms" if seconds < 10 else f"{kind} {seconds:.1f} s"
        self.timing_label.setText("Last: " + self.last_timing)

    # ================================================================== jobs
    @property
    def idle(self) -> bool:
        """No job running or waiting and no preview about to be requested."""
        return not self.host.busy and not self.scheduler.busy and not self._preview_timer.isActive()

    def submit(self, kind: str, fn, stamp: int = 0) -> Job:
        job = self.host.submit(kind, fn, stamp or self.scheduler.next_stamp())
        self._jobs[job.id] = job
        if kind in LONG_JOBS:
            self._progress_job = job
            self.progress.setRange(0, 0)
            self.progress.setFormat(kind)
            self.progress.show()
            self.cancel_btn.setVisible(kind not in ("load", "export"))
            self.canvas.set_busy({"load": "Loading models…", "open": "Finding faces…", "invert": "Inverting the face…",
                                  "generate": "Generating…", "more": "Generating…", "batch": "Batch running…",
                                  "export": "Exporting…", "exportall": "Saving the faces…", "bank": "Building the KNN bank…",
                                  "refine": "Refining with CLIP…"}.get(kind, ""))
        return job

    def cancel_long_job(self) -> None:
        if self._progress_job is not None:
            self.host.cancel(self._progress_job)

    def _on_progress(self, job: Job, done: int, total: int) -> None:
        if job is self._progress_job and total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
            self.progress.setFormat(f"{job.kind} %p%")

    def _on_finished(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job is self._progress_job:
            self._progress_job = None
            self.progress.hide()
            self.cancel_btn.hide()
            self.canvas.set_busy("")
        if job.kind == "preview":
            ok = getattr(job, "_accepted", None)
            accept, nxt = self.scheduler.finished(job.stamp, ok=bool(ok))
            if accept and getattr(job, "_value", None) is not None:
                self._show_preview(job._value, commit=self.scheduler.is_current(job.stamp))
            if nxt is not None:
                self._start_preview(nxt)
            elif not self._preview_timer.isActive():
                self._run_deferred_export()

    def _on_result(self, job: Job, value) -> None:
        if self._closing:
            return
        handler = getattr(self, f"_done_{job.kind}", None)
        if job.kind == "preview":
            job._accepted, job._value = True, value  # shown in _on_finished via the scheduler
            return
        self._set_timing(job.kind, job.seconds)
        if handler is not None:
            handler(job, value)

    def _on_failed(self, job: Job, exc: BaseException, tb: str) -> None:
        if self._closing:
            return
        if job.kind == "load":
            self.engine_error = exc
            self.device_label.setText("Device: —")
            self._update_canvas_empty_text()
            from core.errors import MissingWeightsError

            if isinstance(exc, MissingWeightsError):
                self.statusBar().showMessage("Model pack missing: open Models for details", 10000)
                return
        if job.kind == "batch" and self.batch_dialog is not None:
            self.batch_dialog.job_failed(exc, tb)
        if job.kind == "export":
            self._retry_export_path = getattr(job, "typed_path", None)
            self.statusBar().clearMessage()  # not the previous "Exported …"
        if job.kind == "open":
            self._resume_cut_inversion()
        if job.kind == "invert" and not self._inverting(but=job) and self.face is not None:
            self._back_to_current_face()  # a face switch failed
        elif job.kind == "invert" and not self._inverting(but=job) and self.photo is not None and self.photo.faces:
            self._face_not_inverted("The face could not be inverted")
        if job.kind == "preview":
            self._deferred_action = None  # Apply / Refine asked for the value that failed: not an older one
        if job.kind == "preview" and open_error_boxes():
            log.warning("preview failed again: %s", exc)  # one box at a time while dragging
            return
        show_error(self, exc, tb)

    def _back_to_current_face(self) -> None:
        """A face switch did not happen (cancelled, failed, given up): photo, face box and canvas go back to the
        face being edited."""
        if self.face is None or self.photo is None:
            return
        self.photo = self.face.photo
        self.canvas.set_faces(self.photo.face_boxes() if self.display == "photo" else [], self.face.index)
        self.face_combo.setCurrentIndex(self.face.index)

    def _resume_cut_inversion(self) -> None:
        """A photo failed to open: the previous photo, whose inversion that open stopped, gets its face back."""
        resume, self._resume_invert = getattr(self, "_resume_invert", None), None
        if resume is not None and resume[0] is self.photo and self.face is None:
            self.pick_face(resume[1])
        elif resume is not None and resume[0] is self.photo and self.face is not None:  # a face switch was cut
            self._back_to_current_face()

    def _inverting(self, but: Job | None = None) -> bool:
        return any(j.kind in ("invert", "open") and j is not but and not j.cancelled for j in self._jobs.values())

    def _on_cancelled(self, job: Job) -> None:
        if not self._closing and job.kind in LONG_JOBS:
            self.statusBar().showMessage(f"{job.kind.capitalize()} cancelled", 5000)
        if self._closing:
            return
        if job.kind == "open":  # the photo whose inversion this open stopped gets its face back
            self._resume_cut_inversion()
        elif job.kind == "invert" and not self._inverting(but=job) and self.face is not None:
            self._back_to_current_face()  # a face switch was cancelled
        elif job.kind == "invert" and not self._inverting(but=job) and self.photo is not None and self.photo.faces:
            self._face_not_inverted("Inversion cancelled")
        if job.kind == "batch" and self.batch_dialog is not None and not self._closing:
            self.batch_dialog.job_cancelled(getattr(self.host.backend, "last_batch_report", None))

    # ================================================================== engine
    batch_dialog = None

    def _stored_pack(self) -> str:
        """The pack stored in the settings, or the bundled one when this install does not know it (a pack removed,
        or settings from another computer)."""
        stored = str(self.settings.get("pack") or "tiny")
        try:
            known = stored in weights.Manifest.load().packs
        except Exception:  # noqa: BLE001 - a broken manifest is reported when the pack loads
            known = True
        if not known:
            self._startup_notes.append(f"The model pack '{stored}' of the last session is not installed here: "
                                       "using the bundled tiny pack (Models > Models… lists the packs).")
            return "tiny"
        try:
            usable = stored == "tiny" or stored in weights.usable_packs()
        except Exception:  # noqa: BLE001
            usable = True
        if not usable:  # e.g. one of its files was deleted
            self._startup_notes.append(f"The model pack '{stored}' of the last session is missing files: using the "
                                       "bundled tiny pack (Models > Models… shows what is missing).")
            return "tiny"
        return stored

    def _stored_device(self) -> str:
        """The device stored in the settings, or automatic when it does not exist here (another computer's GPU, a
        hand-edited value)."""
        stored = self.settings.device
        try:
            from core.device import pick_device

            pick_device(stored)
        except (ValueError, RuntimeError) as e:
            self._startup_notes.append(f"The device of the last session cannot be used ({e}): using the automatic "
                                       "choice (Settings to pick one).")
            return "auto"
        return stored

    def load_engine(self, force: bool = False) -> None:
        """Load the pack on the worker; ``force``: read its files again even if pack and device are the same (a
        bank built here was deleted, so the pack's own is used again)."""
        pack, device, detector, tier = self.pack_id, self.device_pref, self.settings.detector, self.settings.tier
        self.engine_info = None
        self.captions.set_word_map(None)  # the next pack's dictionary (if it has one) comes with its models
        self._update_actions()  # nothing to generate with until the models are loaded
        self.submit("load", lambda b, progress, cancel: b.load(pack, device, progress, cancel, detector, tier,
                                                               force=force))

    def _done_load(self, job: Job, info) -> None:
        self.engine_info = info
        self.engine_error = None
        self.device_label.setText(f"Device: {info.device}")
        self.pack_label.setText(f"Pack: {info.pack_id} ({info.resolution} px)")
        self._set_methods(info)
        self.captions.set_num_ws(info.num_ws, info.coarse_layers)
        self.captions.set_word_map(getattr(info, "word_map", None))
        self._update_canvas_empty_text()
        self._update_actions()
        if getattr(info, "bank_problem", ""):
            self._startup_notes.append("The pack's KNN bank is damaged: loaded without it (build one, or restore the "
                                       "file).")
        if self._startup_notes:
            self.statusBar().showMessage(" ".join(self._startup_notes), 20000)
            self._startup_notes = []
        else:
            self.statusBar().showMessage(f"Models loaded in {info.seconds:.1f} s", 4000)
        reopen, self._reopen_after_load = getattr(self, "_reopen_after_load", None), None
        if reopen:  # the photo that was open, with this pack's encoder
            self.open_photo(reopen)
        if not info.methods or getattr(info, "bank_problem", ""):  # e.g. an imported official pack: no CMD/CVAE
            self.offer_bank()                                      # trained, no bank built yet; or a damaged bank

    def _set_methods(self, info) -> None:
        """The pack's methods, plus KNN always, and a loaded CMD/CVAE that reads text through the bank: without a bank,
        picking either offers to build one."""
        waiting = [m for m in getattr(info, "needs_bank", []) if m not in info.methods]
        self.captions.set_methods(list(info.methods) + ([] if "knn" in info.methods else ["knn"]) + waiting)
        if "knn" not in info.methods:
            i = self.captions.method.findData("knn")
            self.captions.method.setItemText(i, "KNN latent bank (built on first use)")
        for m in waiting:
            i = self.captions.method.findData(m)
            self.captions.method.setItemText(i, self.captions.method.itemText(i) + " (needs the KNN bank: built on "
                                             "first use)")

    # ================================================================== KNN bank
    def needs_bank(self) -> bool:
        """The KNN method is picked (or is the only way to text) and the pack has no bank yet."""
        info = self.engine_info
        if info is None or "knn" in info.methods:
            return False
        return (self.captions.method_key() == "knn" or not info.methods
                or self.captions.method_key() in getattr(info, "needs_bank", []))

    def _method_changed(self) -> None:
        if self.needs_bank():
            self.offer_bank()

    def offer_bank(self) -> None:
        """Ask (non-blocking) whether to build the KNN bank now; Yes opens the size dialog."""
        if self.bank_question is not None and self.bank_question.isVisible() or self.host.busy and any(
                j.kind == "bank" for j in self.host.active.values()):
            return
        info = self.engine_info
        problem = getattr(info, "bank_problem", "") if info is not None else ""
        lead = (f"The KNN latent bank of pack “{info.pack_id}” is damaged, so the pack loaded without it" if problem
                else f"Pack “{info.pack_id if info else self.pack_id}” has no KNN latent bank yet")
        box = QMessageBox(QMessageBox.Icon.Question, "Build the KNN bank?", lead
                          + ("" if info is None or info.methods
                             else f": its {' and '.join(m.upper() for m in info.needs_bank)} read"
                             f"{'s' if len(info.needs_bank) == 1 else ''} text through it"
                             if getattr(info, "needs_bank", None)
                             else " and no trained text model (CMD/CVAE)") + ".",
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self)
        box.setInformativeText("Build it now? It samples faces from the generator once (you choose how many) and "
                               "keeps them for next time; then text-to-face works with no training."
                               + (f"\n\n{problem}\nA bank built here replaces it; so does a good copy of the file "
                                  "(then restart the app, or pick the pack again in Models)." if problem else ""))
        box.button(QMessageBox.StandardButton.Yes).setText("Build bank…")
        box.button(QMessageBox.StandardButton.No).setText("Not now")
        box.buttonClicked.connect(lambda b: self.build_bank_dialog()
                                  if box.standardButton(b) == QMessageBox.StandardButton.Yes else None)
        self.bank_question = box
        box.open()

    def build_bank_dialog(self) -> BankDialog | None:
        info = self.engine_info
        if info is None:
            self.statusBar().showMessage("Load a model pack first (Models).", 5000)
            return None
        from core.engine import bank_cache_path

        lo, hi, default = self.BANK_SIZES
        dlg = BankDialog(info.pack_id, info.bank_bytes_per_entry, str(bank_cache_path(info.pack_id).parent), self,
                         sizes=(lo, hi, default), current=info.bank_size)
        dlg.accepted.connect(lambda: self.build_bank(dlg.value()))
        self.bank_dialog = dlg
        dlg.open()
        return dlg

    def build_bank(self, size: int) -> Job:
        return self.submit("bank", lambda b, progress, cancel: b.build_bank(int(size), progress, cancel))

    def _done_bank(self, job: Job, info) -> None:
        self.engine_info = info
        self._set_methods(info)
        i = self.captions.method.findData("knn")
        if i >= 0 and not {"cmd", "cvae"} & set(info.methods):
            self.captions.method.setCurrentIndex(i)
        self._update_actions()
        self.statusBar().showMessage(f"KNN bank of {info.bank_size:,} faces built in {job.seconds:.1f} s.", 8000)
        if self.model_manager is not None:
            self.model_manager.refresh()

    # ================================================================== photo
    def open_dialog(self) -> None:
        start = (self.settings.recent_files() or [str(Path.home())])[0]
        path, _ = QFileDialog.getOpenFileName(self, "Open photo", str(Path(start).parent if Path(start).is_file() else start),
                                              _image_filter())
        if path:
            self.open_photo(path)

    def open_photo(self, path: str) -> None:
        if not self.confirm_discard("Open another photo"):
            return
        path = str(path)
        self.scheduler.invalidate()
        # the running inversion of the current photo (one worker) is stopped so the new photo opens at once; if
        # the new photo then fails to open, _on_failed starts it again, so the current photo stays usable
        inverting = [j for j in self._jobs.values() if j.kind == "invert"]
        self._resume_invert = (self.photo, self.canvas_face_index()) if inverting and self.photo is not None else None
        self.host.cancel(kind="invert")
        detector = self.settings.detector
        self._deferred_action = None  # an Apply / Refine waiting for a preview was about the photo being left
        self.submit("open", lambda b, progress, cancel: _open_photo_any_faces(b, path, detector))

    def canvas_face_index(self) -> int:
        return max(0, self.face_combo.currentIndex())

    def _done_open(self, job: Job, photo: PhotoState) -> None:
        self._resume_invert = None
        if getattr(self, "_drop_note", None) and self._drop_note[0] != str(photo.path):
            self._drop_note = None  # about a drop whose photo did not open
        self.canvas.pick_single = False
        self._photo_has_edits = False
        self._face_sessions = {}
        self._deferred_export = self._deferred_action = None
        self.settings.add_recent_file(str(photo.path))
        self.photo = photo
        self.face = None
        self.source = None
        self.current_entry = None  # nothing to apply, refine or export until this photo has a face
        self._live_entry = None
        self.statusBar().clearMessage()
        self.history.reset()
        self.history_panel.show_history(self.history)
        self.setWindowTitle(f"{Path(photo.path).name} — AnyFace Desktop")
        self.canvas.set_images(photo.image, None, refit=True)
        boxes = photo.face_boxes()
        self.canvas.set_faces(boxes, 0 if boxes else -1)
        self.face_combo.clear()
        for i in range(len(boxes)):
            self.face_combo.addItem(f"Face {i + 1} of {len(boxes)}")
        self.face_combo_action.setVisible(len(boxes) > 1)
        self._update_actions()
        if not boxes:
            from core.errors import NoFaceFoundError

            h, w = photo.image.shape[:2]
            small = (f"\nThe photo is small ({w}x{h} px): a face needs to be at least ~80 pixels wide."
                     if min(h, w) < 160 else "")
            show_error(self, NoFaceFoundError(
                f"No face was found in {Path(photo.path).name}.{small}\nTry another photo or another face detector "
                "in Settings. You can still generate faces from text."))
            return
        areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        self.pick_face(int(max(range(len(areas)), key=areas.__getitem__)))  # the main subject first

    def pick_face(self, index: int) -> None:
        if self.photo is None or not (0 <= index < len(self.photo.faces)):
            return
        self._deferred_action = None  # an Apply / Refine waiting for a preview was about the face being edited
        if self.face is not None and index == self.face.index:
            if self._inverting():  # back to the face being edited while a switch runs: stop the switch
                self.host.cancel(kind="invert")
                self._back_to_current_face()
                return
            if self.face.tier == self.settings.tier:
                return  # already the face being edited
            if not self.confirm_discard("Invert the face again with the new inversion setting"):
                return
            self.photo = self.face.photo  # a changed tier: this face again, from the photo it was opened from
        self.canvas.set_faces(self.photo.face_boxes(), index)
        self.face_combo.setCurrentIndex(index)
        self.scheduler.invalidate()
        self.host.cancel(kind="invert")
        cur = getattr(self, "current_entry", None)
        if self.face is not None and index != self.face.index:
            # the face being left keeps its history: clicking it again comes back to it (not to a new inversion of
            # its edited pixels), with its steps to undo
            self._face_sessions[self.face.index] = dict(face=self.face, history=self.history, current=cur,
                                                        region=self._face_region())
            composed = cur.composed if cur is not None else None  # read once: an old step rebuilds it on access
            if composed is not None and composed is not self.face.photo.image:
                # the edit of the face being left (a preview, an applied or refined step) stays in the photo: the
                # next face is edited (and exported) on top of it
                from dataclasses import replace

                self.photo = replace(self.photo, image=composed)
                self._photo_has_edits = True
                self.statusBar().showMessage(f"Face {self.face.index + 1}'s edit is kept in the photo.", 6000)
            self.captions.set_strength(0.0, emit=False)  # the captions stay; the slider applies them to this face
            if index in self._face_sessions:
                self._resume_face(self._face_sessions.pop(index))
                return
        photo, tier = self.photo, self.settings.tier
        self.submit("invert", lambda b, progress, cancel: b.prepare_face(photo, index, tier, progress, cancel))

    def _resume_face(self, session: dict) -> None:
        """Back to a face edited before on this photo: its own history, on the photo as it is now (the other faces'
        edits kept), its pixels as they were before its own first edit. Where two faces' paste-back masks overlap,
        this face's pixels win (as a paste-back of it would)."""
        from dataclasses import replace

        old = session["face"]
        region = session["region"]
        base = self.photo.image
        mask = _paste_mask(old.transform, base.shape[:2])
        if mask is not None and old.photo.image.shape == base.shape:
            # only where this face's paste-back can change pixels: a neighbour's edit inside the crop area stays
            base = base.copy()
            base[mask] = old.photo.image[mask]
            history = session["history"]
            entries = list(history.entries)
            cur = session["current"]
            for e in entries + ([cur] if cur is not None and not any(cur is x for x in entries) else []):
                full = e.composed
                if full is None or full.shape != base.shape:
                    continue
                new = base.copy()
                new[mask] = full[mask]
                e.composed = new
                e.compact(base, region)
        else:  # no region to move (should not happen for a photo face): invert it again
            photo, index, tier = self.photo, old.index, self.settings.tier
            self.submit("invert", lambda b, progress, cancel: b.prepare_face(photo, index, tier, progress, cancel))
            return
        self.photo = replace(self.photo, image=base)
        self.face = replace(old, photo=self.photo)
        self.history = session["history"]
        self.canvas.pick_single = False
        self._restore(session["current"] or self.history.current)
        self.statusBar().showMessage(f"Back to face {old.index + 1}: its steps are in History.", 6000)

    def _face_not_inverted(self, why: str) -> None:
        """The photo is open but no face of it is being edited (its first inversion was cancelled or failed): a
        click on a face box starts it again."""
        self.canvas.pick_single = True
        self.statusBar().showMessage(f"{why}: click the face to invert it again.", 15000)

    def _done_invert(self, job: Job, face: FaceState) -> None:
        if self.photo is None or face.photo is not self.photo:
            return  # a newer photo was opened meanwhile
        self.canvas.pick_single = False
        self.face = face
        first = HistoryEntry("Photo (inverted)", face.ws, face.reconstruction, face.photo.image,
                             params={"captions": [], "strength": 0.0})
        self.source = first
        self._face_sessions.pop(face.index, None)  # inverted afresh (a tier change): its old steps are gone
        self.history = History()  # the face left (if any) keeps its own in its session
        self.history.reset(first)
        self.history_panel.show_history(self.history)
        self._update_actions()
        self._show_entry(first)
        dropped, self._drop_note = getattr(self, "_drop_note", None), None  # said once, for the photo it is about
        note = dropped[1] if dropped and self.photo is not None and str(self.photo.path) == dropped[0] else ""
        self.statusBar().showMessage(f"Face {face.index + 1} ready ({face.seconds:.2f} s). Add captions and move the "
                                     "strength slider." + (f" {note}" if note else ""), 10000 if note else 6000)
        if self.captions.strength() > 0:  # after a face switch the slider is at 0: nothing to show yet
            self._schedule_preview()

    # ================================================================== live preview
    def _schedule_preview(self) -> None:
        if self.source is not None and self.captions.captions():
            self._preview_timer.start()

    def preview_params(self) -> dict:
        return dict(captions=self.captions.captions(), strength=self.captions.strength(),
                    method=self.captions.method_key(), identity_layers=self.captions.identity_layers(), seed=0)

    def request_preview(self) -> None:
        if self.source is None or not self.captions.captions() or self.engine_info is None and self.engine_error:
            self._run_deferred_export()
            return
        if self.needs_bank():
            self._run_deferred_export()
            self.offer_bank()
            return
        req = self.scheduler.request((self.source, self.face, self.preview_params()))
        if req is not None:
            self._start_preview(req)

    def _start_preview(self, req) -> None:
        source, face, params = req.params

        def fn(b, progress, cancel):
            out = b.edit(face, source.ws, params["captions"], params["strength"], params["method"],
                         params["identity_layers"], params["seed"])
            out.source = source
            return out

        self.submit("preview", fn, stamp=req.stamp)

    def _show_preview(self, out: EditOutcome, commit: bool) -> None:
        if self.source is None:
            return
        self._set_timing("preview", out.seconds)
        p = out.params
        caps = " | ".join(p.get("captions", []))
        source = getattr(out, "source", None) or self.source
        if source is not self.source:
            return  # made from a source that is no longer current (an apply or undo happened meanwhile)
        how = f" · {p['method']}" if p.get("method") else ""
        how += f" · lock {p['identity_layers']}" if p.get("identity_layers") is not None else ""
        short = caps if len(caps) <= 28 else caps[:27] + "…"
        n = len(p.get("captions", []))
        more = f" ({n} captions)" if n > 1 and len(caps) > 28 else ""  # two long sets that start alike differ here
        entry = HistoryEntry(f"“{short}”{more} @ {p.get('strength', 0):.2f}{how}", out.result.ws, out.result.image,
                             out.composed, out.result, p, source=source)
        self._live_entry = entry
        self._show_entry(entry)
        if commit and not self.captions.slider.isSliderDown():
            self._commit(entry)

    def _commit_current(self) -> None:
        entry = getattr(self, "_live_entry", None)
        # while a preview is still to be made (the slider was released right after a move), the shown step is an
        # older value: the coming preview commits itself
        if entry is not None and not self.scheduler.busy and not self._preview_timer.isActive():
            self._commit(entry)

    def _commit(self, entry: HistoryEntry) -> None:
        cur = self.history.current
        if cur is entry:
            return
        if cur is not None and cur.params == entry.params:
            return
        self._push(entry)
        self.settings.add_prompt(" | ".join(entry.params.get("captions", [])))
        self.captions.set_history(self.settings.prompt_history())
        self.history_panel.show_history(self.history)
        self._update_actions()

    def _push(self, entry: HistoryEntry) -> None:
        """A new history step; the earlier ones keep only the face region, not a copy of the whole photo each."""
        self.history.push(entry)
        if self.face is not None:
            region = self._face_region()
            for e in self.history.entries[:-1]:
                e.compact(self.face.photo.image, region)

    def _show_entry(self, entry: HistoryEntry) -> None:
        self.current_entry = entry
        if self.face is not None:
            if self.display == "crop":
                self.canvas.set_images(self.face.aligned, entry.face_image)
            else:
                composed = entry.composed  # read once: an old step rebuilds it on access
                self.canvas.set_images(self.face.photo.image, composed if composed is not None
                                       else self.face.photo.image, region=self._face_region())
        else:
            before = self.source.face_image if self.source is not None else entry.face_image
            self.canvas.set_images(before, entry.face_image)
        self._update_actions()

    def _face_region(self) -> tuple[float, float, float, float] | None:
        """Bounds (original pixels) of what pasting the current face back can change: the aligned crop's quad."""
        t = getattr(self.face, "transform", None)
        quad = getattr(t, "quad", None)
        if quad is not None:
            q = np.asarray(quad, float)
            return float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max())
        if isinstance(t, (tuple, list)) and len(t) == 4:  # a plain box
            return tuple(float(v) for v in t)
        return None

    def set_display(self, mode: str) -> None:
        self.display = mode or "photo"
        self.canvas.set_faces(self.photo.face_boxes() if self.photo and self.display == "photo" else [],
                              self.face.index if self.face else -1)
        entry = getattr(self, "current_entry", None)
        if entry is not None:
            self._show_entry(entry)
            self.canvas.fit()

    def set_view_mode(self, mode: str) -> None:
        self.canvas.set_view_mode(mode)
        {"after": self.act_after, "before": self.act_before, "wipe": self.act_wipe}[mode].setChecked(True)

    # ================================================================== refine
    def refine_current(self, steps: int | None = None) -> Job | None:
        """CLIP-guided refinement of the face shown (or the one picked in the gallery) toward the captions; the
        result becomes a new history entry that the next edits start from."""
        if self._defer_until_preview(lambda: self.refine_current(steps), "Refining"):
            return None
        entry = getattr(self, "current_entry", None)
        if entry is None and self.gallery.current() is not None:
            self.edit_generated(self.gallery.current())
            entry = self.current_entry
        if entry is None or self.engine_info is None:
            self.statusBar().showMessage("Nothing to refine: open a photo or generate a face first.", 5000)
            return None
        caps = self.captions.captions() or list(entry.params.get("captions") or entry.params.get("applied_captions")
                                                or getattr(entry.result, "captions", None) or [])
        if not caps:
            from core.errors import CaptionError

            show_error(self, CaptionError("Add at least one caption first: refinement moves the face toward it."))
            return None
        steps = int(steps or self.refine_steps.value())
        self.scheduler.invalidate()
        face, ws = self.face, entry.ws
        job = self.submit("refine", lambda b, progress, cancel: b.refine(face, ws, caps, steps, progress, cancel))
        job.refine_from = entry
        return job

    def _done_refine(self, job: Job, out: EditOutcome) -> None:
        if getattr(job, "refine_from", None) is not getattr(self, "current_entry", None):
            return  # the user moved on (another photo, undo) while it ran
        p = out.params
        before = out.result.extra.get("clip_similarity_before", 0.0)
        after = out.result.extra.get("clip_similarity_after", 0.0)
        entry = HistoryEntry(f"Refined with CLIP ({p['refine_steps']} steps)", out.result.ws, out.result.image,
                             out.composed, out.result, p)
        self._push(entry)
        self.source = entry  # the next edits start from the refined face
        self._live_entry = entry
        self.captions.set_strength(0.0, emit=False)  # the slider shows the edit on top of it: none yet
        self._show_entry(entry)
        self.history_panel.show_history(self.history)
        self._update_actions()
        self.statusBar().showMessage(f"Refined in {job.seconds:.1f} s: CLIP similarity {before:.3f} → {after:.3f}",
                                     8000)

    # ================================================================== undo / redo
    def apply_edit(self) -> None:
        """Make the current edit the starting point of the next ones (edits stack)."""
        if self._defer_until_preview(self.apply_edit, "Applying the edit"):
            return
        entry = getattr(self, "current_entry", None)
        if entry is None or entry.source is None:
            return
        self.scheduler.invalidate()
        caps = " | ".join(entry.params.get("captions", []))
        applied = HistoryEntry(f"Applied “{caps[:40]}”", entry.ws, entry.face_image, entry.composed, entry.result,
                               params={"captions": [], "strength": 0.0, "applied": True,
                                       "applied_captions": entry.params.get("captions", []),
                                       "applied_params": dict(entry.params)})
        self._push(applied)
        self.source = applied
        self._live_entry = applied
        self._show_entry(applied)
        self.captions.set_captions([], emit=False)
        self.history_panel.show_history(self.history)
        self._update_actions()
        self.statusBar().showMessage("Edit applied: the next captions edit this result.", 5000)

    def _restore(self, entry: HistoryEntry | None) -> None:
        if entry is None:
            return
        self._deferred_action = None  # an Apply / Refine waiting for a preview was about the step left
        self._preview_timer.stop()  # so was a slider move not previewed yet (it made a step that dropped the redo)
        self.source = entry.source if entry.source is not None else entry
        self.scheduler.invalidate()
        self._live_entry = entry
        self._show_entry(entry)
        if entry.params.get("captions"):
            self.captions.set_captions(entry.params["captions"], emit=False)
            self.captions.set_strength(entry.params.get("strength", 0.0), emit=False)
            # the panel shows what this step was made with, so the next slider move continues from it
            self.captions.set_edit_params(entry.params.get("method"), entry.params.get("identity_layers"))
        else:  # a starting (or applied) state is no edit: strength 0 matches the canvas; the captions stay for reuse
            self.captions.set_strength(0.0, emit=False)
        self.history_panel.show_history(self.history)
        self._update_actions()
        if getattr(self, "_deferred_export", None) is not None and not self.scheduler.busy:
            self._run_deferred_export()  # an export waiting for the preview just stopped: it writes what is shown

    def undo(self) -> None:
        if self.history.can_undo():
            self._restore(self.history.undo())

    def redo(self) -> None:
        if self.history.can_redo():
            self._restore(self.history.redo())

    def jump_history(self, index: int) -> None:
        if index != self.history.index:
            self._restore(self.history.jump(index))

    # ================================================================== generate
    def generate(self, n: int = 4, seed: int = 0) -> None:
        caps = self.captions.captions()
        if not caps:
            from core.errors import CaptionError

            show_error(self, CaptionError("Add at least one caption first.\nType a description such as "
                                          "“a smiling woman with red hair” and press Add."))
            return
        if self.needs_bank():
            self.offer_bank()
            return
        method = self.captions.method_key()
        self.settings.add_prompt(" | ".join(caps))
        self.captions.set_history(self.settings.prompt_history())
        self.tabs.setCurrentWidget(self.gallery)
        seed = min(seed, self.gallery.seed.maximum() - n + 1)  # every face's seed fits the seed box (to make it again)
        self.submit("generate", lambda b, progress, cancel: b.synthesize(caps, n, seed, method, 1.0, progress, cancel))

    def _done_generate(self, job: Job, results: list) -> None:
        self.gallery.set_results(results)
        # next press: new faces (the seed after the last one shown, whoever asked for these)
        self._seed_after([r.seed for r in results if getattr(r, "seed", None) is not None])
        self.statusBar().showMessage(f"{len(results)} faces in {job.seconds:.2f} s. Double-click one to edit it.", 6000)
        if self.photo is None and self.source is None and results:  # not while a face is being edited
            self.canvas.set_images(results[0].image, None, refit=True)

    def open_latent_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open latent", self.settings.output_dir, "AnyFace latents (*.npz)")
        if path:
            self.open_latent(path)

    def open_latent(self, path: str) -> None:
        if not self.confirm_discard("Open the latent"):
            return
        self.submit("latent", lambda b, progress, cancel: b.open_latent(str(path)))

    def _done_latent(self, job: Job, result) -> None:
        self.edit_generated(result, ask=False)
        if getattr(result, "captions", None):
            self.captions.set_captions(list(result.captions), emit=False)

    def _gallery_preview(self, row: int) -> None:
        """With nothing being edited, the canvas shows the face picked in the gallery."""
        if self.photo is None and self.source is None and 0 <= row < len(self.gallery.results):
            self.canvas.set_images(self.gallery.results[row].image, None, refit=True)

    def more_like(self, picked) -> None:
        caps = self.captions.captions() or list(getattr(picked, "captions", []) or [])
        n, seed, method = self.gallery.count.value(), self.gallery.seed.value(), self.captions.method_key()
        seed = min(seed, self.gallery.seed.maximum() - n + 1)
        job = self.submit("more", lambda b, progress, cancel: b.more_like(picked, caps, n, seed, method,
                                                                          progress=progress, should_cancel=cancel))
        job.picked = picked

    def _done_more(self, job: Job, results: list) -> None:
        self._done_generate(job, [job.picked] + list(results))  # the picked face stays, first
        seeds = [r.extra.get("variation_seed") for r in results if getattr(r, "extra", None)]
        if all(s is not None for s in seeds):  # the next "more like this" gives other variations
            self._seed_after(seeds)

    def _seed_after(self, seeds: list[int]) -> None:
        """The seed box moves past the last of ``seeds`` (wrapping to 0 past the box's maximum)."""
        if seeds:
            nxt = max(seeds) + 1
            self.gallery.seed.setValue(nxt if nxt <= self.gallery.seed.maximum() else 0)

    def edit_generated(self, result, ask: bool = True) -> None:
        if result is None or ask and not self.confirm_discard("Edit this face"):
            return
        self._photo_has_edits = False
        self._face_sessions = {}
        self._deferred_export = self._deferred_action = None
        self.scheduler.invalidate()
        self.photo, self.face = None, None
        self.canvas.set_faces([])
        self.face_combo_action.setVisible(False)
        first = self._face_entry(result, strength=0.0)
        title = first.label
        self.captions.set_strength(0.0, emit=False)  # what the canvas shows: the face as generated
        self.source = first
        self.history.reset(first)
        self.history_panel.show_history(self.history)
        self.canvas.set_images(result.image, result.image, refit=True)
        self.current_entry = first
        self.setWindowTitle(f"{title} — AnyFace Desktop")
        self._update_actions()
        self.tabs.setCurrentWidget(self.history_panel)
        self.statusBar().showMessage("Editing the generated face: change the captions or move the slider.", 6000)

    # ================================================================== export
    def _export_image(self, entry: HistoryEntry):
        if self.face is not None and self.display == "photo" and entry.composed is not None:
            return entry.composed
        return entry.face_image

    def _export_alpha(self, image: np.ndarray) -> dict:
        """The opened photo's transparency for an export of the whole photo (the worker re-attaches it, as the CLI
        and Batch do); nothing for a face crop or a photo without transparency."""
        photo = self.face.photo if self.face is not None else None
        alpha = getattr(photo, "alpha", None)
        if self.display != "photo" or alpha is None or image.shape[:2] != alpha.shape:
            return {}
        return dict(alpha=alpha, on_white=photo.image, straight=getattr(photo, "straight", None))

    @staticmethod
    def _face_entry(result, strength: float | None) -> HistoryEntry:
        """A face made without a photo (generated, a variation, a reopened latent) as a history state."""
        extra = getattr(result, "extra", None) or {}
        if extra.get("kind") == "edited":
            title = f"Edited face ({extra.get('file', 'latent')})"
        elif result.seed is None and extra.get("variation_of") is not None:
            title = f"Variation of seed {extra['variation_of']}"
        elif result.seed is None:
            title = f"Face ({extra.get('file', 'latent')})"
        else:
            title = f"Generated face (seed {result.seed})"
        return HistoryEntry(title, result.ws, result.image, None, result,
                            params={"captions": list(getattr(result, "captions", []) or []), "strength": strength,
                                    "seed": result.seed, "method": getattr(result, "method", "")})

    def _gallery_entry(self, result) -> HistoryEntry:
        """A generated face from the gallery as something to export (not made the face being edited)."""
        return self._face_entry(result, strength=None)

    def _is_gallery_entry(self, entry: HistoryEntry) -> bool:
        return entry is not getattr(self, "current_entry", None) and all(entry is not e for e in self.history.entries)

    def _export_entry(self) -> HistoryEntry | None:
        """What Export writes: the face being edited; with nothing being edited, the face picked in the gallery."""
        entry = getattr(self, "current_entry", None) or self.history.current
        if entry is None and self.photo is None and self.source is None and self.gallery.current() is not None:
            entry = self._gallery_entry(self.gallery.current())
        return entry

    def _suggest_path(self, fmt: str, entry: HistoryEntry | None = None) -> str:
        out = Path(self.settings.output_dir)
        seed = self._face_seed(entry) if entry is not None else None
        if self.photo and (entry is None or not self._is_gallery_entry(entry)):
            stem = Path(self.photo.path).stem + "_anyface"
        elif seed is not None:
            stem = f"anyface_seed{seed}"
        else:
            stem = "anyface_face"
        i = 1
        while True:  # free in every format and for the latent: an image and its .npz share their name
            p = out / f"{stem}_{i:03d}.{fmt}"
            if not any(p.with_suffix(f".{ext}").exists() for ext in ("png", "jpg", "jpeg", "webp", "npz", fmt)):
                return str(p)
            i += 1

    def quick_export(self) -> None:
        entry = self._export_entry()
        if entry is None:
            return
        o = self.settings.export_options()
        self.export_to(dict(path=self._suggest_path(o["fmt"], entry), fmt=o["fmt"], size=o["size"] or None,
                            quality=o["quality"], save_latent=o["save_latent"], unique=True),
                       entry if self._is_gallery_entry(entry) else None)

    def export_as(self, entry: HistoryEntry | None = None) -> None:
        """The Export dialog for ``entry`` (default: what Export writes, see ``_export_entry``)."""
        entry = entry if isinstance(entry, HistoryEntry) else self._export_entry()
        if entry is None:
            return
        img = self._export_image(entry)
        retry, self._retry_export_path = getattr(self, "_retry_export_path", None), None
        dlg = ExportDialog(self.settings, retry or self._suggest_path(self.settings.export_options()["fmt"], entry),
                           max(img.shape[:2]), self)
        self._export_dialog = dlg
        keep = entry if self._is_gallery_entry(entry) else None  # else: what is shown when the dialog is accepted
        dlg.accepted.connect(lambda: self.export_to(dlg.options(), keep))
        dlg.open()

    def _face_seed(self, entry: HistoryEntry) -> int | None:
        """The seed of the generated face ``entry`` shows: its own for a gallery face, the history start's for an
        edit of one (an edit's own "seed" is the preview's sampling seed, 0), None for photos."""
        if self._is_gallery_entry(entry):
            return entry.params.get("seed")
        root = self._root()
        return None if self.face is not None or root is None else root.params.get("seed")

    def _export_request(self, entry: HistoryEntry, opts: dict):
        from anyface_desktop.export import ExportRequest

        p = entry.params
        if p.get("applied"):  # an applied step shows the edit it applied: export that edit's captions and settings
            p = dict(p.get("applied_params") or {"captions": p.get("applied_captions", [])})
        root = self._root()
        root_kind = (getattr(getattr(root, "result", None), "extra", None) or {}).get("kind")
        from_photo = not self._is_gallery_entry(entry) and (self.face is not None or root_kind == "edited")
        image = self._export_image(entry)
        return ExportRequest(path=opts["path"], image=image, **self._export_alpha(image), fmt=opts.get("fmt", "png"),
                             quality=int(opts.get("quality", 92)), size=opts.get("size"),
                             save_latent=bool(opts.get("save_latent", True)), ws=entry.ws,
                             captions=list(p.get("captions", [])), method=str(p.get("method", "")),
                             strength=p.get("strength"), seed=self._face_seed(entry),
                             pack=self.engine_info.pack_id if self.engine_info else self.pack_id,
                             edited=from_photo, inputs=[self.photo.path] if self.photo else [],
                             unique=bool(opts.get("unique", False)), identity_layers=p.get("identity_layers"),
                             steps=self._steps_to(entry), variation_of=self._variation_of(entry),
                             bank=(getattr(getattr(entry, "result", None), "extra", None) or {}).get("bank"))

    def _steps_to(self, entry: HistoryEntry) -> list[str]:
        """The history's labels from its start to ``entry`` (a refine or an applied edit on the way shows there). A
        preview not (yet) in the history, e.g. shown while the slider is held, gets the steps its commit will give:
        those up to the current step, then its own."""
        entries = list(self.history.entries)
        if self._is_gallery_entry(entry):
            return [entry.label]

        def upto(target) -> list[str] | None:
            i = next((i for i, e in enumerate(entries) if e is target), None)
            return None if i is None else [e.label for e in entries[:i + 1]]

        steps = upto(entry)
        if steps is None:
            steps = (upto(self.history.current) or []) + [entry.label]
        return steps

    def _variation_of(self, entry: HistoryEntry) -> int | None:
        """The seed a "More like this" variation was made from (its own seed is None: it cannot be remade alone)."""
        start = entry if self._is_gallery_entry(entry) else self._root()
        extra = getattr(getattr(start, "result", None), "extra", None) or {}
        return extra.get("variation_of")

    def _run_deferred_export(self) -> None:
        """An export (or Apply, Refine) asked for while a preview was on its way: now that none is, do it on what is
        shown."""
        if self.scheduler.busy:
            return  # the next preview's end runs them
        opts, self._deferred_export = getattr(self, "_deferred_export", None), None
        action, self._deferred_action = getattr(self, "_deferred_action", None), None
        if opts is not None or action is not None:
            self._commit_current()
        if opts is not None:
            self.export_to(opts)
        if action is not None:
            action()

    def _defer_until_preview(self, action, what: str) -> bool:
        """True (and ``action`` is run once the preview is shown) while the slider's last move is still being
        previewed: Apply or Refine pressed right after a move act on the value the slider shows, not the one before."""
        if self._preview_timer.isActive() or self.scheduler.busy:
            self._deferred_action = action
            self.statusBar().showMessage(f"{what} as soon as the preview is ready…", 4000)
            return True
        return False

    def export_to(self, opts: dict, entry: HistoryEntry | None = None):
        """Export ``entry`` (default: what Export writes). While a preview is still being made (the slider was just
        released), the export waits for it: the file is what the canvas ends up showing."""
        if entry is None and (self._preview_timer.isActive() or self.scheduler.busy):
            self._deferred_export = opts
            self.statusBar().showMessage("Exporting as soon as the preview is ready…", 4000)
            return None
        entry = entry or self._export_entry()
        if entry is None:
            return None
        req = self._export_request(entry, opts)
        job = self.submit("export", lambda b, progress, cancel: b.export(req))
        job.entry = entry
        job.typed_path = None if opts.get("unique") else opts.get("path")  # offered again if the write fails
        return job

    def export_gallery(self, folder: str | None = None):
        """Save every face of the gallery into ``folder`` (asked for when None) as ``anyface_seed<seed>.<fmt>``, with
        the export settings (format, size, quality, latent); an existing file is never replaced (``-1``, ``-2``...)."""
        results = list(self.gallery.results)
        if not results:
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Save all faces to", self.settings.output_dir)
            if not folder:
                return None
        o = self.settings.export_options()
        fmt = o["fmt"]
        opts = dict(fmt=fmt, size=o["size"] or None, quality=o["quality"], save_latent=o["save_latent"],
                    unique=True)  # export_image takes the free name on the worker
        reqs = []
        for i, r in enumerate(results):
            name = f"anyface_seed{r.seed}.{fmt}" if getattr(r, "seed", None) is not None else f"anyface_face_{i + 1:03d}.{fmt}"
            reqs.append(self._export_request(self._gallery_entry(r), dict(opts, path=str(Path(folder) / name))))

        def save_all(b, progress, cancel):
            from core.errors import CancelledError

            written = []
            for k, req in enumerate(reqs):
                if cancel():
                    raise CancelledError(f"Saving cancelled after {k} of {len(reqs)} faces.")
                written.append(b.export(req))
                progress(k + 1, len(reqs))
            return written

        return self.submit("exportall", save_all)

    def _done_exportall(self, job: Job, written: list) -> None:
        self.last_export = written[-1] if written else None
        folder = Path(written[0].image_path).parent if written else ""
        self.statusBar().showMessage(f"Saved {len(written)} faces to {folder}", 8000)

    def _root(self) -> HistoryEntry | None:
        """The state the current history started from (the photo's face as inverted, or a generated face); the
        history never drops it (``keep_first``)."""
        return self.history.entries[0] if self.history.entries else None

    def unexported_edit(self) -> bool:
        """What is shown holds an edit (a step after the history's start, or another face's edit kept in the photo)
        that was not exported as it is."""
        cur = getattr(self, "current_entry", None)
        if cur is None or cur is self._root() and not self._other_faces_edited():
            return False
        saved = getattr(self, "_exported_entry", None)
        return not (saved is cur or saved is not None and saved.params == cur.params and saved.source is cur.source
                    and torch_equal(saved.ws, cur.ws))

    def _other_faces_edited(self) -> bool:
        """Another face of the photo shows an edit now (its History is not at its start): it is in the photo."""
        if not getattr(self, "_photo_has_edits", False):
            return False
        for index, session in self._face_sessions.items():
            if self.face is not None and index == self.face.index:
                continue  # a switch away from it did not happen: it is the face being edited
            entries, cur = session["history"].entries, session["current"]
            if cur is not None and entries and cur is not entries[0]:
                return True
        return False

    def confirm_discard(self, action: str) -> bool:
        """Before an edit that was not exported is replaced: ask (Settings can turn the question off)."""
        if not bool(self.settings.get("ask_before_discard")) or not self.unexported_edit():
            return True
        answer = QMessageBox.question(
            self, "Edit not exported", f"The edit shown has not been exported.\n{action} and discard it?",
            QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Discard

    def _done_export(self, job: Job, res) -> None:
        self.last_export = res
        if getattr(job, "entry", None) is not None:
            self._exported_entry = job.entry
        msg = f"Exported {res.image_path}" + (f" and {Path(res.latent_path).name}" if res.latent_path else "")
        self.statusBar().showMessage(msg, 8000)

    # ================================================================== batch / models / settings
    def _on_dropped(self, paths: list[str]) -> None:
        """A drop: the first photo is opened (or else the first latent); a folder opens Batch on it. Anything
        left out is said in the status bar."""
        from core.batch import IMAGE_SUFFIXES

        photos = [p for p in paths if Path(p).suffix.lower() in IMAGE_SUFFIXES or not Path(p).suffix
                  and Path(p).is_file()]
        latents = [p for p in paths if Path(p).suffix.lower() == ".npz"]
        folders = [p for p in paths if Path(p).is_dir()]
        if photos:
            opened = photos[0]
            self.open_photo(opened)
        elif latents:
            opened = latents[0]
            self.open_latent(opened)
        elif folders:
            opened = folders[0]
            self.open_batch()
            self.batch_dialog.input.setText(opened)
        else:
            return
        self._drop_note = None
        if len(paths) > 1:
            text = (f"{len(paths)} items dropped: opened {Path(opened).name}; one photo is edited at a time"
                    + (" (Batch edits a whole folder)." if len(photos) > 1 or folders else "."))
            self._drop_note = (str(opened), text)  # said again once that photo's face is ready
            self.statusBar().showMessage(text, 10000)

    def open_batch(self) -> None:
        from anyface_desktop.batch_dialog import BatchDialog

        if self.batch_dialog is None:
            self.batch_dialog = BatchDialog(self)
        self.batch_dialog.prefill(self.captions.captions(), self.captions.strength(), self.captions.method_key(),
                                  self.captions.identity_layers(), self.settings.output_dir)
        self.batch_dialog.show()
        self.batch_dialog.raise_()

    def run_batch(self, batch_job) -> Job:
        self.host.backend.last_batch_report = None  # a batch cancelled before it starts has no report (not the last)
        return self.submit("batch", lambda b, progress, cancel: b.run_batch(batch_job, progress, cancel))

    def _done_batch(self, job: Job, report) -> None:
        if self.batch_dialog is not None:
            self.batch_dialog.job_done(report)

    def open_model_manager(self) -> None:
        from anyface_desktop.model_manager import ModelManager

        if self.model_manager is None:
            self.model_manager = ModelManager(self.pack_id, self)
            self.model_manager.packChosen.connect(self.use_pack)
            self.model_manager.bankRequested.connect(lambda *_: self.build_bank_dialog())
            self.model_manager.bankDeleted.connect(lambda pid: pid == self.pack_id and self.load_engine(force=True))
        self.model_manager.refresh()
        self.model_manager.show()
        self.model_manager.raise_()

    def use_pack(self, pack: str) -> None:
        """Load another model pack. Faces, edits and generated faces live in one pack's W space: they are closed
        (after asking about an unexported edit), and an open photo is opened again with the new pack."""
        if pack != self.pack_id and not self.confirm_discard("Switch the model pack"):
            return
        reopen = str(self.photo.path) if self.photo is not None and pack != self.pack_id else None
        same = pack == self.pack_id
        if not same:
            self._clear_work()
        self.pack_id = pack
        self.settings.set("pack", pack)
        self.pack_label.setText(f"Pack: {pack}")
        self._reopen_after_load = reopen
        self.load_engine(force=same)  # the pack in use, picked again: read its files again (one may be replaced)

    def _clear_work(self) -> None:
        """Close the photo, its face and history, and the gallery (codes of another pack mean nothing here)."""
        self.scheduler.invalidate()
        self.host.cancel(kind="invert")
        self.host.cancel(kind="preview")
        self.photo = self.face = self.source = None
        self.current_entry = self._live_entry = None
        self._photo_has_edits = False
        self._face_sessions = {}
        self._deferred_export = self._deferred_action = None
        self.history.reset()
        self.history_panel.show_history(self.history)
        self.gallery.set_results([])
        self.canvas.clear()
        self.face_combo.clear()
        self.face_combo_action.setVisible(False)
        self.setWindowTitle("AnyFace Desktop")
        self._update_actions()

    def open_settings(self) -> None:
        from core.device import available_devices

        dlg = SettingsDialog(self.settings, available_devices(), self, current_device=self.device_pref)
        if dlg.exec():
            changed = dlg.apply()
            if "device" in changed:
                self.device_pref = changed["device"]
                self.load_engine()  # the backend reloads the pack on the new device, on the worker thread
            elif "tier" in changed or "detector" in changed:
                det, tier = self.settings.detector, self.settings.tier
                self.submit("warm-up", lambda b, progress, cancel: (b.warm_up(det), b.warm_up_engine(tier)))
                if self.face is not None:
                    if "tier" in changed:
                        self.canvas.pick_single = True  # so the advice below works on a photo with one face
                    self.statusBar().showMessage(
                        "The open face keeps its detection and inversion: the new settings apply to the next photo "
                        + ("(or click the face to invert it again)." if "tier" in changed else "opened."), 12000)

    # ================================================================== window
    def dragEnterEvent(self, e):  # noqa: N802
        self.canvas.dragEnterEvent(e)

    def dropEvent(self, e):  # noqa: N802
        self.canvas.dropEvent(e)

    def closeEvent(self, e):  # noqa: N802
        if not self._closing and not self.confirm_discard("Close AnyFace Desktop"):
            e.ignore()
            return
        self._closing = True
        t0 = time.perf_counter()
        self._preview_timer.stop()
        if self.model_manager is not None:
            self.model_manager.shutdown()
        if self.batch_dialog is not None:
            self.batch_dialog.close()
        self.host.shutdown()
        log.debug("worker stopped in %.2f s", time.perf_counter() - t0)
        try:
            self.settings.set("window/geometry", self.saveGeometry())
            self.settings.sync()
        except Exception:  # noqa: BLE001
            pass
        super().closeEvent(e)


def _image_filter() -> str:
    """The Open dialog's filters: every photo type the app reads (either case: Qt matches names as written on some
    platforms), then all files (the reader goes by content, so a photo with a wrong extension opens too)."""
    from core.batch import IMAGE_SUFFIXES

    pats = sorted({f"*{s}" for s in IMAGE_SUFFIXES} | {f"*{s.upper()}" for s in IMAGE_SUFFIXES},
                  key=lambda p: (p.lower(), p.isupper()))
    return f"Images ({' '.join(pats)});;All files (*)"


def torch_equal(a, b) -> bool:
    try:
        import torch

        return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
    except Exception:  # noqa: BLE001
        return False


def _open_photo_any_faces(b: Backend, path: str, detector: str) -> PhotoState:
    """Open a photo; a photo with no face is still shown (the GUI explains), so NoFaceFoundError is caught here."""
    from core.errors import NoFaceFoundError

    try:
        return b.open_photo(path, detector)
    except NoFaceFoundError:
        return PhotoState(path=str(path), image=b.read_image(path), faces=[])


def _paste_mask(transform, shape: tuple[int, int]) -> np.ndarray | None:
    """Bool [H, W]: where pasting a face back with ``transform`` can change pixels (core.align.warped_mask), or its box
    for a plain (x0, y0, x1, y1) transform; None when there is neither."""
    if hasattr(transform, "image_size") and hasattr(transform, "output_size"):
        from core.align import warped_mask

        if tuple(transform.image_size) != tuple(shape):
            return None
        return warped_mask(transform) > 0
    if isinstance(transform, (tuple, list)) and len(transform) == 4:
        h, w = shape
        x0, y0, x1, y1 = transform
        m = np.zeros((h, w), bool)
        m[max(0, int(y0)):min(h, int(np.ceil(y1))), max(0, int(x0)):min(w, int(np.ceil(x1)))] = True
        return m
    return None
