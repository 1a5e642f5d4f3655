"""Model manager: packs, file status (present / missing / corrupt), verify sha256, import and download files.

Hashing, copying and downloading run on the manager's own worker thread (no engine there), with progress and
cancel; the GUI thread only reads the manifest and stats files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QListWidget,
                               QListWidgetItem, QMessageBox, QProgressBar, QPushButton, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from anyface_desktop.dialogs import show_error
from anyface_desktop.worker import WorkerHost
from core import weights
from core.atomic import mkstemp_beside

STATE_COLORS = {"present": QColor(40, 150, 70), "unverified": QColor(150, 120, 20), "missing": QColor(190, 60, 50),
                "corrupt": QColor(190, 60, 50)}
STATE_TEXT = {"present": "✔ present (verified)", "unverified": "● present (not verified yet)", "missing": "✘ missing",
              "corrupt": "✘ corrupt", "optional": "– not installed (optional)"}


def import_weight_file(wf: weights.WeightFile, src: str, progress=None, should_cancel=None) -> Path:
    """Verify ``src`` against the manifest entry, then copy it atomically to where the app looks for it."""
    from core.download import weight_destination

    src_p = Path(src)
    weights.verify_file(wf, src_p, progress, should_cancel, use_cache=False)
    dest = weight_destination(wf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and os.path.samefile(dest, src_p):
        return dest
    fd, tmp = mkstemp_beside(dest, suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src_p, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if wf.sha256 is None and weights.pinned_sha256(wf) is None:
        weights.pin_sha256(wf, weights.sha256_file(dest))
    return dest


class ModelManager(QDialog):
    packChosen = Signal(str)
    bankRequested = Signal(str)  # pack id; the main window's worker (which owns the engine) builds it
    bankDeleted = Signal(str)  # pack id whose built bank was deleted (the engine reloads its own)

    def __init__(self, current_pack: str = "tiny", parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.resize(1040, 560)
        self.current_pack = current_pack
        self.host = WorkerHost(None, name="AnyFace model files", parent=self)
        self.host.worker.result.connect(self._on_result)
        self.host.worker.failed.connect(self._on_failed)
        self.host.worker.cancelled.connect(self._on_cancelled)
        self.host.worker.progress.connect(self._on_progress)
        self.host.worker.finished.connect(self._on_finished)
        self.job = None
        self.statuses: list = []

        lay = QVBoxLayout(self)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setTextFormat(Qt.TextFormat.RichText)
        self.banner.setOpenExternalLinks(True)
        lay.addWidget(self.banner)
        split = QSplitter()
        self.packs = QListWidget()
        self.packs.setMinimumWidth(240)
        self.packs.setWordWrap(True)
        self.packs.setSpacing(2)
        self.packs.currentRowChanged.connect(lambda *_: self._show_pack())
        split.addWidget(self.packs)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        self.description = QLabel()
        self.description.setWordWrap(True)
        rl.addWidget(self.description)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["File", "Role", "State", "Where / what to do"])
        self.table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(False)
        rl.addWidget(self.table, 1)
        brow = QHBoxLayout()  # a KNN bank built on this machine replaces the pack's own: said, and removable
        self.bank_note = QLabel()
        self.bank_note.setWordWrap(True)
        self.bank_delete_btn = QPushButton("Delete built bank")
        self.bank_delete_btn.setToolTip("Remove the KNN bank built on this machine for this pack; the pack's own "
                                        "bank (if it has one) is used again")
        self.bank_delete_btn.clicked.connect(self.delete_built_bank)
        brow.addWidget(self.bank_note, 1)
        brow.addWidget(self.bank_delete_btn)
        rl.addLayout(brow)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([330, 710])
        lay.addWidget(split, 1)
        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.hide()
        self.verify_btn = QPushButton("Verify (sha256)")
        self.verify_btn.clicked.connect(self.verify)
        self.import_btn = QPushButton("Import files…")
        self.import_btn.clicked.connect(self.import_files)
        self.download_btn = QPushButton("Download missing")
        self.download_btn.clicked.connect(self.download_missing)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.cancel_btn.setEnabled(False)
        self.bank_btn = QPushButton("Build KNN bank…")
        self.bank_btn.setToolTip("Text-to-face for the pack in use without any trained model: sample the generator "
                                 "once and index the faces with CLIP")
        self.bank_btn.clicked.connect(lambda: self.bankRequested.emit(self.current_pack))
        self.delete_btn = QPushButton("Delete import")
        self.delete_btn.setToolTip("Remove the imported file selected in the table (its copy in your data folder and "
                                   "its registration); the file you imported from is not touched")
        self.delete_btn.clicked.connect(self.delete_selected)
        self.delete_btn.setEnabled(False)
        self.table.itemSelectionChanged.connect(self._update_delete)
        self.use_btn = QPushButton("Use this pack")
        self.use_btn.clicked.connect(self._use)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        row.addWidget(self.progress, 1)
        for b in (self.verify_btn, self.import_btn, self.download_btn, self.delete_btn, self.cancel_btn, self.bank_btn,
                  self.use_btn, close):
            row.addWidget(b)
        lay.addLayout(row)
        self.refresh()

    # ------------------------------------------------------------------ state
    def pack_id(self) -> str | None:
        item = self.packs.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def refresh(self) -> None:
        self.manifest = weights.Manifest.load()
        usable = set(weights.usable_packs(self.manifest))
        keep = self.pack_id() or self.current_pack
        self.packs.clear()
        for pid, info in self.manifest.packs.items():
            mark = "✔" if pid in usable else ("—" if info.resolution <= 0 else "✘")
            item = QListWidgetItem(f"{mark}  {info.title}")
            item.setData(Qt.ItemDataRole.UserRole, pid)
            item.setToolTip(info.description)
            self.packs.addItem(item)
            if pid == keep:
                self.packs.setCurrentItem(item)
        if self.packs.currentItem() is None and self.packs.count():
            self.packs.setCurrentRow(0)
        if not usable:
            self.banner.setText(
                "<b>No model pack is ready to use.</b> The app needs one pack whose files are all present.<br>"
                "• The bundled <b>tiny</b> pack: run <code>make pack</code> (or <code>python -m training.build_pack "
                "--out resources/weights/tiny</code>).<br>"
                "• The official FFHQ packs: get the files listed on the right (see the README, Models) and press "
                "<b>Import files…</b>, or <b>Download missing</b> when online.")
            self.banner.setStyleSheet("QLabel { background: rgba(200, 120, 40, 40); padding: 8px; border-radius: 4px; }")
        else:
            self.banner.setText(f"Ready: {', '.join(sorted(usable))}. Current pack: <b>{self.current_pack}</b>.")
            self.banner.setStyleSheet("")
        self._show_pack()

    def _show_pack(self, statuses=None) -> None:
        pid = self.pack_id()
        if pid is None:
            return
        info = self.manifest.packs[pid]
        self.description.setText(info.description)
        self.statuses = statuses if statuses is not None else weights.pack_status(pid, manifest=self.manifest)
        self.table.setRowCount(len(self.statuses))
        for r, s in enumerate(self.statuses):
            wf = s.file
            what = str(s.path) if s.path else f"get it from: {wf.where_to_get()}"
            state = s.state
            if state == "missing" and wf.optional:
                state = "optional"
            if s.state == "corrupt":
                what = f"{s.path}: {s.detail}"
            cells = [f"{wf.file_name}" + (" (optional)" if wf.optional else ""), wf.role, STATE_TEXT.get(state, state),
                     what]
            for c, text in enumerate(cells):
                it = QTableWidgetItem(text)
                it.setToolTip(f"{wf.id}\n{text}\nlicense: {wf.license}\n{s.detail}")
                if c == 2:
                    it.setForeground(STATE_COLORS.get(state, QColor(120, 120, 120)))
                self.table.setItem(r, c, it)
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        present = any(s.path for s in self.statuses)
        self.verify_btn.setEnabled(present and self.job is None)
        self.download_btn.setEnabled(self.job is None and any(s.state == "missing" and s.file.url for s in self.statuses))
        self.bank_btn.setEnabled(pid == self.current_pack)
        self.use_btn.setEnabled(info.resolution > 0 and pid in weights.usable_packs(self.manifest)
                                and pid != self.current_pack)
        if hasattr(self, "delete_btn"):
            self._update_delete()
        self._show_built_bank(pid)

    def _show_built_bank(self, pid: str) -> None:
        from core.engine import bank_cache_path

        path = bank_cache_path(pid)
        built = path.is_file()
        self.bank_note.setText(f"A KNN bank built on this machine ({path.stat().st_size / 2**20:.1f} MiB, {path}) is "
                               "used in place of the pack's own." if built else "")
        self.bank_note.setVisible(built)
        self.bank_delete_btn.setVisible(built)
        self.bank_delete_btn.setEnabled(built and self.job is None)

    def delete_built_bank(self) -> None:
        from core.engine import bank_cache_path

        pid = self.pack_id()
        path = bank_cache_path(pid) if pid else None
        if path is None or not path.is_file():
            return
        answer = QMessageBox.question(self, "Delete built bank", f"Delete the KNN bank built on this machine for "
                                      f"{pid} ({path})? The pack's own bank, if it has one, is used again.",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return
        try:
            path.unlink()
        except OSError as e:
            show_error(self, e)
            return
        self.bankDeleted.emit(pid)
        self.refresh()

    def _selected_import(self):
        """The imported file (core.packs.import_file) selected in the table, or None."""
        rows = {i.row() for i in self.table.selectedItems()}
        if len(rows) != 1:
            return None
        s = self.statuses[rows.pop()] if self.statuses else None
        return s.file if s is not None and s.file.id.startswith("imported-") else None

    def _update_delete(self) -> None:
        wf = self._selected_import()
        in_use = wf is not None and wf.pack == self.current_pack
        self.delete_btn.setEnabled(self.job is None and wf is not None and not in_use)
        self.delete_btn.setToolTip("A file of the pack in use cannot be deleted: use another pack first" if in_use
                                   else "Remove the imported file selected in the table (its copy in your data folder "
                                        "and its manifest entry); the file you imported it from is not touched")

    def delete_selected(self) -> None:
        wf = self._selected_import()
        if wf is None:
            return
        answer = QMessageBox.question(self, "Delete import", f"Delete the imported {wf.file_name} ({wf.id}) from "
                                      f"your data folder? The file you imported it from is not touched.",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return
        from core.packs import delete_imported

        try:
            delete_imported(wf.id)
        except Exception as e:  # noqa: BLE001 - shown, never raised into Qt
            from anyface_desktop.dialogs import show_error

            show_error(self, e)
            return
        self.refresh()
        self.table.clearSelection()  # the next row is not picked for a second delete
        self._update_delete()

    # ------------------------------------------------------------------ jobs
    def _start(self, kind: str, fn) -> None:
        self.job = self.host.submit(kind, fn)
        self.progress.setRange(0, 0)
        self.progress.show()
        self.cancel_btn.setEnabled(True)
        for b in (self.verify_btn, self.import_btn, self.download_btn, self.delete_btn):
            b.setEnabled(False)

    def verify(self) -> None:
        pid = self.pack_id()
        if pid is None:
            return
        manifest = self.manifest
        self._start("verify", lambda _b, progress, cancel: weights.pack_status(
            pid, manifest=manifest, verify=True, progress=progress, should_cancel=cancel))

    def import_files(self) -> None:
        pid = self.pack_id()
        paths, _ = QFileDialog.getOpenFileNames(self, "Import model files", str(Path.home()),
                                                "Model files (*.safetensors *.pt *.pth *.pkl *.npz *.bin);;All files (*)")
        if paths:
            self.import_paths(pid, paths)

    def import_paths(self, pid: str, paths: list[str]) -> None:
        """Files named like a file of the selected pack are verified and copied in place; anything else goes to
        core.packs.import_file (official NVIDIA/rosinality/OpenAI files: identified by sha256, generators
        converted once to safetensors, registered in the user's manifest)."""
        files = {wf.file_name: wf for wf in self.manifest.pack_files(pid)} if pid else {}
        jobs = [(files.get(Path(p).name), p) for p in paths]

        def fn(_b, progress, cancel):
            done = []
            for wf, p in jobs:
                if wf is not None:
                    done.append(str(import_weight_file(wf, p, progress, cancel)))
                else:
                    from core.packs import import_file

                    r = import_file(p, progress=progress, should_cancel=cancel)
                    done.append(f"{Path(p).name} -> {getattr(r, 'pack', '?')} ({getattr(r, 'id', '')})")
            return done

        if jobs:
            self._start("import", fn)

    def download_missing(self) -> None:
        from core.download import download_weight

        todo = [s.file for s in self.statuses if s.state == "missing" and s.file.url]

        def fn(_b, progress, cancel):
            return [str(download_weight(wf, progress=progress, should_cancel=cancel)) for wf in todo]

        self._start("download", fn)

    def cancel(self) -> None:
        if self.job is not None:
            self.host.cancel(self.job)

    def _on_progress(self, job, done, total) -> None:
        if job is self.job and total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * done / total))
            self.progress.setFormat(f"{job.kind}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB")

    def _on_result(self, job, value) -> None:
        if job.kind == "verify":
            self._show_pack(value)
            bad = [s for s in value if s.state in ("corrupt", "missing") and not s.file.optional]
            self.banner.setText("All files verified." if not bad else
                                f"{len(bad)} file(s) missing or corrupt: {', '.join(s.file.file_name for s in bad)}")
        else:
            self.refresh()
            if job.kind == "import":
                text = "Imported: " + "; ".join(Path(v).name if "/" in v else v for v in value)
                import re

                from core.weights import pack_status

                for pid in sorted({m.group(1) for v in value for m in [re.search(r" -> (\S+) \(", v)] if m}
                                  | ({self.pack_id()} if self.pack_id() else set())):
                    try:
                        missing = [st.file.file_name for st in pack_status(pid) if st.state == "missing"
                                   and not st.file.optional]
                    except Exception:  # noqa: BLE001 - the note is a courtesy
                        missing = []
                    if missing:  # e.g. a generator imported without its CLIP: the pack cannot be used yet
                        text += (f". The pack <b>{pid}</b> still needs: {', '.join(missing)} (import it too, or "
                                 "Download missing with internet)")
                self.banner.setText(text)

    def _on_failed(self, job, exc, tb) -> None:
        self.banner.setText(f"{job.kind.capitalize()} failed (see the message).")  # not the last job's news
        show_error(self, exc, tb)

    def _on_cancelled(self, job) -> None:
        self.progress.setFormat(f"{job.kind} cancelled")
        self.banner.setText(f"{job.kind.capitalize()} cancelled.")  # the progress bar hides at once

    def _on_finished(self, job) -> None:
        if job is self.job:
            self.job = None
            self.progress.hide()
            self.cancel_btn.setEnabled(False)
            self.import_btn.setEnabled(True)
            self._show_pack(self.statuses)
            self._update_delete()

    def _use(self) -> None:
        pid = self.pack_id()
        if pid:
            self.current_pack = pid
            self.packChosen.emit(pid)
            self.refresh()

    def shutdown(self) -> None:
        self.host.shutdown()

    def closeEvent(self, e):  # noqa: N802
        self.cancel()
        super().closeEvent(e)

    def reject(self) -> None:  # Escape: like closing the window, a running verify or download stops
        self.cancel()
        super().reject()
