"""Export an image with its provenance tag (and the latent .npz alongside). Qt-free; runs on the worker thread."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anyface_desktop.backend import PROVENANCE
from core import __version__

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
SOFTWARE = f"AnyFace Desktop {__version__}"
EXIF_DESCRIPTION, EXIF_SOFTWARE = 0x010E, 0x0131


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


@dataclass
class ExportResult:
    image_path: str
    latent_path: str | None


def provenance(req: ExportRequest) -> dict:
    return {"provenance": PROVENANCE, "software": SOFTWARE, "kind": "edited" if req.edited else "generated",
            "prompt": " | ".join(req.captions), "captions": list(req.captions), "pack": req.pack,
            "method": req.method, "strength": req.strength, "seed": req.seed}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def export_image(req: ExportRequest) -> ExportResult:
    """Write the image (atomically) with the provenance tag, and ``<stem>.npz`` with the latent."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from core.errors import OutputError

    path = Path(req.path)
    fmt = req.fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise OutputError(f"Unsupported export format '{req.fmt}'. Use PNG, JPEG or WebP.")
    for src in req.inputs:
        if src and _same_file(path, Path(src)):
            raise OutputError(f"Refusing to write over the input photo {path}. Choose another file name.")
    img = Image.fromarray(np.ascontiguousarray(req.image, dtype=np.uint8), "RGB")
    if req.size and max(img.size) != req.size:
        scale = req.size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    meta = provenance(req)
    text = json.dumps(meta)
    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = SOFTWARE
    exif[EXIF_DESCRIPTION] = text
    kw: dict = {"exif": exif.tobytes()}
    if FORMATS[fmt] == "PNG":
        info = PngInfo()
        info.add_text("Software", SOFTWARE)
        info.add_text("Description", f"{PROVENANCE}; prompt: {meta['prompt']}; pack: {req.pack}")
        info.add_text("AnyFace", text)
        kw["pnginfo"] = info
    else:
        kw["quality"] = int(req.quality)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            img.save(tmp, FORMATS[fmt], **kw)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot write {path}: {e.strerror or e}. Choose another folder.") from e
    latent_path = None
    if req.save_latent and req.ws is not None:
        latent_path = str(path.with_suffix(".npz"))
        save_latent_file(latent_path, req)
    return ExportResult(str(path), latent_path)


def save_latent_file(path: str, req: ExportRequest) -> None:
    try:
        from core.latents import save_latent
    except ImportError:  # core.latents not there yet: a plain npz with the same keys
        save_latent = None
    if save_latent is not None:
        save_latent(path, req.ws, captions=list(req.captions), seed=req.seed, method=req.method, pack_id=req.pack,
                    provenance=PROVENANCE)
        return
    ws = req.ws.detach().cpu().numpy() if hasattr(req.ws, "detach") else np.asarray(req.ws)
    np.savez(path, ws=ws, captions=np.array(list(req.captions)), seed=req.seed if req.seed is not None else -1,
             method=req.method, pack_id=req.pack, provenance=PROVENANCE)


def read_provenance(path: str) -> dict | None:
    """The provenance dict written by :func:`export_image` (PNG text chunk or EXIF), or None."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("AnyFace") if hasattr(im, "info") else None
        if not text:
            text = im.getexif().get(EXIF_DESCRIPTION)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
