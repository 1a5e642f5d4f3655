"""The photo pipeline: read -> detect -> align (-> invert, by the caller) -> compose.

``prepare_photo`` does everything that needs no model: it reads the file safely (or takes an array),
finds the faces (on a downscaled copy for big photos), FFHQ-aligns the chosen one(s) at the generator's
resolution and keeps the transforms. ``invert_faces`` runs any inversion callable over the crops (the
engine passes ``functools.partial(core.inversion.invert, generator, tier=...)``), and ``compose`` pastes
an edited aligned face back into the full-resolution original. Nothing here knows about a particular
generator or engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from core.align import DEFAULT_MAX_DETECT_SIDE, AlignTransform, Face, align_face, detect_faces, paste_back
from core.errors import CancelledError, FaceTooSmallError, NoFaceFoundError
from core.io import as_rgb_uint8, load_image

FaceChoice = Union[str, int, Sequence[int]]

#: faces whose eye-to-eye distance is below this (original pixels) are reported as too small
MIN_EYE_DISTANCE = 8.0


@dataclass
class PreparedPhoto:
    """A photo ready for inversion: the full-resolution original, every face found, and the aligned
    crops (+ transforms) of the selected faces (``selected[k]`` is the index in ``faces`` of crop k)."""

    image: np.ndarray  # [H, W, 3] uint8, full resolution, EXIF-rotated
    faces: list[Face]
    selected: list[int]
    aligned: list[np.ndarray]  # [R, R, 3] uint8 each
    transforms: list[AlignTransform]
    resolution: int
    detector: str  # which detector produced the faces
    path: Path | None = None
    alpha: np.ndarray | None = None  # [H, W] uint8 when the file had transparency
    extras: dict = field(default_factory=dict)
    straight: np.ndarray | None = None  # [H, W, 3] the file's colour under its transparency (``image`` is on white)

    def crop_index(self, face_index: int) -> int:
        """Position in ``aligned``/``transforms`` of face ``face_index`` (an index into ``faces``)."""
        try:
            return self.selected.index(face_index)
        except ValueError:
            raise NoFaceFoundError(
                f"Face {face_index} was not prepared (prepared: {self.selected}; the photo has "
                f"{len(self.faces)} face(s)). Prepare it with face={face_index} or face='all'.") from None


def _select(faces: list[Face], face: FaceChoice) -> list[int]:
    if face == "largest":
        return [int(np.argmax([f.area for f in faces]))]
    if face == "all":
        return list(range(len(faces)))
    idx = [face] if isinstance(face, (int, np.integer)) else list(face)
    for i in idx:
        if not 0 <= int(i) < len(faces):
            raise NoFaceFoundError(
                f"The photo has {len(faces)} face(s) (numbered 0..{len(faces) - 1} from left to right); "
                f"face {i} does not exist.")
    return [int(i) for i in idx]


def prepare_photo(path_or_array: Union[str, os.PathLike, np.ndarray], *, resolution: int, detector: str = "auto",
                  face: FaceChoice = "largest", max_detect_side: int = DEFAULT_MAX_DETECT_SIDE,
                  max_pixels: int | None = None, transform_size: int | None = None) -> PreparedPhoto:
    """Read (or take) a photo, find faces and FFHQ-align the chosen ones at ``resolution``.

    ``face``: "largest", "all", an index or a list of indices (faces are numbered left to right).
    Raises ``InvalidImageError``/``ImageTooLargeError`` for bad files, ``NoFaceFoundError`` when no face
    is found (``FaceTooSmallError`` when the chosen face is too small to align meaningfully).
    """
    path = None
    alpha = straight = None
    if isinstance(path_or_array, np.ndarray):
        image = as_rgb_uint8(path_or_array)
        if path_or_array.ndim == 3 and path_or_array.shape[2] == 4 and path_or_array.dtype == np.uint8:
            alpha = np.ascontiguousarray(path_or_array[:, :, 3])
            straight = np.ascontiguousarray(path_or_array[:, :, :3])  # as_rgb_uint8 composites on white
    else:
        loaded = load_image(path_or_array, max_pixels=max_pixels)
        image, alpha, path, straight = loaded.rgb, loaded.alpha, loaded.path, loaded.straight
    faces = detect_faces(image, detector, max_detect_side=max_detect_side)
    name = f"'{path.name}'" if path is not None else "the photo"
    if not faces:
        raise NoFaceFoundError(
            f"No face was found in {name} (detector: {detector}). Use a photo where the face is visible, "
            "roughly frontal and at least ~80 pixels wide, or try another detector (Settings; command line: --detector).")
    selected = _select(faces, face)
    aligned, transforms = [], []
    for i in selected:
        el, er, _, _ = faces[i].eyes_mouth()
        if np.hypot(*(er - el)) < MIN_EYE_DISTANCE:
            raise FaceTooSmallError(
                f"Face {i} in {name} is too small to edit (eyes {np.hypot(*(er - el)):.0f} px apart). "
                "Use a larger photo of the face.")
        a, t = align_face(image, faces[i], resolution, transform_size=transform_size)
        aligned.append(a)
        transforms.append(t)
    return PreparedPhoto(image=image, faces=faces, selected=selected, aligned=aligned, transforms=transforms,
                         resolution=int(resolution), detector=faces[0].detector, path=path, alpha=alpha,
                         straight=straight)


def invert_faces(prepared: PreparedPhoto, invert_fn: Callable[[np.ndarray], object], *,
                 progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> list:
    """Apply ``invert_fn(aligned_crop) -> ws`` to every prepared crop (in ``selected`` order)."""
    out = []
    n = len(prepared.aligned)
    for k, crop in enumerate(prepared.aligned):
        if should_cancel is not None and should_cancel():
            raise CancelledError("Inversion cancelled.")
        out.append(invert_fn(crop))
        if progress is not None:
            progress(k + 1, n)
    return out


def compose(prepared: PreparedPhoto, face_index: int, edited_aligned: np.ndarray, *, feather: float = 0.08,
            region: str = "face", base: np.ndarray | None = None) -> np.ndarray:
    """Paste ``edited_aligned`` (RGB uint8 [S, S, 3], any S) for face ``face_index`` (index into
    ``prepared.faces``) back into the full-resolution original (or into ``base``, e.g. to chain several
    faces). Returns RGB uint8 [H, W, 3]; pixels outside the feathered face region are unchanged."""
    k = prepared.crop_index(face_index)
    target = prepared.image if base is None else base
    return paste_back(target, edited_aligned, prepared.transforms[k], feather=feather, region=region)


def compose_all(prepared: PreparedPhoto, edited: dict[int, np.ndarray], **kw) -> np.ndarray:
    """``compose`` several faces ({face_index: edited crop}) into one full-resolution result."""
    out = prepared.image
    for i, crop in edited.items():
        out = compose(prepared, i, crop, base=out, **kw)
    return out.copy() if out is prepared.image else out


def with_alpha(prepared: PreparedPhoto, rgb: np.ndarray) -> np.ndarray:
    """Re-attach the original's transparency (RGBA uint8) when it had any; else return ``rgb``
    (see :func:`restore_alpha`)."""
    if prepared.alpha is None:
        return rgb
    return restore_alpha(rgb, prepared.image, prepared.alpha, prepared.straight)


def restore_alpha(rgb: np.ndarray, on_white: np.ndarray, alpha: np.ndarray,
                  straight: np.ndarray | None) -> np.ndarray:
    """An edit ``rgb`` of ``on_white`` (a photo with transparency ``alpha``, composited on white) -> RGBA uint8.

    Where the edit changed nothing, the file's own colour ``straight`` comes back (the composited colour under
    partial transparency is not the file's: a soft cut-out edge turned whitish); where it changed a pixel, the
    edited colour is taken off the white again. Without ``straight`` the colours are kept as they are."""
    out = rgb
    if straight is not None and straight.shape == rgb.shape == on_white.shape:
        out = straight.copy()
        changed = np.any(rgb != on_white, axis=2)
        a = alpha[changed].astype(np.float32)[:, None] / 255.0
        c = rgb[changed].astype(np.float32)
        un = np.where(a > 0, (c - 255.0 * (1.0 - a)) / np.maximum(a, 1e-6), c)
        out[changed] = np.clip(np.round(un), 0, 255).astype(np.uint8)
    return np.concatenate([out, alpha[:, :, None]], axis=2)
