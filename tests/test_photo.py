"""core.photo: the real-photo pipeline on files users actually have (rotated, CMYK, 16-bit, alpha, groups)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.align import warped_mask
from core.errors import CancelledError, ImageTooLargeError, InvalidImageError, NoFaceFoundError
from core.io import write_image
from core.photo import PreparedPhoto, compose, compose_all, invert_faces, prepare_photo, with_alpha

skdata = pytest.importorskip("skimage.data")
SAMPLES = Path(__file__).resolve().parent.parent / "resources" / "samples"
EYE_LEFT = np.array([203, 102])


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


def _eye_left(p: PreparedPhoto, k: int = 0) -> np.ndarray:
    return p.faces[p.selected[k]].eyes_mouth()[0]


def test_sample_photo_end_to_end(tmp_path):
    src = SAMPLES / "astronaut.jpg"
    p = prepare_photo(src, resolution=64)
    assert p.detector == "dlib" and len(p.faces) == 1 and p.selected == [0]
    assert p.aligned[0].shape == (64, 64, 3) and p.image.shape == (512, 512, 3) and p.path == src
    assert np.hypot(*(_eye_left(p) - EYE_LEFT)) < 6
    edited = p.aligned[0].copy()
    edited[..., 0] = 255  # "make it red"
    out = compose(p, 0, edited)
    wm = warped_mask(p.transforms[0])
    assert out.shape == p.image.shape and np.array_equal(out[wm == 0], p.image[wm == 0])
    assert out[wm > 0.99][:, 0].min() >= 250
    dst = write_image(tmp_path / "edited.png", out, metadata={"ai_edited": True}, protect=[src])
    assert dst.exists()


def test_exif_rotated_phone_picture(tmp_path, astronaut):
    stored = np.ascontiguousarray(np.rot90(astronaut, k=1))  # sensor stored it sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer must rotate 90 CW: gives the upright astronaut back
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    p = prepare_photo(path, resolution=64)
    assert p.image.shape == (512, 512, 3)
    assert np.hypot(*(_eye_left(p) - EYE_LEFT)) < 6


@pytest.mark.parametrize("kind", ["cmyk", "grey16", "rgba", "palette"])
def test_unusual_modes(tmp_path, astronaut, kind):
    im = Image.fromarray(astronaut)
    if kind == "cmyk":
        path = tmp_path / "scan.jpg"
        im.convert("CMYK").save(path, quality=95)
    elif kind == "grey16":
        path = tmp_path / "deep.png"
        Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257).save(path)
    elif kind == "rgba":
        path = tmp_path / "alpha.png"
        rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
        rgba[:, 400:, 3] = 0  # transparent strip far from the face
        Image.fromarray(rgba).save(path)
    else:
        path = tmp_path / "palette.gif"
        im.convert("P", palette=Image.ADAPTIVE, colors=256).save(path)
    p = prepare_photo(path, resolution=64)
    assert len(p.faces) >= 1 and np.hypot(*(_eye_left(p) - EYE_LEFT)) < 8
    out = compose(p, p.selected[0], p.aligned[0])
    if kind == "rgba":
        assert p.alpha is not None
        rgba_out = with_alpha(p, out)
        assert rgba_out.shape == (512, 512, 4) and (rgba_out[:, 400:, 3] == 0).all()
    else:
        assert p.alpha is None and with_alpha(p, out) is out


def test_group_photo_all_faces(astronaut):
    tile = astronaut[20:260, 110:350]
    group = np.concatenate([tile, np.ascontiguousarray(tile[:, ::-1]), tile], axis=1)
    p = prepare_photo(group, resolution=32, face="all")
    assert len(p.faces) == 3 and p.selected == [0, 1, 2] and len(p.aligned) == 3
    one = prepare_photo(group, resolution=32, face=2)
    assert one.selected == [2] and np.allclose(one.transforms[0].matrix, p.transforms[2].matrix)
    with pytest.raises(NoFaceFoundError, match="3 face"):
        prepare_photo(group, resolution=32, face=5)
    edited = {i: 255 - p.aligned[k] for k, i in enumerate(p.selected)}
    out = compose_all(p, edited)
    for k in range(3):
        wm = warped_mask(p.transforms[k])
        assert (out[wm > 0.99] != group[wm > 0.99]).any()
    union = sum(warped_mask(t) for t in p.transforms)
    assert np.array_equal(out[union == 0], group[union == 0])
    with pytest.raises(NoFaceFoundError, match="not prepared"):
        compose(one, 0, one.aligned[0])


def test_huge_photo_detected_small_composed_full(astronaut):
    import cv2

    big = cv2.resize(astronaut, (3464, 3464), interpolation=cv2.INTER_LINEAR)  # 12 MP
    p = prepare_photo(big, resolution=64, max_detect_side=800)
    assert p.image.shape == big.shape
    assert np.hypot(*(_eye_left(p) / (3464 / 512) - EYE_LEFT)) < 6
    out = compose(p, 0, 255 - p.aligned[0])
    assert out.shape == big.shape and (out != big).any(2).sum() > 100_000


def test_no_face_and_bad_files(tmp_path):
    path = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()).save(path)
    with pytest.raises(NoFaceFoundError, match="coffee.png"):
        prepare_photo(path, resolution=64)
    camera = np.repeat(skdata.camera()[:, :, None], 3, axis=2)
    with pytest.raises(NoFaceFoundError):
        prepare_photo(camera, resolution=64, detector="dlib")
    assert prepare_photo(camera, resolution=64).detector == "yunet"  # auto falls back
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InvalidImageError):
        prepare_photo(bad, resolution=64)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImageError):
        prepare_photo(empty, resolution=64)
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    with pytest.raises(ImageTooLargeError):
        prepare_photo(big, resolution=64, max_pixels=50_000)


def test_lfw_faces_upscaled(astronaut):
    import cv2

    lfw = skdata.lfw_subset()  # 100 faces then 100 non-faces, 25x25
    hits = 0
    for i in range(0, 100, 10):
        face = cv2.resize((lfw[i] * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
        try:
            p = prepare_photo(np.repeat(face[:, :, None], 3, axis=2), resolution=32)
        except NoFaceFoundError:
            continue
        hits += 1
        assert p.aligned[0].shape == (32, 32, 3)
    assert hits >= 7


def test_invert_faces_with_any_callable(astronaut):
    tile = astronaut[20:260, 110:350]
    p = prepare_photo(np.concatenate([tile, tile], axis=1), resolution=32, face="all")
    seen = []
    out = invert_faces(p, lambda crop: crop.mean(), progress=lambda d, t: seen.append((d, t)))
    assert len(out) == 2 and seen == [(1, 2), (2, 2)]
    with pytest.raises(CancelledError):
        invert_faces(p, lambda crop: 0, should_cancel=lambda: True)


def test_an_edit_keeps_the_colour_under_partial_transparency(tmp_path, astronaut):
    """A cut-out portrait with soft edges: its colours under partial alpha came back composited on white (a whitish
    halo, 90 levels off) wherever the edit changed nothing; they must come back as the file has them."""
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[400:, :, 3] = 128  # a soft band far from the face
    path = tmp_path / "soft.png"
    Image.fromarray(rgba).save(path)
    p = prepare_photo(path, resolution=64)
    assert p.straight is not None and np.array_equal(p.straight, astronaut)
    edited = compose(p, p.selected[0], np.ascontiguousarray(255 - p.aligned[0]))  # a visible edit of the face
    out = with_alpha(p, edited)
    assert out.shape == (512, 512, 4) and np.array_equal(out[..., 3], rgba[..., 3])
    assert np.array_equal(out[400:], rgba[400:])  # away from the face: the file's own pixels
    changed = np.any(edited != p.image, axis=2)
    assert changed.sum() > 1000 and np.array_equal(out[..., :3][changed], edited[changed])  # opaque: as edited
    # an RGBA array (no file): the same
    q = prepare_photo(rgba, resolution=64)
    assert np.array_equal(with_alpha(q, q.image), rgba)
