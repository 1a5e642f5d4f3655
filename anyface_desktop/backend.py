"""The model side of the GUI: a Qt-free session object that owns the engine and runs ON THE WORKER THREAD.

Every method here may run model code; widgets never call it directly — they post jobs to
``worker.WorkerHost`` which calls these methods on its QThread. This is also the one place that
knows the core APIs (engine, photo pipeline, batch runner), so the GUI can be tested with a fake engine
by passing it to ``Backend(engine=...)`` and overriding the few photo steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ProgressFn = Callable[[int, int], None] | None
CancelFn = Callable[[], bool] | None

PROVENANCE = "made/edited with AnyFace Desktop"


@dataclass
class PhotoState:
    """A photo opened in the canvas and the faces found in it."""

    path: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    faces: list = field(default_factory=list)  # core.align.Face objects (box = x0, y0, x1, y1)

    def face_boxes(self) -> list[tuple[float, float, float, float]]:
        out = []
        for f in self.faces:
            box = getattr(f, "box", f)
            out.append(tuple(float(v) for v in list(box)[:4]))
        return out


@dataclass
class FaceState:
    """One face of a photo, aligned and inverted: the source of every edit."""

    photo: PhotoState
    index: int
    aligned: np.ndarray  # [R, R, 3] uint8, the aligned crop
    transform: Any  # core.align.AlignTransform (for paste-back)
    ws: Any  # Tensor [num_ws, w_dim]
    reconstruction: np.ndarray  # G(ws), what the inversion found
    seconds: float = 0.0


@dataclass
class EditOutcome:
    """An edit (or a generated face) ready to be shown: the face result and the full photo with it pasted back."""

    result: Any  # core.engine.FaceResult
    composed: np.ndarray | None  # [H, W, 3] the original photo with the edited face, None for generated faces
    seconds: float
    params: dict = field(default_factory=dict)


@dataclass
class EngineInfo:
    pack_id: str
    device: str
    methods: list[str]
    resolution: int
    num_ws: int
    seconds: float


class Backend:
    """Owns the engine. Create it anywhere, but call its methods only from the worker thread."""

    def __init__(self, engine: Any = None, *, pack: str = "tiny", device: str | None = None):
        self.engine = engine
        self.pack = pack
        self.device = device

    # ------------------------------------------------------------------ engine
    def load(self, pack: str | None = None, device: str | None = None, progress: ProgressFn = None,
             should_cancel: CancelFn = None) -> EngineInfo:
        t0 = time.perf_counter()
        if pack is not None:
            self.pack = pack
        if device is not None:
            self.device = device
        if self.engine is None or pack is not None and getattr(self.engine, "pack_id", None) != pack:
            from core.device import pick_device
            from core.engine import Engine

            self.engine = Engine.from_pack(self.pack, device=pick_device(self.device))
        return self.info(time.perf_counter() - t0)

    def info(self, seconds: float = 0.0) -> EngineInfo:
        e = self.require_engine()
        dev = getattr(e, "device", "cpu")
        try:
            from core.device import describe

            dev_s = describe(dev)
        except Exception:  # noqa: BLE001 - a fake engine may have a fake device
            dev_s = str(dev)
        return EngineInfo(pack_id=str(getattr(e, "pack_id", self.pack)), device=dev_s, methods=list(e.methods),
                          resolution=int(e.resolution), num_ws=int(e.num_ws), seconds=seconds)

    def require_engine(self):
        if self.engine is None:
            from core.errors import AnyFaceError

            raise AnyFaceError("No model pack is loaded. Open Models to check the pack's files.")
        return self.engine

    # ------------------------------------------------------------------ photo steps (overridable in tests)
    def read_image(self, path: str) -> np.ndarray:
        from core.io import read_image

        return read_image(path)

    def detect_faces(self, image: np.ndarray, detector: str) -> list:
        from core.align import detect_faces

        return detect_faces(image, detector=detector)

    def align_face(self, image: np.ndarray, face: Any, size: int):
        from core.align import align_face

        return align_face(image, face, size)

    def invert(self, aligned: np.ndarray, tier: str, progress: ProgressFn, should_cancel: CancelFn):
        from core.inversion import invert

        e = self.require_engine()
        return invert(e.generator, aligned, tier=tier, encoder=getattr(e, "encoder", None),
                      clip=getattr(e, "clip", None), progress=progress, should_cancel=should_cancel)

    def paste_back(self, original: np.ndarray, face: np.ndarray, transform: Any) -> np.ndarray:
        from core.align import paste_back

        return paste_back(original, face, transform)

    # ------------------------------------------------------------------ jobs
    def open_photo(self, path: str, detector: str = "auto") -> PhotoState:
        image = self.read_image(path)
        faces = list(self.detect_faces(image, detector))
        if not faces:
            from core.errors import NoFaceFoundError

            raise NoFaceFoundError(f"No face was found in {Path(path).name}. Try another photo, or a different "
                                   "face detector in Settings; you can still generate faces from text.")
        return PhotoState(path=str(path), image=image, faces=faces)

    def prepare_face(self, photo: PhotoState, index: int, tier: str = "fast", progress: ProgressFn = None,
                     should_cancel: CancelFn = None) -> FaceState:
        t0 = time.perf_counter()
        e = self.require_engine()
        aligned, transform = self.align_face(photo.image, photo.faces[index], int(e.resolution))
        ws = self.invert(aligned, tier, progress, should_cancel)
        recon = e.render(ws)
        return FaceState(photo=photo, index=index, aligned=np.ascontiguousarray(aligned), transform=transform,
                         ws=ws, reconstruction=recon, seconds=time.perf_counter() - t0)

    def edit(self, face: FaceState | None, source_ws: Any, captions: Sequence[str], strength: float,
             method: str = "cmd", identity_layers: int | None = None, seed: int = 0) -> EditOutcome:
        t0 = time.perf_counter()
        e = self.require_engine()
        res = e.edit(source_ws, list(captions), float(strength), method=method, identity_layers=identity_layers,
                     seed=int(seed))
        composed = None
        if face is not None:
            composed = self.paste_back(face.photo.image, res.image, face.transform)
        return EditOutcome(res, composed, time.perf_counter() - t0,
                           dict(captions=list(captions), strength=float(strength), method=method,
                                identity_layers=identity_layers, seed=int(seed)))

    def synthesize(self, captions: Sequence[str], n: int, seed: int, method: str = "cmd", diversity: float = 1.0,
                   progress: ProgressFn = None, should_cancel: CancelFn = None) -> list:
        e = self.require_engine()
        return list(e.synthesize(list(captions), n=int(n), seed=int(seed), method=method, diversity=float(diversity),
                                 progress=progress, should_cancel=should_cancel))

    def compose(self, face: FaceState, face_image: np.ndarray) -> np.ndarray:
        return self.paste_back(face.photo.image, face_image, face.transform)

    def more_like(self, picked: Any, captions: Sequence[str], n: int, seed: int, method: str = "cmd",
                  closeness: float = 0.65, progress: ProgressFn = None, should_cancel: CancelFn = None) -> list:
        """Variations of a picked face: new faces for the same captions, each pulled ``closeness`` of the way
        back toward the picked face's code, then rendered."""
        import dataclasses

        e = self.require_engine()
        fresh = self.synthesize(captions, n, seed, method, progress=progress, should_cancel=should_cancel)
        out = []
        for r in fresh:
            ws = picked.ws + (1.0 - closeness) * (r.ws - picked.ws)
            img = e.render(ws)
            try:
                out.append(dataclasses.replace(r, ws=ws, image=img))
            except TypeError:  # a non-dataclass result type
                r.ws, r.image = ws, img
                out.append(r)
        return out

    def export(self, request) -> Any:
        from anyface_desktop.export import export_image

        return export_image(request)

    # ------------------------------------------------------------------ batch
    def run_batch(self, job: "BatchJob", progress: ProgressFn = None, should_cancel: CancelFn = None) -> "BatchReport":
        """A folder of photos x captions -> edited photos, with a per-file report. Uses core.batch when present."""
        try:
            from core import batch as core_batch
        except ImportError:
            core_batch = None
        if core_batch is not None and hasattr(core_batch, "run_batch"):
            return _adapt_report(core_batch.run_batch(
                self.require_engine(), job.input_dir, job.captions, output_dir=job.output_dir, strength=job.strength,
                method=job.method, identity_layers=job.identity_layers, detector=job.detector, tier=job.tier,
                fmt=job.fmt, progress=progress, should_cancel=should_cancel))
        return self._run_batch_fallback(job, progress, should_cancel)

    def _run_batch_fallback(self, job: "BatchJob", progress: ProgressFn, should_cancel: CancelFn) -> "BatchReport":
        from anyface_desktop.export import ExportRequest, export_image
        from core.errors import AnyFaceError, CancelledError

        files = sorted(p for p in Path(job.input_dir).iterdir()
                       if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES)
        report = BatchReport(job=job)
        t0 = time.perf_counter()
        for i, p in enumerate(files):
            if should_cancel is not None and should_cancel():
                report.cancelled = True
                break
            if progress is not None:
                progress(i, len(files))
            out = Path(job.output_dir) / f"{p.stem}_anyface.{job.fmt}"
            try:
                photo = self.open_photo(str(p), job.detector)
                face = self.prepare_face(photo, 0, job.tier, None, should_cancel)
                res = self.edit(face, face.ws, job.captions, job.strength, job.method, job.identity_layers)
                export_image(ExportRequest(str(out), res.composed, fmt=job.fmt, ws=res.result.ws,
                                           captions=job.captions, method=job.method, strength=job.strength,
                                           pack=str(getattr(self.engine, "pack_id", self.pack)), inputs=[str(p)]))
                report.items.append(BatchItem(str(p), "ok", str(out)))
            except CancelledError:
                report.cancelled = True
                break
            except AnyFaceError as exc:
                report.items.append(BatchItem(str(p), "failed", None, f"{exc.title}: {str(exc).splitlines()[0]}"))
            except Exception as exc:  # noqa: BLE001 - one bad file never stops a batch
                report.items.append(BatchItem(str(p), "failed", None, f"{type(exc).__name__}: {exc}"))
        if progress is not None and not report.cancelled:
            progress(len(files), len(files))
        report.total = len(files)
        report.seconds = time.perf_counter() - t0
        return report


BATCH_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class BatchJob:
    input_dir: str
    captions: list[str]
    output_dir: str
    strength: float = 0.6
    method: str = "cmd"
    identity_layers: int | None = None
    detector: str = "auto"
    tier: str = "fast"
    fmt: str = "png"


@dataclass
class BatchItem:
    path: str
    status: str  # ok | failed | skipped
    output: str | None = None
    error: str = ""


@dataclass
class BatchReport:
    job: Any = None
    items: list[BatchItem] = field(default_factory=list)
    total: int = 0
    cancelled: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def ok(self) -> list[BatchItem]:
        return [i for i in self.items if i.status == "ok"]

    def summary(self) -> str:
        head = (f"{len(self.ok)} of {self.total} photos edited, {len(self.failed)} failed"
                + (", cancelled" if self.cancelled else "") + f" ({self.seconds:.1f} s).")
        lines = [head]
        for it in self.items:
            name = Path(it.path).name
            lines.append(f"  ✔ {name} -> {Path(it.output).name}" if it.status == "ok" else f"  ✘ {name}: {it.error}")
        return "\n".join(lines)


def _adapt_report(r: Any) -> BatchReport:
    """core.batch's report -> BatchReport (field names may differ; read what is there)."""
    if isinstance(r, BatchReport):
        return r
    rep = BatchReport(total=int(getattr(r, "total", 0) or 0), cancelled=bool(getattr(r, "cancelled", False)),
                      seconds=float(getattr(r, "seconds", 0.0) or 0.0))
    for it in getattr(r, "items", []) or []:
        rep.items.append(BatchItem(str(getattr(it, "path", getattr(it, "input", ""))), str(getattr(it, "status", "")),
                                   getattr(it, "output", None), str(getattr(it, "error", "") or "")))
    rep.total = rep.total or len(rep.items)
    return rep
