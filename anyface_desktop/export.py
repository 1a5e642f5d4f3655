"""Export an image with its provenance tag (and the latent .npz alongside). Qt-free; runs on the worker thread."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anyface_desktop.backend import PROVENANCE
from core import __version__

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
SOFTWARE = f"AnyFace Desktop {__version__}"


@dataclass
class ExportRequest:
    path: str
    image: np.ndarray  # [H, W, 3] uint8
    fmt: str = "png"  # png | jpg | webp
    quality: int = 92
    size: int | None = None  # longest side in px, None = as is
    save_latent: bool = True
    ws: Any = None  # Tensor [num_ws, w_dim]
    captions: Sequence[str] = ()
    method: str = ""
    strength: float | None = None
    seed: int | None = None
    pack: str = ""
    edited: bool = True
    inputs: Sequence[str] = field(default_factory=tuple)  # never written over
    unique: bool = False  # the name is the app's choice: never replace a file (take "-1", "-2"... when taken)
    identity_layers: int | None = None  # the identity lock of the edit
    steps: Sequence[str] = ()  # how the face was made: the history's labels, from its start to this state
    variation_of: int | None = None  # the seed of the face a "More like this" variation was made from
    bank: str | None = None  # the KNN bank the method read (Engine.bank_label): another gives other faces
    # a photo with transparency: its alpha [H, W], the photo as composited on white (what ``image`` edits) and the
    # file's own colour under the alpha; the export re-attaches it (core.photo.restore_alpha)
    alpha: np.ndarray | None = None
    on_white: np.ndarray | None = None
    straight: np.ndarray | None = None


@dataclass
class ExportResult:
    image_path: str
    latent_path: str | None


def provenance(req: ExportRequest) -> dict:
    from core.io import provenance_tag

    extra = {k: v for k, v in (("identity_layers", req.identity_layers), ("steps", list(req.steps) or None),
                                ("variation_of", req.variation_of), ("bank", req.bank)) if v is not None}
    return provenance_tag("edited" if req.edited else "generated", prompt=" | ".join(req.captions),
                          captions=list(req.captions), pack=req.pack, method=req.method, strength=req.strength,
                          seed=req.seed, **extra)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def export_image(req: ExportRequest) -> ExportResult:
    """Write the image (atomically, via core.io.write_image) with the provenance tag, and ``<stem>.npz`` with the
    latent. Refuses to write over any of ``req.inputs``."""
    from PIL import Image

    from core.errors import OutputError
    from core.io import unique_pair, unique_path, write_image

    if not str(req.path).strip() or not Path(req.path).name:
        raise OutputError("Choose a file name to export to.")
    path = Path(req.path)
    fmt = req.fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise OutputError(f"Unsupported export format '{req.fmt}'. Use PNG, JPEG or WebP.")
    exts = {"png": (".png",), "jpg": (".jpg", ".jpeg"), "jpeg": (".jpg", ".jpeg"), "webp": (".webp",)}[fmt]
    if path.suffix.lower() not in exts:  # the name says the format: "face.jpg" must hold a JPEG
        path = path.with_name(path.name + exts[0]) if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") \
            else path.with_suffix(exts[0])
        path = unique_path(path)  # a name the user did not type must not replace an existing file
    with_latent = req.save_latent and req.ws is not None
    if req.unique:  # decided here, on the worker, so two quick exports in a row never get the same name
        path = unique_pair(path) if with_latent else unique_path(path)  # the image and its .npz: one name
    for src in req.inputs:
        if src and _same_file(path, Path(src)):
            raise OutputError(f"Refusing to write over the input photo {path}. Choose another file name.")
    img = np.ascontiguousarray(req.image, dtype=np.uint8)
    if req.alpha is not None and req.on_white is not None and img.shape[:2] == req.alpha.shape:
        from core.photo import restore_alpha

        img = restore_alpha(img, req.on_white, req.alpha, req.straight)
    if req.size and max(img.shape[:2]) != req.size:
        pil = Image.fromarray(img)  # RGB, RGBA or grey as the array has it
        scale = req.size / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.LANCZOS)
        img = np.asarray(pil)
    image_existed = path.exists()
    latent_path = None
    if with_latent:
        latent_path = str(path.with_suffix(".npz"))
        # the .npz name is the app's choice: it replaces the latent of an image the user chose to overwrite, never
        # an unrelated file beside a new image (then the image's metadata names its latent)
        if Path(latent_path).exists() and not (image_existed and _is_latent(Path(latent_path))):
            latent_path = str(unique_path(Path(latent_path)))
        for src in req.inputs:
            if src and _same_file(Path(latent_path), Path(src)):
                raise OutputError(f"Refusing to write the latent over the input {src}.")
    meta = provenance(req)
    if latent_path is not None and Path(latent_path).stem != path.stem:
        meta["latent"] = Path(latent_path).name
    desc = f"{PROVENANCE} (AI-{'edited' if req.edited else 'generated'}); prompt: {meta['prompt']}; pack: {req.pack}"
    written = write_image(path, img, FORMATS[fmt], int(req.quality), metadata=meta, protect=list(req.inputs),
                          description=desc)
    if latent_path is not None:
        try:
            save_latent_file(latent_path, req)
        except OSError as e:  # e.g. the disk filled up between the two files: say what is on disk
            raise OutputError(f"The image was saved as {written}, but its latent could not be written to "
                              f"{latent_path}: {e.strerror or e}.") from e
    return ExportResult(str(written), latent_path)


def _is_latent(path: Path) -> bool:
    """An AnyFace latent file (one the app wrote), as opposed to any other .npz."""
    from core.latents import load_latent

    try:
        load_latent(path)
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def save_latent_file(path: str, req: ExportRequest) -> None:
    from core.latents import save_latent

    save_latent(path, req.ws, captions=list(req.captions), seed=req.seed, method=req.method, pack_id=req.pack,
                provenance=PROVENANCE, strength=req.strength, kind="edited" if req.edited else "generated")


def read_provenance(path: str) -> dict | None:
    """The provenance dict written by :func:`export_image` (PNG text chunk or EXIF/XMP), or None."""
    from core.io import read_metadata

    meta = read_metadata(path)
    return meta if meta.get("provenance") else None
