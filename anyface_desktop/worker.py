"""The worker: a QObject living on a QThread that owns the backend (and so the engine).

Widgets post ``Job`` s through ``WorkerHost.submit``; the job's function runs on the worker thread as
``fn(backend, progress, should_cancel)``. The worker catches every exception and emits ``failed``; a
cancelled job emits ``cancelled`` and never ``result``. ``finished`` is always the last signal of a job.
Cancellation is cooperative: ``WorkerHost.cancel`` sets the job's event from the GUI thread and the core
function sees it through ``should_cancel()``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from core.errors import CancelledError

log = logging.getLogger("anyface.worker")

JobFn = Callable[[Any, Callable[[int, int], None], Callable[[], bool]], Any]
_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    kind: str
    fn: JobFn
    stamp: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    cancel_event: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    seconds: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class EngineWorker(QObject):
    """Runs jobs one at a time on its thread. Signals carry the Job so the GUI can match stamps."""

    started = Signal(object)  # Job
    progress = Signal(object, int, int)  # Job, done, total
    result = Signal(object, object)  # Job, value
    failed = Signal(object, object, str)  # Job, exception, traceback text
    cancelled = Signal(object)  # Job
    finished = Signal(object)  # Job (always last)

    PROGRESS_INTERVAL = 0.05  # s; do not flood the GUI event loop with progress events

    def __init__(self, backend: Any):
        super().__init__()
        self.backend = backend

    @Slot(object)
    def run(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        try:
            if job.cancelled:
                self.cancelled.emit(job)
                return
            self.started.emit(job)
            last = [0.0]

            def progress(done: int, total: int) -> None:
                now = time.perf_counter()
                if done >= total or now - last[0] >= self.PROGRESS_INTERVAL:
                    last[0] = now
                    self.progress.emit(job, int(done), int(total))

            value = job.fn(self.backend, progress, lambda: job.cancel_event.is_set())
            job.seconds = time.perf_counter() - job.started_at
            if job.cancelled:
                self.cancelled.emit(job)
            else:
                self.result.emit(job, value)
        except CancelledError:
            job.seconds = time.perf_counter() - job.started_at
            self.cancelled.emit(job)
        except BaseException as exc:  # noqa: BLE001 - the worker never dies, every failure is reported
            job.seconds = time.perf_counter() - job.started_at
            tb = traceback.format_exc()
            log.warning("job %s failed: %s", job.kind, exc)
            if job.cancelled:
                self.cancelled.emit(job)
            else:
                self.failed.emit(job, exc, tb)
        finally:
            self.finished.emit(job)


class _PythonThread(QThread):
    """A QThread whose event loop runs inside a Python ``run()``: the thread keeps ONE Python thread state for
    its whole life. With the default C++ ``run()``, PySide creates and deletes a thread state around every
    slot call, and pybind11 extensions that cache it (dlib) crash on the next call (seen: a segfault in
    dlib's detector on the second job)."""

    def run(self) -> None:  # noqa: D401
        self.exec()


class WorkerHost(QObject):
    """GUI-thread handle of one worker thread: submit, cancel, and a clean shutdown."""

    _post = Signal(object)
    busy_changed = Signal(bool)

    def __init__(self, backend: Any, name: str = "AnyFace worker", parent: QObject | None = None):
        super().__init__(parent)
        self.thread = _PythonThread()
        self.thread.setObjectName(name)
        self.worker = EngineWorker(backend)
        self.worker.moveToThread(self.thread)
        self._post.connect(self.worker.run)
        self.worker.finished.connect(self._on_finished)
        self.active: dict[int, Job] = {}
        self._closed = False
        self.thread.start()

    @property
    def backend(self):
        return self.worker.backend

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def submit(self, kind: str, fn: JobFn, stamp: int = 0) -> Job:
        job = Job(kind, fn, stamp)
        if self._closed:
            job.cancel_event.set()
            return job
        was_busy = self.busy
        self.active[job.id] = job
        self._post.emit(job)
        if not was_busy:
            self.busy_changed.emit(True)
        return job

    def cancel(self, job: Job | None = None, kind: str | None = None) -> None:
        """Cancel one job, every job of a kind, or (no arguments) everything."""
        for j in list(self.active.values()):
            if job is None and kind is None or j is job or (kind is not None and j.kind == kind):
                j.cancel_event.set()

    def _on_finished(self, job: Job) -> None:
        self.active.pop(job.id, None)
        if not self.active:
            self.busy_changed.emit(False)

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel everything and stop the thread; waits for the running job to return. Safe to call twice."""
        if self._closed and not self.thread.isRunning():
            return True
        self._closed = True
        self.cancel()
        self.thread.quit()
        ok = self.thread.wait(timeout_ms)
        while not ok:  # a core call that ignores should_cancel: never destroy a running thread
            log.warning("worker thread still running after cancel; waiting")
            ok = self.thread.wait(timeout_ms)
        self.active.clear()
        return ok
