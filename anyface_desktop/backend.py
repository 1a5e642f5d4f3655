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

from core.io import PROVENANCE  # noqa: F401 - re-exported: the tag every output carries

ProgressFn = Callable[[int, int], None] | None
CancelFn = Callable[[], bool] | None



@dataclass
class PhotoState:
    """A photo opened in the canvas and the faces found in it."""

    path: str
    image: np.ndarray  # [H, W, 3] uint8 RGB (a photo with transparency: composited on white)
    faces: list = field(default_factory=list)  # core.align.Face objects (box = x0, y0, x1, y1)
    alpha: np.ndarray | None = None  # [H, W] uint8 when the file had transparency (exports keep it)
    straight: np.ndarray | None = None  # [H, W, 3] the file's colour under that transparency

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
    tier: str = ""  # the inversion tier it was made with


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
    coarse_layers: int = 4
    bank_size: int = 0  # entries of the loaded KNN bank (0: none)
    bank_bytes_per_entry: int = 0  # disk size of one bank entry for this generator + CLIP (estimates)
    needs_bank: list = field(default_factory=list)  # methods loaded but waiting for a KNN bank (a CMD or CVAE whose
    #                                                file reads text through it: Engine.needs_bank)
    word_map: Any = None  # core.wordmap.WordMap of the pack (read-only; the caption editor shows what it reads)
    bank_problem: str = ""  # why the pack's own KNN bank is not used (damaged file): the pack loaded without it


def _is_bank_file_error(err: Exception, pack: str) -> bool:
    """Whether loading ``pack`` failed on its own KNN bank file (corrupt or unreadable), and on nothing else."""
    from core.errors import CorruptWeightsError

    if not isinstance(err, CorruptWeightsError):
        return False
    try:
        from core.weights import Manifest

        wf = Manifest.load().files.get(err.id)
    except Exception:  # noqa: BLE001 - no manifest: not a file we know
        return False
    return wf is not None and wf.role == "knn" and wf.pack == pack


class Backend:
    """Owns the engine. Create it anywhere, but call its methods only from the worker thread."""

    def __init__(self, engine: Any = None, *, pack: str = "tiny", device: str | None = None):
        self.engine = engine
        self.pack = pack
        self.device = device
        self.bank_problem = ""

    # ------------------------------------------------------------------ engine
    def load(self, pack: str | None = None, device: str | None = None, progress: ProgressFn = None,
             should_cancel: CancelFn = None, detector: str | None = "auto", tier: str = "fast",
             force: bool = False) -> EngineInfo:
        """Load ``pack`` on ``device`` (kept as it is when neither changed, unless ``force``: files on disk changed,
        e.g. a bank built here was deleted or a damaged file replaced)."""
        t0 = time.perf_counter()
        if pack is not None:
            self.pack = pack
        if device is not None:
            self.device = device
        if (force or self.engine is None or pack is not None and getattr(self.engine, "pack_id", None) != pack
                or device is not None and self._device_changed(device)):
            from core.device import pick_device
            from core.engine import Engine

            self.engine = None  # free the old pack first
            self.bank_problem = ""
            dev = pick_device(self.device)
            try:
                self.engine = Engine.from_pack(self.pack, device=dev, progress=progress, should_cancel=should_cancel)
            except Exception as e:  # noqa: BLE001 - only a damaged KNN bank is let through, below
                if not _is_bank_file_error(e, self.pack):
                    raise
                # the bank is the one file the app can make again itself (Build bank): load the rest, and say why
                self.bank_problem = str(e)
                self.engine = Engine.from_pack(self.pack, device=dev, progress=progress, should_cancel=should_cancel,
                                               skip_bank=True)
        from core.errors import CancelledError

        for step in ((lambda: self.warm_up(detector)) if detector else None, lambda: self.warm_up_engine(tier)):
            if should_cancel is not None and should_cancel():
                raise CancelledError("Loading was cancelled.")
            if step is not None:
                step()
        return self.info(time.perf_counter() - t0)

    def warm_up(self, detector: str = "auto") -> None:
        """Load the face detector(s) now, with the engine. dlib deserialises its HOG detector and 68-point
        predictor while holding the GIL (~4 s on a small CPU), which would freeze the GUI for that long on
        the first photo; at start-up it happens while the window says "Loading models…"."""
        try:
            from core.align import get_detector
        except ImportError:
            return
        blank = np.full((96, 96, 3), 128, np.uint8)
        for name in (("dlib", "yunet") if detector == "auto" else (detector,)):
            try:
                get_detector(name).detect(blank, 96)
            except Exception:  # noqa: BLE001 - an unavailable detector is reported when a photo is opened
                pass

    def warm_up_engine(self, tier: str = "fast") -> None:
        """Run each kind of job once on a dummy input, so lazy imports and first-call initialisation happen while
        loading, not in the middle of the first inversion (the optimiser of the "balanced"/"best" tiers imports
        torch._dynamo: ~1.5 s of imports that hold the GIL; the text encoder's first call is slow too)."""
        e = self.engine
        if e is None:
            return
        try:
            gray = np.full((int(e.resolution), int(e.resolution), 3), 128, np.uint8)
            from core.inversion import invert

            ws = invert(e.generator, gray, tier=tier, encoder=getattr(e, "encoder", None),
                        clip=getattr(e, "clip", None), steps=0 if tier == "fast" else 1)
            if e.methods:
                e.edit(ws, ["a face"], 0.5, method=e.methods[0])
        except Exception:  # noqa: BLE001 - warming up is best effort; real errors surface on real jobs
            import logging

            logging.getLogger("anyface.worker").debug("warm-up failed", exc_info=True)

    def _device_changed(self, device: str) -> bool:
        try:
            from core.device import pick_device

            return str(pick_device(device)) != str(getattr(self.engine, "device", ""))
        except Exception:  # noqa: BLE001 - an unavailable device is reported by the load itself
            return True

    def info(self, seconds: float = 0.0) -> EngineInfo:
        e = self.require_engine()
        dev = getattr(e, "device", "cpu")
        try:
            from core.device import describe

            dev_s = describe(dev)
        except Exception:  # noqa: BLE001 - a fake engine may have a fake device
            dev_s = str(dev)
        return EngineInfo(pack_id=str(getattr(e, "pack_id", self.pack)), device=dev_s, methods=list(e.methods),
                          resolution=int(e.resolution), num_ws=int(e.num_ws), seconds=seconds,
                          coarse_layers=int(getattr(e, "coarse_layers", min(4, int(e.num_ws) - 1))),
                          bank_size=len(e.bank) if getattr(e, "bank", None) is not None else 0,
                          bank_bytes_per_entry=_bank_entry_bytes(e),
                          needs_bank=list(getattr(e, "needs_bank", [])),
                          word_map=getattr(e, "word_map", None), bank_problem=self.bank_problem)

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
        e = self.require_engine()
        if hasattr(e, "invert"):
            return e.invert(aligned, tier, progress=progress, should_cancel=should_cancel)
        from core.inversion import invert

        return invert(e.generator, aligned, tier=tier, encoder=getattr(e, "encoder", None),
                      clip=getattr(e, "clip", None), progress=progress, should_cancel=should_cancel)

    def paste_back(self, original: np.ndarray, face: np.ndarray, transform: Any) -> np.ndarray:
        from core.align import paste_back

        return paste_back(original, face, transform)

    # ------------------------------------------------------------------ jobs
    def open_photo(self, path: str, detector: str = "auto") -> PhotoState:
        from core.io import load_image

        loaded = load_image(path)
        image = loaded.rgb
        faces = list(self.detect_faces(image, detector))
        if not faces:
            from core.errors import NoFaceFoundError

            raise NoFaceFoundError(f"No face was found in {Path(path).name}. Try another photo, or a different "
                                   "face detector in Settings; you can still generate faces from text.")
        return PhotoState(path=str(path), image=image, faces=faces, alpha=loaded.alpha, straight=loaded.straight)

    def prepare_face(self, photo: PhotoState, index: int, tier: str = "fast", progress: ProgressFn = None,
                     should_cancel: CancelFn = None) -> FaceState:
        t0 = time.perf_counter()
        e = self.require_engine()
        aligned, transform = self.align_face(photo.image, photo.faces[index], int(e.resolution))
        ws = self.invert(aligned, tier, progress, should_cancel)
        recon = e.render(ws)
        return FaceState(photo=photo, index=index, aligned=np.ascontiguousarray(aligned), transform=transform,
                         ws=ws, reconstruction=recon, seconds=time.perf_counter() - t0, tier=str(tier))

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

    def build_bank(self, size: int, progress: ProgressFn = None, should_cancel: CancelFn = None) -> EngineInfo:
        """Build (and save in the user data dir) the KNN bank of the loaded pack; a cancelled build saves nothing."""
        t0 = time.perf_counter()
        self.require_engine().build_bank(size=int(size), progress=progress, should_cancel=should_cancel)
        self.bank_problem = ""  # the bank built here replaces the damaged one (and is used from now on)
        return self.info(time.perf_counter() - t0)

    def refine(self, face: FaceState | None, source_ws: Any, captions: Sequence[str], steps: int,
               progress: ProgressFn = None, should_cancel: CancelFn = None) -> EditOutcome:
        """CLIP-guided refinement of ``source_ws`` toward the captions, pasted back into the photo when there is one."""
        t0 = time.perf_counter()
        res = self.require_engine().refine(source_ws, list(captions), steps=int(steps), progress=progress,
                                           should_cancel=should_cancel)
        composed = self.paste_back(face.photo.image, res.image, face.transform) if face is not None else None
        return EditOutcome(res, composed, time.perf_counter() - t0,
                           dict(captions=list(captions), strength=0.0, method="refine", refine_steps=int(steps)))

    def compose(self, face: FaceState, face_image: np.ndarray) -> np.ndarray:
        return self.paste_back(face.photo.image, face_image, face.transform)

    def open_latent(self, path: str):
        """A latent .npz saved by Export (core.latents) -> a face to edit further (rendered by this pack)."""
        from core.errors import InvalidCheckpointError
        from core.latents import load_latent

        e = self.require_engine()
        lat = load_latent(path)
        if (lat.num_ws, lat.w_dim) != (int(e.num_ws), int(e.w_dim)):
            raise InvalidCheckpointError(
                f"{Path(path).name} holds a {lat.num_ws}x{lat.w_dim} code from pack '{lat.pack_id}'; the loaded pack "
                f"'{getattr(e, 'pack_id', '?')}' takes {e.num_ws}x{e.w_dim}. Switch to that pack in Models.")
        try:
            from core.engine import FaceResult
        except ImportError:  # a fake engine in tests
            from types import SimpleNamespace as FaceResult
        kind = str(lat.extra.get("kind") or "")
        # a photo edit's latent has no meaningful seed (previews use 0): it must not be named "seed 0" later
        return FaceResult(image=e.render(lat.ws), ws=lat.ws, seed=None if kind == "edited" else lat.seed,
                          captions=tuple(lat.captions), method=lat.method,
                          extra={"kind": kind, "file": Path(path).name})

    def more_like(self, picked: Any, captions: Sequence[str], n: int, seed: int, method: str = "cmd",
                  closeness: float = 0.65, progress: ProgressFn = None, should_cancel: CancelFn = None) -> list:
        """Variations of a picked face: new faces for the same captions, each pulled ``closeness`` of the way
        back toward the picked face's code, then rendered."""
        import dataclasses

        e = self.require_engine()
        fresh = self.synthesize(captions, n, seed, method, progress=progress, should_cancel=should_cancel)
        out = []
        like = getattr(picked, "seed", None)
        for r in fresh:
            ws = picked.ws + (1.0 - closeness) * (r.ws - picked.ws)
            img = e.render(ws)
            # seed + i alone does not make this face again (it is a mix with the picked face): no seed of its own
            extra = dict(getattr(r, "extra", None) or {}, variation_of=like, variation_seed=r.seed, closeness=closeness)
            try:
                out.append(dataclasses.replace(r, ws=ws, image=img, seed=None, extra=extra))
            except TypeError:  # a non-dataclass result type
                r.ws, r.image, r.seed, r.extra = ws, img, None, extra
                out.append(r)
        return out

    def export(self, request) -> Any:
        from anyface_desktop.export import export_image

        return export_image(request)

    # ------------------------------------------------------------------ batch
    def batch_processor(self, job: "BatchJob"):
        """The per-photo step of a batch: core.batch's EditProcessor (read -> detect -> align -> invert -> edit ->
        paste back) on this backend's engine. Tests swap in a processor built from fake steps."""
        from core.batch import EditProcessor

        return EditProcessor(self.require_engine(), job.captions, strength=job.strength, method=job.method,
                             identity_layers=job.identity_layers, tier=job.tier, fmt=job.fmt, detector=job.detector,
                             save_latent=job.save_latent)

    def run_batch(self, job: "BatchJob", progress: ProgressFn = None, should_cancel: CancelFn = None):
        """A folder of photos x captions -> edited photos (core.batch: resumable, atomic, per-file report).
        Returns core.batch.BatchReport. On cancel the partial report is kept in ``last_batch_report`` and
        CancelledError is raised."""
        from core import batch as core_batch
        from core.errors import CancelledError

        self.last_batch_report = None
        proc = self.batch_processor(job)
        try:
            report = core_batch.run(job.input_dir, job.output_dir, proc, params=getattr(proc, "params", None),
                                    recursive=bool(getattr(job, "recursive", False)), progress=progress,
                                    should_cancel=should_cancel)
        except CancelledError as e:
            self.last_batch_report = getattr(e, "report", None)
            raise
        self.last_batch_report = report
        return report


def _bank_entry_bytes(engine: Any) -> int:
    try:
        return max(0, int(engine.bank_bytes(1000) - engine.bank_bytes(0)) // 1000)
    except Exception:  # noqa: BLE001 - a fake engine without the estimate
        return 0


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
    save_latent: bool = False
    recursive: bool = False
