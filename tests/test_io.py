"""core.io: safe reading (modes, EXIF, animation, bombs, damaged files) and atomic, protected writing."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageTooLargeError, InvalidImageError, OutputError
from core.io import (as_rgb_uint8, load_image, read_image, read_metadata, resize_max_side, unique_path,
                     write_image)


def _gradient(h=40, w=60) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "bmp", "tiff"])
def test_roundtrip_common_formats(tmp_path, ext):
    img = _gradient()
    p = tmp_path / f"a.{ext}"
    Image.fromarray(img).save(p, quality=95) if ext in ("jpg", "webp") else Image.fromarray(img).save(p)
    out = read_image(p)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < (4 if ext in ("jpg", "webp") else 0.01)


def test_exif_orientation_applied(tmp_path):
    img = np.zeros((30, 50, 3), np.uint8)
    img[:, :10] = (255, 0, 0)  # red stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    Image.fromarray(img).save(p, exif=exif.tobytes(), quality=95)
    li = load_image(p)
    assert li.rgb.shape == (50, 30, 3) and li.exif_transposed
    assert li.rgb[:10, :, 0].mean() > 200 and li.rgb[-10:, :, 0].mean() < 50  # stripe now on top


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    base = Image.fromarray(_gradient())
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
        assert im.mode == "I;16"
        fmt = "png"
    elif mode == "I":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 257, "I")
        fmt = "tiff"
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0, "F")
        fmt = "tiff"
    elif mode == "PA":  # palette + transparent index
        im = base.convert("P")
        im.info["transparency"] = 0
        fmt = "png"
    else:
        im = base.convert(mode)
        fmt = {"CMYK": "jpg", "YCbCr": "jpg"}.get(mode, "png")
    p = tmp_path / f"m.{fmt}"
    im.save(p)
    li = load_image(p)
    assert li.rgb.dtype == np.uint8 and li.rgb.shape == (40, 60, 3)
    if mode in ("I;16", "I", "F"):  # full range kept, not clipped to 255/65535
        grey = np.asarray(base.convert("L")).astype(int)
        assert np.abs(li.rgb[:, :, 0].astype(int) - grey).max() <= 1


@pytest.mark.parametrize("kind", ["float32 0-1", "float16 0-1", "float32 0-255", "float32 planar", "int32",
                                  "float32 rgba"])
def test_tiffs_pillow_cannot_read_are_read_by_tifffile(tmp_path, kind):
    """Float / 32-bit RGB TIFFs (HDR tools, scientific cameras): Pillow has no reader for them; they used to be
    refused as "not an image"."""
    import tifffile
    rgb = _gradient()
    p = tmp_path / "f.tif"
    if kind == "float32 planar":
        tifffile.imwrite(p, np.moveaxis(rgb.astype(np.float32) / 255, 2, 0), planarconfig="separate",
                         photometric="rgb")
    elif kind == "float32 rgba":
        a = np.dstack([rgb / 255.0, np.ones(rgb.shape[:2])]).astype(np.float32)
        a[:, :30, 3] = 0.0  # left half transparent
        tifffile.imwrite(p, a, photometric="rgb", extrasamples=["unassalpha"])
    else:
        dtype, scale = {"float32 0-1": (np.float32, 1 / 255), "float16 0-1": (np.float16, 1 / 255),
                        "float32 0-255": (np.float32, 1.0), "int32": (np.int32, 257)}[kind]
        tifffile.imwrite(p, (rgb.astype(np.float64) * scale).astype(dtype), photometric="rgb")
    with pytest.raises(Exception):
        Image.open(p).load()  # still true of Pillow? then this fallback is what reads them
    before = p.read_bytes()
    li = load_image(p)
    assert li.format == "TIFF" and li.rgb.dtype == np.uint8 and li.rgb.shape == rgb.shape
    if kind == "float32 rgba":
        assert li.alpha is not None and (li.rgb[:, :30] == 255).all()
        assert np.abs(li.rgb[:, 30:].astype(int) - rgb[:, 30:]).max() <= 1
    else:
        assert np.abs(li.rgb.astype(int) - rgb).max() <= 1
    assert np.array_equal(read_image(before), li.rgb)  # from bytes too
    assert p.read_bytes() == before
    with pytest.raises(ImageTooLargeError):
        load_image(p, max_pixels=100)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(before[: len(before) // 3])
    with pytest.raises(InvalidImageError, match="cut.tif"):
        load_image(cut)


def test_tiff_fallback_alpha_compression_and_orientation_as_a_photo_editor_writes_them(tmp_path):
    """From a review of the tifffile fallback: colour and alpha were scaled together (0..255 colour with alpha 1.0
    came out white); LZW with the floating-point predictor (Photoshop, GDAL) needed imagecodecs; the Orientation
    tag was ignored while Pillow's TIFFs are turned upright."""
    import tifffile

    rgb = _gradient()
    p = tmp_path / "a.tif"
    for scale in (1.0, 4.0 / 255):  # 0..255 floats, and HDR 0..4
        a = np.dstack([rgb * scale, np.ones(rgb.shape[:2])]).astype(np.float32)
        tifffile.imwrite(p, a, photometric="rgb", extrasamples=["unassalpha"])
        li = load_image(p)
        assert li.alpha is None and li.rgb.mean() < 200  # opaque, not blended onto white
        if scale == 1.0:
            assert np.abs(li.rgb.astype(int) - rgb).max() <= 1
    tifffile.imwrite(p, rgb.astype(np.float32) / 255, photometric="rgb", compression="lzw", predictor=True)
    assert np.abs(load_image(p).rgb.astype(int) - rgb).max() <= 1
    tifffile.imwrite(p, rgb.astype(np.float32) / 255, photometric="rgb", compression="zlib")
    assert np.abs(load_image(p).rgb.astype(int) - rgb).max() <= 1
    for o in range(1, 9):
        tifffile.imwrite(p, rgb.astype(np.float32) / 255, photometric="rgb", extratags=[(274, "H", 1, o, True)])
        Image.fromarray(rgb).save(tmp_path / "ref.png", exif=_exif_orientation(o))  # Pillow turns this one
        ref, got = load_image(tmp_path / "ref.png"), load_image(p)
        assert got.rgb.shape == ref.rgb.shape and np.abs(got.rgb.astype(int) - ref.rgb).max() <= 1, o
        assert got.exif_transposed == ref.exif_transposed == (o != 1)


def test_unsigned_32_bit_grey_tiff_keeps_its_range(tmp_path):
    """Pillow opens it as signed 32-bit: values above 2**31 wrapped negative and the picture came out flat grey."""
    import tifffile

    a = np.linspace(0, 2**32 - 1, 40 * 60).reshape(40, 60).astype(np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", a)
    g = load_image(tmp_path / "u32.tif").rgb[:, :, 0].astype(int)
    assert g[0, 0] == 0 and g[-1, -1] == 255 and np.all(np.diff(g.ravel()) >= 0)
    tifffile.imwrite(tmp_path / "i32.tif", (a.astype(np.int64) - 2**31).astype(np.int32))  # signed: kept as is
    g = load_image(tmp_path / "i32.tif").rgb[:, :, 0].astype(int)
    assert g[0, 0] == 0 and g[-1, -1] == 255


def _exif_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    return ex.tobytes()


def test_alpha_is_separated_and_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 10:, 3] = 255  # left half transparent
    p = tmp_path / "a.png"
    Image.fromarray(rgba).save(p)
    li = load_image(p)
    assert li.alpha is not None and li.alpha[:, :10].max() == 0
    assert (li.rgb[:, :10] == 255).all() and (li.rgb[:, 10:] == (200, 0, 0)).all()


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    li = load_image(p)
    assert li.n_frames == 3 and tuple(li.rgb[8, 8]) == (255, 0, 0)


def test_unicode_path(tmp_path):
    p = tmp_path / "фото 顔 😀" / "ünïcødé.png"
    write_image(p, _gradient())
    assert (read_image(p) == _gradient()).all()


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(50_000, 50_000))  # 2.5 gigapixels declared, a few bytes on disk
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        read_image(p)
    with pytest.raises(ImageTooLargeError):  # above Pillow's own hard limit too
        read_image(_png_header_only(20_000, 20_000))


def test_max_pixels_is_configurable(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.fromarray(_gradient(100, 100)).save(p)
    with pytest.raises(ImageTooLargeError, match="limit of 0.005 megapixels"):
        read_image(p, max_pixels=5000)
    monkeypatch.setenv("ANYFACE_MAX_PIXELS", "5000")
    with pytest.raises(ImageTooLargeError):
        read_image(p)
    assert read_image(p, max_pixels=10_000).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 89478485 or Image.MAX_IMAGE_PIXELS is not None  # global left alone


def test_bad_files_raise_invalid_image(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_gradient(200, 200)).save(good, quality=95)
    data = good.read_bytes()
    cases = {
        "empty.png": b"",
        "text.png": b"hello, I am not an image\n" * 10,
        "random.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated.jpg": data[: len(data) // 2],
        "header_only.png": _png_header_only(64, 64)[:40],
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(InvalidImageError) as ei:
            read_image(p)
        assert not isinstance(ei.value, ImageTooLargeError), name
        assert str(p.name) in str(ei.value) or "empty" in str(ei.value), name
    with pytest.raises(InvalidImageError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="folder"):
        read_image(tmp_path)
    with pytest.raises(InvalidImageError):
        read_image(b"")


def test_bytes_and_file_objects():
    buf = io.BytesIO()
    Image.fromarray(_gradient()).save(buf, "PNG")
    assert (read_image(buf.getvalue()) == _gradient()).all()
    buf.seek(0)
    assert (read_image(buf) == _gradient()).all()


def test_as_rgb_uint8_and_resize():
    g = np.full((10, 12), 0.5, np.float32)
    assert as_rgb_uint8(g).shape == (10, 12, 3) and as_rgb_uint8(g)[0, 0, 0] == 128
    assert as_rgb_uint8(np.full((4, 4, 1), 65535, np.uint16)).max() == 255
    with pytest.raises(InvalidImageError):
        as_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    small, s = resize_max_side(np.zeros((400, 1000, 3), np.uint8), 500)
    assert small.shape == (200, 500, 3) and s == 0.5
    same, s1 = resize_max_side(small, 500)
    assert same is small and s1 == 1.0


# ----------------------------------------------------------------------------------------------- writing

@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_write_with_provenance(tmp_path, ext):
    meta = {"ai_edited": True, "captions": ["red hair", "smiling"], "software": "AnyFace Desktop", "seed": 3}
    p = write_image(tmp_path / f"out.{ext}", _gradient(), quality=90, metadata=meta)
    back = read_metadata(p)
    for k, v in meta.items():
        assert back[k] == v
    assert back["description"].startswith("AI-edited")
    if ext != "png":
        assert b"dc:description" in (Image.open(p).info.get("xmp") or b"")
    assert read_image(p).shape == (40, 60, 3)
    assert [f.name for f in tmp_path.iterdir()] == [f"out.{ext}"]  # no temp files left behind


def test_write_rgba_and_grey(tmp_path):
    rgba = np.dstack([_gradient(), np.full((40, 60), 128, np.uint8)])
    write_image(tmp_path / "a.png", rgba)
    assert Image.open(tmp_path / "a.png").mode == "RGBA"
    write_image(tmp_path / "a.jpg", rgba)  # JPEG: alpha flattened on white
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    write_image(tmp_path / "g.png", _gradient()[:, :, 0])
    with pytest.raises(OutputError):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(OutputError, match="extension"):
        write_image(tmp_path / "x.xyz", _gradient())


def test_write_refuses_to_overwrite_inputs(tmp_path):
    src = tmp_path / "in.png"
    write_image(src, _gradient())
    before = src.read_bytes()
    with pytest.raises(OutputError, match="input"):
        write_image(src, np.zeros((40, 60, 3), np.uint8), protect=[src])
    with pytest.raises(OutputError, match="input"):  # same file through another spelling
        write_image(tmp_path / "sub" / ".." / "in.png", np.zeros((40, 60, 3), np.uint8), protect=[str(src)])
    with pytest.raises(OutputError, match="exists"):
        write_image(src, np.zeros((40, 60, 3), np.uint8), overwrite=False)
    assert src.read_bytes() == before


def test_failed_write_leaves_no_partial_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((OutputError, OSError)):
        write_image(blocker / "out.png", _gradient())
    dst = tmp_path / "out.png"
    write_image(dst, _gradient())
    before = dst.read_bytes()

    with pytest.raises(OutputError):
        write_image(dst, _gradient(), fmt="GIF")
    assert dst.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file", "out.png"]


def test_unique_path(tmp_path):
    p = tmp_path / "face.png"
    assert unique_path(p) == p
    p.write_bytes(b"x")
    assert unique_path(p) == tmp_path / "face-1.png"
    (tmp_path / "face-1.png").write_bytes(b"x")
    assert unique_path(p, reserved=[tmp_path / "face-2.png"]) == tmp_path / "face-3.png"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_umask_permissions(tmp_path, mask):
    """An atomic write (mkstemp + replace) must not leave the 0600 of mkstemp: the file gets 0666 minus the umask,
    like one made by open()."""
    import torch

    from core.latents import save_latent, save_safetensors

    old = os.umask(mask)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        paths = [write_image(tmp_path / f"a.{ext}", img) for ext in ("png", "jpg", "webp")]
        paths.append(save_latent(tmp_path / "a.npz", np.zeros((4, 8), np.float32), captions=["x"], seed=0,
                                 method="knn", pack_id="tiny"))
        save_safetensors(tmp_path / "s.safetensors", {"t": torch.zeros(2)}, {}, "test")
        paths.append(tmp_path / "s.safetensors")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        expected = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    finally:
        os.umask(old)
    assert expected == 0o666 & ~mask
    assert {p.name: os.stat(p).st_mode & 0o777 for p in paths} == {p.name: expected for p in paths}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_writes_keep_a_replaced_files_mode_and_work_without_proc(tmp_path, monkeypatch):
    import core.atomic as atomic
    from core.checkpoints import save_generator

    img = np.zeros((8, 8, 3), np.uint8)
    target = write_image(tmp_path / "keep.png", img)
    os.chmod(target, 0o640)  # the user's choice for this file survives a rewrite
    write_image(target, img + 1)
    assert os.stat(target).st_mode & 0o777 == 0o640
    # no /proc (macOS, Windows, old kernels): the umask read once at import is used
    monkeypatch.setattr(atomic, "_proc_umask", lambda: None)
    monkeypatch.setattr(atomic, "_IMPORT_UMASK", 0o027)
    assert atomic.file_mode() == 0o640
    p = write_image(tmp_path / "new.png", img)
    assert os.stat(p).st_mode & 0o777 == 0o640
    from core.stylegan2 import Generator

    G = Generator(resolution=8, z_dim=8, w_dim=8, mapping_layers=1, channels={"4": 8, "8": 8})
    save_generator(G, tmp_path / "g.safetensors")
    assert os.stat(tmp_path / "g.safetensors").st_mode & 0o777 == 0o640
