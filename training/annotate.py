"""Attribute annotator for generated 64 px faces.

Geometry (mouth open, smile, head turn, looking up/down, eyes closed) comes from dlib's 68 landmarks on the
face upscaled to 256 px (HOG detector; a fixed centred box where HOG finds nothing, the faces are centred).
Colours and lighting are pixel statistics in landmark-defined regions. Every attribute is first a continuous
measurement; ``label`` turns it into a discrete value only where the measurement is clearly on one side, and
``None`` (not captioned, not scored) in the ambiguous middle.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

UPSCALE = 256
FALLBACK_BOX = (35, 66, 214, 254)  # median HOG box on DCGAN samples at 256 px

# attribute -> its possible values (the first value of a binary attribute is the "present" one)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair": ("black", "brown", "blond", "red", "gray"),
    "skin": ("light", "medium", "dark"),
    "background": ("green", "blue", "white", "dark", "gray", "warm"),
    "mouth": ("open", "closed"),
    "smile": ("smiling", "neutral"),
    "yaw": ("left", "right", "frontal"),
    "pitch": ("up", "down"),
    "light": ("bright", "dark"),
    "sidelight": ("left", "right"),
}


@dataclass
class Annotation:
    """Measurements and discrete labels of one face."""

    measures: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    detected: bool = False
    landmarks: np.ndarray | None = None  # [68, 2] in 256 px coordinates


_models: dict[str, object] = {}


def _dlib():
    if not _models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dlib
            import face_recognition_models
        _models["det"] = dlib.get_frontal_face_detector()
        _models["sp"] = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        _models["dlib"] = dlib
    return _models["dlib"], _models["det"], _models["sp"]


def landmarks68(face: np.ndarray) -> tuple[np.ndarray, bool]:
    """face: uint8 [64, 64, 3] RGB -> ([68, 2] float in 256 px coordinates, HOG detected?)."""
    dlib, det, sp = _dlib()
    big = cv2.resize(face, (UPSCALE, UPSCALE), interpolation=cv2.INTER_CUBIC)
    rects = det(big, 0)
    if len(rects):
        r = max(rects, key=lambda r: r.area())
        detected = True
    else:
        r = dlib.rectangle(*FALLBACK_BOX)
        detected = False
    s = sp(big, r)
    return np.array([[p.x, p.y] for p in s.parts()], np.float32), detected


def _hsv_stats(img_f: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """img_f float RGB [H, W, 3] in [0, 1]; returns (hue deg circular mean, sat, val, median rgb)."""
    px = img_f[mask]
    if len(px) == 0:
        return 0.0, 0.0, 0.0, np.zeros(3, np.float32)
    rgb = np.median(px, 0)
    hsv = cv2.cvtColor(px[None].astype(np.float32), cv2.COLOR_RGB2HSV)[0]
    ang = np.deg2rad(hsv[:, 0])
    wts = hsv[:, 1] + 1e-3
    hue = float(np.rad2deg(np.arctan2((np.sin(ang) * wts).sum(), (np.cos(ang) * wts).sum())) % 360)
    return hue, float(np.median(hsv[:, 1])), float(np.median(hsv[:, 2])), rgb


def _poly_mask(pts: np.ndarray, size: int = UPSCALE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def measure(face: np.ndarray) -> Annotation:
    """Continuous measurements on one face (uint8 [64, 64, 3] RGB)."""
    lm, detected = landmarks68(face)
    big = cv2.resize(face, (UPSCALE, UPSCALE), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    m: dict[str, float] = {}
    jaw_l, jaw_r, chin = lm[0], lm[16], lm[8]
    face_w = float(np.linalg.norm(jaw_r - jaw_l)) + 1e-6
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eyes_mid = (eye_l + eye_r) / 2
    brow_y = float(lm[17:27, 1].mean())
    face_h = float(chin[1] - brow_y) + 1e-6
    # head turn: nose tip between the jaw ends (0.5 = frontal; < 0.5 nose toward image left)
    m["yaw"] = float((lm[30, 0] - jaw_l[0]) / (jaw_r[0] - jaw_l[0] + 1e-6))
    # pitch: where the nose tip sits between the eye line and the upper lip (the open jaw does not move it)
    m["pitch"] = float((lm[30, 1] - eyes_mid[1]) / (lm[51, 1] - eyes_mid[1] + 1e-6))
    # mouth opening: inner-lip gap over mouth width
    mouth_w = float(np.linalg.norm(lm[54] - lm[48])) + 1e-6
    m["mouth_open"] = float(np.linalg.norm(lm[66] - lm[62]) / mouth_w)
    # smile: corners raised above the lip centre line, and a wide mouth relative to the face
    centre_y = (lm[62, 1] + lm[66, 1]) / 2
    m["smile_lift"] = float((centre_y - (lm[48, 1] + lm[54, 1]) / 2) / face_h)
    m["mouth_width"] = mouth_w / face_w
    # eyes: eye aspect ratio (vertical lid gap over eye width), mean of both eyes
    def ear(e):
        return (np.linalg.norm(e[1] - e[5]) + np.linalg.norm(e[2] - e[4])) / (2 * np.linalg.norm(e[0] - e[3]) + 1e-6)
    m["ear"] = float((ear(lm[36:42]) + ear(lm[42:48])) / 2)
    # eye region darkness vs cheek (closed eyes look like skin)
    gray = cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)
    # glasses: edge energy on the nose bridge between the eyes and just under the eyes (frames/rims)
    gy = np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    gx = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3))
    bx0, bx1 = int(lm[39, 0]), int(lm[42, 0])
    by0, by1 = int(lm[27, 1] - 0.06 * face_h), int(lm[28, 1] + 0.02 * face_h)
    bridge = gy[max(by0, 0):max(by1, by0 + 1), max(bx0, 0):max(bx1, bx0 + 1)]
    # rim below each eye: a band between the lower lid and the nose-tip height
    rim_y0, rim_y1 = int(max(lm[40, 1], lm[47, 1]) + 0.05 * face_h), int(lm[29, 1])
    rim_l = gy[rim_y0:max(rim_y1, rim_y0 + 1), int(lm[36, 0]):int(lm[39, 0])]
    rim_r = gy[rim_y0:max(rim_y1, rim_y0 + 1), int(lm[42, 0]):int(lm[45, 0])]
    cheek_ref = gx[int(lm[30, 1]):int(lm[33, 1]), int(lm[31, 0]):int(lm[35, 0])]
    m["glasses"] = float((np.mean(bridge) if bridge.size else 0) * 0.5
                         + (np.mean(rim_l) if rim_l.size else 0) * 0.25 + (np.mean(rim_r) if rim_r.size else 0) * 0.25)
    m["glasses_rel"] = m["glasses"] / (float(np.mean(cheek_ref)) + 0.02 if cheek_ref.size else 0.02)
    # skin: cheeks and nose (below the eyes, above the mouth, inside the jaw)
    skin_mask = _poly_mask(np.array([lm[1], lm[29], lm[15], lm[13], lm[54], lm[33], lm[48], lm[3]]))
    sh, ss, sv, srgb = _hsv_stats(big, skin_mask)
    m["skin_val"] = float(0.299 * srgb[0] + 0.587 * srgb[1] + 0.114 * srgb[2])
    m["skin_sat"] = ss
    # lighting: face brightness, and left vs right cheek luminance
    left = _poly_mask(np.array([lm[1], lm[29], lm[33], lm[48], lm[3]]))
    right = _poly_mask(np.array([lm[15], lm[29], lm[33], lm[54], lm[13]]))
    face_mask = _poly_mask(np.concatenate([lm[0:17], lm[26:16:-1]]))
    m["face_val"] = float(gray[face_mask].mean()) if face_mask.any() else 0.0
    lv = float(gray[left].mean()) if left.any() else 0.0
    rv = float(gray[right].mean()) if right.any() else 0.0
    m["side"] = (lv - rv) / (lv + rv + 1e-3)
    # hair: a band above the brows, inside the face width (the faces are cropped at the forehead)
    hy1 = int(max(brow_y - 0.45 * face_h, 2))
    hx0, hx1 = int(max(lm[17, 0], 0)), int(min(lm[26, 0], UPSCALE))
    hair_mask = np.zeros((UPSCALE, UPSCALE), bool)
    hair_mask[0:max(hy1, 8), hx0:max(hx1, hx0 + 1)] = True
    hh, hs, hv, hrgb = _hsv_stats(big, hair_mask)
    m.update(hair_hue=hh, hair_sat=hs, hair_val=hv)
    # hair contrast to skin (a bald/skin forehead looks like the skin)
    m["hair_skin_dist"] = float(np.linalg.norm(hrgb - srgb))
    # background: side strips outside the jaw line at eye-to-mouth height, and the top corners
    bg_mask = np.zeros((UPSCALE, UPSCALE), bool)
    y0, y1 = int(max(eyes_mid[1] - 0.3 * face_h, 0)), int(min(lm[57, 1], UPSCALE))
    xl = int(max(min(lm[0:5, 0].min() - 10, 28), 0))
    xr = int(min(max(lm[12:17, 0].max() + 10, UPSCALE - 28), UPSCALE))
    bg_mask[y0:y1, 0:xl] = True
    bg_mask[y0:y1, xr:] = True
    bg_mask[0:24, 0:24] = True
    bg_mask[0:24, -24:] = True
    bh, bs, bv, _ = _hsv_stats(big, bg_mask)
    m.update(bg_hue=bh, bg_sat=bs, bg_val=bv)
    return Annotation(measures=m, detected=detected, landmarks=lm)


def label(a: Annotation) -> dict[str, str]:
    """Discrete labels from the measurements; ambiguous attributes are left out."""
    m = a.measures
    out: dict[str, str] = {}
    # hair colour (HSV of the band above the brows)
    h, s, v = m["hair_hue"], m["hair_sat"], m["hair_val"]
    if m["hair_skin_dist"] > 0.08:
        if v < 0.2:
            out["hair"] = "black"
        elif s < 0.18 and v > 0.45:
            out["hair"] = "gray"
        elif (h < 22 or h > 345) and s > 0.55 and v > 0.3:
            out["hair"] = "red"
        elif 25 <= h <= 65 and v > 0.5 and s < 0.6:
            out["hair"] = "blond"
        elif (h < 45 or h > 345) and 0.2 <= v <= 0.5 and s > 0.25:
            out["hair"] = "brown"
    # skin tone
    sv = m["skin_val"]
    if sv > 0.5:
        out["skin"] = "light"
    elif sv < 0.2:
        out["skin"] = "dark"
    elif 0.28 < sv < 0.42:
        out["skin"] = "medium"
    # background colour
    h, s, v = m["bg_hue"], m["bg_sat"], m["bg_val"]
    if v < 0.2:
        out["background"] = "dark"
    elif s < 0.12 and v > 0.75:
        out["background"] = "white"
    elif s < 0.12 and 0.3 < v <= 0.75:
        out["background"] = "gray"
    elif s > 0.3 and 75 <= h <= 160 and v > 0.25:
        out["background"] = "green"
    elif s > 0.3 and 185 <= h <= 260 and v > 0.25:
        out["background"] = "blue"
    elif s > 0.35 and (h < 45 or h > 340) and v > 0.3:
        out["background"] = "warm"
    # mouth
    if m["mouth_open"] > 0.22:
        out["mouth"] = "open"
    elif m["mouth_open"] < 0.04:
        out["mouth"] = "closed"
    # smile: raised corners on a wide mouth
    if m["smile_lift"] > 0.045 and m["mouth_width"] > 0.38:
        out["smile"] = "smiling"
    elif m["smile_lift"] < -0.005:
        out["smile"] = "neutral"
    # head turn (image left/right = the side the nose points to in the picture)
    if m["yaw"] < 0.38:
        out["yaw"] = "left"
    elif m["yaw"] > 0.62:
        out["yaw"] = "right"
    elif 0.45 < m["yaw"] < 0.55:
        out["yaw"] = "frontal"
    # looking up / down
    if m["pitch"] < 0.43:
        out["pitch"] = "up"
    elif m["pitch"] > 0.69:
        out["pitch"] = "down"
    # Eyes closed and glasses are measured (``ear``, ``glasses_rel``) but not labelled: checked by hand on
    # ranked grids, neither separates the classes on these 64 px faces (squints and hat brims dominate).
    # lighting
    if m["face_val"] > 0.5:
        out["light"] = "bright"
    elif m["face_val"] < 0.17:
        out["light"] = "dark"
    if m["side"] > 0.2:
        out["sidelight"] = "left"
    elif m["side"] < -0.2:
        out["sidelight"] = "right"
    return out


def annotate(face: np.ndarray) -> Annotation:
    """Measure and label one face (uint8 [64, 64, 3] RGB)."""
    a = measure(face)
    a.labels = label(a)
    return a


def annotate_batch(faces: np.ndarray, progress=None) -> list[Annotation]:
    """faces: uint8 [N, 64, 64, 3] RGB."""
    out = []
    for i, f in enumerate(faces):
        out.append(annotate(f))
        if progress is not None:
            progress(i + 1, len(faces))
    return out


def build_dataset(n: int, seed: int, progress=None) -> dict:
    """Sample ``n`` DCGAN faces from ``seed`` and annotate them: {z, faces uint8, labels list, measures}."""
    import torch

    from training.dcgan import load_dcgan, sample_faces, sample_z, to_uint8

    g = load_dcgan()
    z = sample_z(n, seed)
    faces = to_uint8(sample_faces(g, z))
    ann = annotate_batch(faces, progress=progress)
    keys = sorted(ann[0].measures)
    return {
        "z": z,
        "faces": torch.from_numpy(faces),
        "labels": [a.labels for a in ann],
        "measure_keys": keys,
        "measures": torch.tensor([[a.measures[k] for k in keys] for a in ann]),
        "detected": torch.tensor([a.detected for a in ann]),
    }


def cached_dataset(path, n: int, seed: int, chunk: int = 500, log=print) -> dict:
    """``build_dataset`` in resumable chunks saved next to ``path`` (a torch file)."""
    import os

    import torch

    from training.dist import atomic_torch_save, load_cache

    if os.path.exists(path):
        return load_cache(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # before the first (slow) chunk, not after
    parts = []
    for i, start in enumerate(range(0, n, chunk)):
        part_path = f"{path}.part{i:04d}"
        if os.path.exists(part_path):
            parts.append(load_cache(part_path))
            continue
        part = build_dataset(min(chunk, n - start), seed * 100003 + i)
        atomic_torch_save(part, part_path)
        parts.append(part)
        log(f"annotated {start + len(part['labels'])}/{n}")
    data = {
        "z": torch.cat([p["z"] for p in parts]),
        "faces": torch.cat([p["faces"] for p in parts]),
        "labels": sum((p["labels"] for p in parts), []),
        "measure_keys": parts[0]["measure_keys"],
        "measures": torch.cat([p["measures"] for p in parts]),
        "detected": torch.cat([p["detected"] for p in parts]),
    }
    atomic_torch_save(data, path)
    for i in range(len(parts)):
        os.remove(f"{path}.part{i:04d}")
    return data
