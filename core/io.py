"""Safe image reading and writing.

Reading accepts whatever a user drops on the app: EXIF-rotated phone pictures, palette/alpha/greyscale
PNGs, CMYK JPEGs, 16-bit TIFF/PNG, float TIFF (greyscale by Pillow; RGB, which Pillow cannot read, by tifffile),
animated GIF/WebP (first frame), unicode paths. It refuses
decompression bombs before decoding and turns every unreadable file into ``InvalidImageError``.

Writing is atomic (temp file in the same folder + ``os.replace``), never overwrites a protected input,
and stores a provenance tag: PNG text chunks, or EXIF ImageDescription/UserComment + XMP for JPEG/WebP.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from core.atomic import mkstemp_beside
from core.errors import ImageTooLargeError, InvalidImageError, OutputError

PathLike = Union[str, os.PathLike]

#: Default decompression-bomb limit (pixels). Override per call or with ``ANYFACE_MAX_PIXELS``.
DEFAULT_MAX_PIXELS = 120_000_000
MAX_PIXELS_ENV = "ANYFACE_MAX_PIXELS"

#: Formats ``write_image`` produces, by lower-case extension.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

#: Key under which the provenance JSON is stored (PNG text chunk / EXIF UserComment / XMP).
PROVENANCE_KEY = "AnyFace"
DEFAULT_DESCRIPTION = "AI-edited with AnyFace Desktop"
PROVENANCE = "made/edited with AnyFace Desktop"


def provenance_tag(kind: str, **fields) -> dict:
    """The provenance dict every output of the app carries in its metadata (GUI export, CLI, batch), so any of
    them reads back the same way: ``provenance``, ``software``, ``kind`` ("generated" | "edited") and ``fields``
    (captions, method, pack, seed, strength ...)."""
    from core import __version__

    if kind not in ("generated", "edited"):
        raise ValueError(f"kind is 'generated' or 'edited', got {kind!r}")
    return {"provenance": PROVENANCE, "software": f"AnyFace Desktop {__version__}", "kind": kind, **fields}

_EXIF_IFD = 0x8769
_TAG_DESCRIPTION = 0x010E
_TAG_SOFTWARE = 0x0131
_TAG_USER_COMMENT = 0x9286

_pil_limit_lock = threading.Lock()


@dataclass
class LoadedImage:
    """A decoded image. ``rgb`` is what the user sees (alpha composited on white); ``alpha`` is kept apart."""

    rgb: np.ndarray  # [H, W, 3] uint8
    alpha: np.ndarray | None  # [H, W] uint8, or None when the file had no transparency
    path: Path | None
    format: str | None
    mode: str  # the file's original Pillow mode
    n_frames: int
    exif_transposed: bool
    # the file's own colour under its transparency (before compositing on white), when it had any: what an edit
    # writes back where it changed nothing (core.photo.with_alpha)
    straight: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation."""
        return self.rgb.shape[1], self.rgb.shape[0]


def max_pixels_default() -> int:
    env = os.environ.get(MAX_PIXELS_ENV)
    if env:
        try:
            return int(float(env))
        except ValueError:
            pass
    return DEFAULT_MAX_PIXELS


def _mp(n: int) -> str:
    return f"{n / 1e6:.3g}"


def _describe(path: PathLike | None) -> str:
    return f"'{path}'" if path is not None else "the image data"


def _open(source, max_pixels: int, name: str) -> Image.Image:
    """Open (header only) with our own bomb limit; Pillow's global limit is lifted only while we open."""
    try:
        with _pil_limit_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max(old or 0, max_pixels)
            try:
                img = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            f"{name} is too large to open safely: more than twice the limit of {_mp(max_pixels)} megapixels "
            f"(decompression-bomb guard). Downscale the image, or raise the limit with the environment variable "
            f"{MAX_PIXELS_ENV} (pixels)."
        ) from e
    except FileNotFoundError as e:
        raise InvalidImageError(f"{name} does not exist. Check the path and try again.") from e
    except IsADirectoryError as e:
        raise InvalidImageError(f"{name} is a folder, not an image file.") from e
    except PermissionError as e:
        raise InvalidImageError(f"{name} cannot be read: permission denied.") from e
    except UnidentifiedImageError as e:
        raise InvalidImageError(
            f"{name} is not an image this app can read (empty, corrupt, or an unsupported format). "
            "Use a PNG, JPEG, WebP, TIFF, BMP or GIF file."
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidImageError(f"{name} could not be opened ({e}): it is damaged or cut short. Re-export or "
                                "re-download it.") from e
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise InvalidImageError(f"{name} has no pixels ({w}x{h}).")
    if w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{name} is {w}x{h} = {_mp(w * h)} megapixels, more than the limit of "
            f"{_mp(max_pixels)} megapixels (decompression-bomb guard). Downscale the image, or raise the "
            f"limit with the environment variable {MAX_PIXELS_ENV} (pixels)."
        )
    return img


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """High bit-depth / float greyscale -> uint8 with the full range kept."""
    if a.dtype == np.uint8:
        return a
    if mode.startswith("I;16") or a.dtype == np.uint16:
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    if mode == "F":
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.round(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.round(a).astype(np.uint8)
        return np.round((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
    # mode "I" (int32): 16-bit files opened as I, or genuinely 8-bit data
    if a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    if a.min() >= 0 and a.max() <= 65535:
        return np.round(a / 257.0).astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception:  # no littlecms, or a broken profile: fall back to the plain formula
            pass
    return img.convert("RGB")


def _tell(f) -> int | None:
    try:
        return f.tell()
    except (AttributeError, OSError, ValueError):  # a pipe or socket: no second read
        return None


def _read_tiff(src, max_pixels: int, name: str
               ) -> tuple[np.ndarray, np.ndarray | None, str, bool, np.ndarray | None] | None:
    """A TIFF Pillow cannot decode (float or 32-bit RGB, as HDR and scientific cameras write) read by tifffile:
    ``(rgb, alpha, mode, turned upright)``, or None when ``src`` is no TIFF or tifffile is not installed. The first page; float
    data scaled like a float greyscale TIFF (kept in [0, 1] or [0, 255], else its own min..max)."""
    try:
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                head = f.read(4)
        else:
            pos = src.tell()
            head = src.read(4)
            src.seek(pos)
    except OSError:
        return None
    if head not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return None
    try:
        import tifffile
    except ImportError:
        return None
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # damaged files are reported by the error below
    try:
        with tifffile.TiffFile(src) as tf:
            page = tf.pages[0]
            w, h = int(page.imagewidth), int(page.imagelength)
            if w * h > max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {w}x{h} = {_mp(w * h)} megapixels, more than the limit of {_mp(max_pixels)} "
                    f"megapixels (decompression-bomb guard). Downscale the image, or raise the limit with the "
                    f"environment variable {MAX_PIXELS_ENV} (pixels).")
            a = np.asarray(page.asarray())
            axes = page.axes
            orientation = int(page.tags["Orientation"].value) if "Orientation" in page.tags else 1
    except InvalidImageError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise InvalidImageError(f"{name} is a TIFF that cannot be decoded ({e}). Re-export it as PNG or JPEG.") from e
    if axes.startswith("S") and a.ndim == 3:  # planar: one plane per channel
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.shape[:2] != (h, w):
        raise InvalidImageError(f"{name} is a TIFF of shape {a.shape} ({axes}), not a picture this app reads "
                                f"(greyscale, RGB or RGBA). Re-export it as PNG or JPEG.")
    mode = f"{'LA' if a.shape[2] == 2 else 'L' if a.shape[2] == 1 else 'RGB' if a.shape[2] == 3 else 'RGBA'};{a.dtype}"
    kind = "F" if np.issubdtype(a.dtype, np.floating) else "I"
    # colour and alpha each on their own scale: 0..255 or HDR colour with an alpha of 1.0 is opaque, not see-through
    colour = _to_uint8(a if a.shape[2] in (1, 3) else a[:, :, :-1], kind)
    alpha = None
    if a.shape[2] in (2, 4):
        al = a[:, :, -1].astype(np.float64)
        top = 1.0 if kind == "F" and np.nanmax(al) <= 1.0 else 255.0 if np.nanmax(al) <= 255 else \
            65535.0 if np.nanmax(al) <= 65535 else float(np.nanmax(al))
        alpha = np.round(np.clip(np.nan_to_num(al) / top, 0.0, 1.0) * 255.0).astype(np.uint8)
    transposed = orientation in (2, 3, 4, 5, 6, 7, 8)
    if transposed:  # as EXIF orientation is applied to photos Pillow reads
        colour, alpha = (_orient(colour, orientation), None if alpha is None else _orient(alpha, orientation))
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    straight = None
    if alpha is not None:
        if alpha.min() == 255:
            alpha = None
        else:
            straight = np.ascontiguousarray(colour)
            al = alpha.astype(np.float32)[:, :, None] / 255.0
            colour = np.round(colour.astype(np.float32) * al + 255.0 * (1.0 - al)).astype(np.uint8)
    return np.ascontiguousarray(colour), alpha, mode, transposed, straight


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """TIFF/EXIF orientation 2..8 -> the upright image."""
    if orientation in (5, 6, 7, 8):
        a = np.swapaxes(a, 0, 1)  # transpose first, then flip: 5 = transpose, 6 = rotate 90 CW, ...
        return {5: a, 6: a[:, ::-1], 7: a[::-1, ::-1], 8: a[::-1]}[orientation]
    return {2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1]}[orientation]


def _tiff_unsigned32(img: Image.Image) -> bool:
    """A 32-bit unsigned greyscale TIFF, which Pillow opens as signed mode "I" (large values wrap negative)."""
    if img.format != "TIFF" or img.mode != "I":
        return False
    tags = getattr(img, "tag_v2", {})
    bits, fmt = tags.get(258), tags.get(339, 1)  # BitsPerSample, SampleFormat (1 = unsigned, the default)
    bits = bits[0] if isinstance(bits, tuple) else bits
    fmt = fmt[0] if isinstance(fmt, tuple) else fmt
    return bits == 32 and fmt == 1


def _decode(img: Image.Image, unsigned32: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Loaded Pillow image (any mode) -> (rgb [H,W,3] uint8 on white, alpha [H,W] uint8 | None, the colour under
    the alpha [H,W,3] uint8 | None)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img)
        g = _to_uint8(a.view(np.uint32) if unsigned32 and a.dtype == np.int32 else a, mode)
        return np.repeat(g[:, :, None], 3, axis=2), None, None
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(img)), None, None
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[:, :, 3].copy()
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3]), None, None
        a = alpha.astype(np.float32)[:, :, None] / 255.0
        rgb = np.round(rgba[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)
        return rgb, alpha, np.ascontiguousarray(rgba[:, :, :3])
    return np.asarray(img.convert("RGB")), None, None


def load_image(source: PathLike | bytes | io.IOBase, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode an image file (path, bytes or binary file object) safely.

    EXIF orientation is applied; animated files give their first frame; every mode becomes RGB uint8
    (16-bit/float greyscale scaled to the full 8-bit range, CMYK through its ICC profile when present,
    alpha composited on white and returned separately). Raises ``InvalidImageError`` for anything that
    is not a complete, readable image and ``ImageTooLargeError`` above ``max_pixels``.
    """
    max_pixels = int(max_pixels or max_pixels_default())
    path = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidImageError("The image data is empty (0 bytes).")
        src = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.stat().st_size == 0:
            raise InvalidImageError(f"'{path}' is empty (0 bytes). Choose another file.")
        src = path
    else:
        src = source
    name = _describe(path)
    start = None if path is not None else _tell(src)
    try:
        img = _open(src, max_pixels, name)
    except InvalidImageError as e:
        tiff = None
        if isinstance(e.__cause__, UnidentifiedImageError) and (path is not None or start is not None):
            if start is not None:
                src.seek(start)
            tiff = _read_tiff(src, max_pixels, name)
        if tiff is None:
            raise
        rgb, alpha, mode, transposed, straight = tiff
        return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=None if alpha is None else np.ascontiguousarray(alpha),
                           path=path, format="TIFF", mode=mode, n_frames=1, exif_transposed=transposed,
                           straight=straight)
    try:
        fmt = img.format
        n_frames = int(getattr(img, "n_frames", 1) or 1)
        if n_frames > 1:
            img.seek(0)
        orig_mode = img.mode
        try:
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            transposed = ImageOps.exif_transpose(img)
        except Image.DecompressionBombError as e:  # pragma: no cover - caught at open already
            raise ImageTooLargeError(f"{name} is too large to decode safely: {e}") from e
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            raise InvalidImageError(
                f"{name} is damaged or truncated and cannot be decoded ({e}). Re-export or re-download it."
            ) from e
        # Pillow returns a copy even for orientation 1 ("as stored"): that is no turn
        did_transpose = transposed is not None and transposed is not img and orientation in (2, 3, 4, 5, 6, 7, 8)
        work = transposed if transposed is not None else img
        rgb, alpha, straight = _decode(work, unsigned32=_tiff_unsigned32(img))
    finally:
        img.close()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    return LoadedImage(rgb=rgb, alpha=alpha, path=path, format=fmt, mode=orig_mode, n_frames=n_frames,
                       exif_transposed=did_transpose, straight=straight)


def read_image(source: PathLike | bytes | io.IOBase, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 [H, W, 3] (EXIF-rotated, first frame, alpha on white). See ``load_image``."""
    return load_image(source, max_pixels=max_pixels).rgb


def as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Array in any common layout (HxW, HxWx1/3/4; uint8/uint16/float in [0,1]) -> RGB uint8 [H, W, 3]."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InvalidImageError(f"Expected an image array HxW or HxWx{{1,3,4}}, got shape {a.shape}.")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        al = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.round(a[:, :, :3].astype(np.float32) * al + 255.0 * (1.0 - al)).astype(np.uint8)
    return np.ascontiguousarray(a)


def resize_max_side(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale (area filter; bilinear + 2x area below half size) so that max(H, W) <= max_side. Returns (image, scale) with
    ``scale = new / old`` (1.0 and the same array when no resize was needed)."""
    h, w = img.shape[:2]
    side = max(h, w)
    if max_side <= 0 or side <= max_side:
        return img, 1.0
    import cv2

    s = max_side / side
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    if s < 0.5:
        # INTER_AREA at arbitrary ratios is slow on big photos (~0.2 s for 12 MP): bilinear to twice the
        # target, then an exact 2x area reduction (~0.04 s), alias-free enough for detection
        mid = cv2.resize(img, (2 * nw, 2 * nh), interpolation=cv2.INTER_LINEAR)
        out = cv2.resize(mid, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out, nw / w


# --------------------------------------------------------------------------------------------- writing


def _resolved(p: PathLike) -> str:
    try:
        return os.path.normcase(str(Path(p).expanduser().resolve()))
    except OSError:
        return os.path.normcase(os.path.abspath(os.fspath(p)))


def _is_protected(path: Path, protect: Iterable[PathLike]) -> bool:
    target = _resolved(path)
    for p in protect:
        if _resolved(p) == target:
            return True
        try:
            if path.exists() and Path(p).exists() and os.path.samefile(path, p):
                return True
        except OSError:
            pass
    return False


def _xmp_packet(description: str, meta: Mapping[str, str]) -> bytes:
    from xml.sax.saxutils import escape, quoteattr

    attrs = "".join(f"\n    anyface:{k}={quoteattr(str(v))}" for k, v in meta.items() if k.isidentifier())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '    xmlns:anyface="https://anyface.invalid/ns/1.0/"' + attrs + ">\n"
        f'   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(description)}</rdf:li></rdf:Alt>'
        "</dc:description>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode("utf-8")


def write_image(path: PathLike, img: np.ndarray, fmt: str | None = None, quality: int = 95,
                metadata: Mapping[str, object] | None = None, *, protect: Iterable[PathLike] = (),
                overwrite: bool = True, description: str | None = DEFAULT_DESCRIPTION) -> Path:
    """Write ``img`` (uint8 HxW, HxWx3 RGB or HxWx4 RGBA) atomically to ``path``.

    ``fmt``: "PNG" | "JPEG" | "WEBP" (default: from the extension). ``quality`` applies to JPEG/WebP.
    ``metadata`` (provenance: str -> JSON-able) is stored as PNG text chunks (one per key plus the whole
    dict as JSON under "AnyFace"), or for JPEG/WebP as JSON in EXIF UserComment plus an XMP packet;
    ``description`` goes to PNG "Description" / EXIF ImageDescription / XMP dc:description.
    Refuses (``OutputError``) to write onto any path in ``protect`` (the inputs), or onto an existing
    file when ``overwrite`` is False. Returns the path written.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    path = Path(path)
    if fmt is None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise OutputError(f"Cannot tell the format of '{path}' from its extension; use .png, .jpg or .webp.")
    fmt = fmt.upper().replace("JPG", "JPEG")
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise OutputError(f"Unsupported output format '{fmt}'. Use PNG, JPEG or WebP.")
    if _is_protected(path, protect):
        raise OutputError(f"Refusing to overwrite the input file '{path}'. Choose another output folder or name.")
    if not overwrite and path.exists():
        raise OutputError(f"'{path}' already exists and overwriting is off.")
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise OutputError(f"Expected a uint8 image HxW, HxWx3 or HxWx4; got {a.dtype} {a.shape}.")
    pil = Image.fromarray(np.ascontiguousarray(a))
    if fmt == "JPEG" and pil.mode == "RGBA":
        pil = Image.fromarray(as_rgb_uint8(a))
    meta = {str(k): v for k, v in (metadata or {}).items()}
    meta_s = {k: (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)) for k, v in meta.items()}
    blob = json.dumps(meta, ensure_ascii=False, default=str, sort_keys=True)
    kwargs: dict = {}
    if fmt == "PNG":
        info = PngInfo()
        if description:
            info.add_itxt("Description", description)
        info.add_itxt("Software", "AnyFace Desktop")
        if meta:
            info.add_itxt(PROVENANCE_KEY, blob)
            for k, v in meta_s.items():
                if k != PROVENANCE_KEY and 0 < len(k) < 80:
                    info.add_itxt(k, v)
        kwargs.update(pnginfo=info, compress_level=6)
    else:
        exif = Image.Exif()
        if description:
            exif[_TAG_DESCRIPTION] = description
        exif[_TAG_SOFTWARE] = "AnyFace Desktop"
        if meta:
            exif.get_ifd(_EXIF_IFD)[_TAG_USER_COMMENT] = b"UNICODE\0" + blob.encode("utf-16-be")
            kwargs["xmp"] = _xmp_packet(description or "", meta_s)
        kwargs.update(exif=exif.tobytes(), quality=int(quality))
        if fmt == "JPEG":
            kwargs.update(optimize=True, subsampling=0 if quality >= 90 else 2)
        else:
            kwargs.update(method=4)
    try:
        under = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    except OSError:  # a folder above cannot be entered: mkstemp below says so
        under = None
    if under is not None:
        raise OutputError(f"Could not write '{path}': '{under}' is a file, not a folder. Choose another folder.")
    try:
        fd, tmp = mkstemp_beside(path, prefix_len=40)  # creates the folder
    except OSError as e:
        raise OutputError(f"Could not write '{path}': {e.strerror or e} (folder '{path.parent}').") from e
    try:
        with os.fdopen(fd, "wb") as f:
            pil.save(f, format=fmt, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"Could not write '{path}': {e}") from e
        raise
    return path


def read_metadata(path: PathLike) -> dict:
    """The provenance dict ``write_image`` stored (empty dict if none), plus "description" when present."""
    out: dict = {}
    with Image.open(path) as img:
        if img.format == "PNG":
            text = dict(getattr(img, "text", {}) or {})
            if PROVENANCE_KEY in text:
                out.update(json.loads(text[PROVENANCE_KEY]))
            if "Description" in text:
                out.setdefault("description", text["Description"])
            return out
        exif = img.getexif()
        uc = exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT)
        if isinstance(uc, bytes) and len(uc) >= 8:
            head, body = uc[:8], uc[8:]
            enc = "utf-16-be" if head.startswith(b"UNICODE") else "utf-8"
            try:
                out.update(json.loads(body.decode(enc)))
            except (ValueError, UnicodeDecodeError):
                pass
        if exif.get(_TAG_DESCRIPTION):
            out.setdefault("description", exif.get(_TAG_DESCRIPTION))
    return out


def unique_path(path: PathLike, *, reserved: Iterable[PathLike] = ()) -> Path:
    """``path`` if free, else ``stem-1.ext``, ``stem-2.ext``... (not existing and not in ``reserved``)."""
    path = Path(path)
    taken = {_resolved(p) for p in reserved}

    def free(p: Path) -> bool:
        return not p.exists() and _resolved(p) not in taken

    if free(path):
        return path
    i = 1
    while True:
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if free(cand):
            return cand
        i += 1


def unique_pair(path: PathLike, companion: str = ".npz") -> Path:
    """``path`` if both it and its ``companion`` file (same stem) are free, else ``stem-1.ext``, ``stem-2.ext``...:
    an image and its latent written together keep one name."""
    path = Path(path)
    cand, i = path, 0
    while cand.exists() or cand.with_suffix(companion).exists():
        i += 1
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return cand


