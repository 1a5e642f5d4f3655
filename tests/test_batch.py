"""The batch runner (core.batch): a corpus of bad and odd inputs, resume after SIGKILL, cancel, shards, merge.

Tests about the runner use a small fake processor (real decoding through core.io, fake face finding);
the real engine is exercised end to end in test_cli.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import batch
from core.errors import CancelledError, FaceTooSmallError, NoFaceFoundError, OutputError

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------- helpers

def astronaut(size: int = 96) -> np.ndarray:
    from skimage.data import astronaut as _a

    return np.asarray(Image.fromarray(_a()[0:300, 60:360]).resize((size, size), Image.BILINEAR))


def fake_process(path, should_cancel=None):
    """Real decoding (core.io), fake face finding: tiny -> too small, flat -> no face; output: the image flipped."""
    from core.io import read_image

    img = read_image(path)
    if min(img.shape[:2]) < 16:
        raise FaceTooSmallError(f"{Path(path).name}: the face is too small.")
    if float(img.std()) < 2.0:
        raise NoFaceFoundError(f"No face was found in {Path(path).name}.")
    return [batch.image_output(np.ascontiguousarray(img[::4, ::-4]), "png", metadata={"source": Path(path).name})]


def _png_chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def _encode(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(b, format=fmt, **kw)
    return b.getvalue()


def make_corpus(root: Path) -> dict[str, str]:
    """Write >= 30 bad or odd inputs and good photos under ``root``; returns rel -> expected code ("ok" = output).
    Entries that are not inputs at all (hidden, .txt, symlinked folders) are made too, and not listed."""
    root.mkdir(parents=True, exist_ok=True)
    a = astronaut(96)
    jpg = _encode(a, "JPEG", quality=90)
    png = _encode(a, "PNG")
    exp: dict[str, str] = {}

    def put(rel: str, data: bytes, expect: str) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        exp[rel] = expect
        return p

    # good photos, several formats
    put("good_01.jpg", jpg, "ok")
    put("good_02.png", png, "ok")
    put("good_03.webp", _encode(a, "WEBP", quality=80), "ok")
    put("good_04.bmp", _encode(a, "BMP"), "ok")
    put("good_05.tif", _encode(a, "TIFF"), "ok")
    put("UPPER.JPG", jpg, "ok")
    put("progressive.jpg", _encode(a, "JPEG", progressive=True), "ok")
    # odd but valid
    put("cmyk.jpg", _encode(Image.fromarray(a).convert("CMYK"), "JPEG"), "ok")
    put("gray16.png", _encode(Image.fromarray((a[..., 0].astype(np.uint16) * 257)), "PNG"), "ok")
    rgba = np.dstack([a, np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))])
    put("alpha.png", _encode(rgba, "PNG"), "ok")
    put("palette.png", _encode(Image.fromarray(a).convert("P"), "PNG"), "ok")
    put("gray.jpg", _encode(Image.fromarray(a).convert("L"), "JPEG"), "ok")
    put("float.tif", _encode(Image.fromarray(a[..., 1].astype(np.float32) / 255.0, mode="F"), "TIFF"), "ok")
    frames = [Image.fromarray(a), Image.fromarray(a[::-1].copy())]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", b.getvalue(), "ok")
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90
    put("exif_rotated.jpg", _encode(a[:, :80], "JPEG", exif=ex.tobytes()), "ok")
    put("trailing_garbage.jpg", jpg + b"\x00garbage" * 50, "ok")
    put("фото портрет.jpg", jpg, "ok")
    put("写真 (1).png", png, "ok")
    put("emoji 😀.webp", _encode(a, "WEBP"), "ok")
    put("cafe\u0301.jpg", jpg, "ok")  # NFD name
    put("-starts-with-dash.png", png, "ok")
    put("quote's \"and\" ; comma, .png", png, "ok")
    put("new\nline.png", png, "ok")
    put("x" * 230 + ".png", png, "ok")  # output name must be shortened to fit 255 bytes
    put("same.jpg", jpg, "ok")  # same stem, other extension -> both kept
    put("same.png", png, "ok")
    put("same_jpg.png", png, "ok")  # would clash with same.jpg's disambiguated name
    put("sub1/photo.jpg", jpg, "ok")  # duplicate names in subfolders
    put("sub2/photo.jpg", jpg, "ok")
    put("sub2/deeper/photo.jpg", jpg, "ok")
    put("folder.jpg/inside.png", png, "ok")  # a folder with an image suffix
    bad_name = os.fsdecode(b"latin1_\xe9t\xe9.png")  # not UTF-8
    put(bad_name, png, "ok")
    os.symlink(root / "good_02.png", root / "link_to_good.png")
    exp["link_to_good.png"] = "ok"

    # bad
    put("zero.jpg", b"", "invalid_image")
    put("zero.png", b"", "invalid_image")
    put("text.jpg", b"This is not an image, just text.\n" * 3, "invalid_image")
    put("html.png", b"<!DOCTYPE html><html><body>Quota exceeded</body></html>", "invalid_image")
    put("random.webp", np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "invalid_image")
    put("truncated.jpg", jpg[: len(jpg) // 2], "invalid_image")
    put("truncated.png", png[: len(png) // 2], "invalid_image")
    badcrc = bytearray(png)
    badcrc[40] ^= 0xFF
    put("bad_crc.png", bytes(badcrc), "invalid_image")
    put("gif_header_only.gif", b"GIF89a", "invalid_image")
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
    put("bomb.png", b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + _png_chunk(b"IEND", b""), "too_large")
    w = h = 40000
    put("bomb.bmp", b"BM" + struct.pack("<IHHI", 70, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0) + b"\0" * 16, "too_large")
    put("gif_bomb.gif", b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b","
        + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;", "too_large")
    put("one_pixel.png", _encode(a[:1, :1], "PNG"), "face_too_small")
    put("eight_px.jpg", _encode(a[:8, :8], "JPEG"), "face_too_small")
    put("flat_gray.png", _encode(np.full((64, 64, 3), 128, np.uint8), "PNG"), "no_face")
    put("black.jpg", _encode(np.zeros((64, 64, 3), np.uint8), "JPEG"), "no_face")
    put("sub1/empty.webp", b"", "invalid_image")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    exp["loop_a.jpg"] = exp["loop_b.jpg"] = "symlink_loop"
    os.symlink(root / "does_not_exist.png", root / "broken_link.png")
    exp["broken_link.png"] = "missing"
    os.mkfifo(root / "fifo.png")
    exp["fifo.png"] = "not_a_file"
    os.symlink("/dev/null", root / "devnull.jpg")
    exp["devnull.jpg"] = "not_a_file"
    # permission denied: real when not root; root reads anyway, so then the file is simply processed
    put("no_read.jpg", jpg, "ok" if IS_ROOT else "permission_denied")
    os.chmod(root / "no_read.jpg", 0)

    # not inputs at all
    (root / ".hidden.jpg").write_bytes(jpg)
    (root / "notes.txt").write_text("not an image suffix")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "photo.png").write_bytes(png)
    os.symlink(root / "elsewhere", root / "linked_dir")  # symlinked folder: not followed...
    exp["elsewhere/photo.png"] = "ok"  # ...but the real folder is walked
    return exp


def snapshot(root: Path) -> dict[str, str]:
    """rel -> sha256 (regular files), 'link:<target>' (symlinks), 'dir'/'fifo'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = "fifo"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{stat.S_IMODE(st.st_mode):o}"
    return out


def no_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".anyface-batch/tmp" in p.as_posix()]


def keys(items) -> list[tuple]:
    return [it.key() for it in items]


# ----------------------------------------------------------------------------------------------- unit

def test_parse_shard_and_order():
    assert batch.parse_shard("2/3") == (2, 3)
    assert batch.parse_shard((1, 1)) == (1, 1)
    for bad in ("0/3", "4/3", "a/b", "3", (0, 0)):
        with pytest.raises(ValueError):
            batch.parse_shard(bad)
    rels = [f"d{i % 3}/f{i}.jpg" for i in range(300)]
    counts = [sum(batch.shard_of(r, 4) == k for r in rels) for k in range(1, 5)]
    assert sum(counts) == 300 and min(counts) > 40  # every path in exactly one shard, roughly balanced
    assert batch.shard_of("cafe\u0301.jpg", 7) == batch.shard_of("caf\u00e9.jpg", 7)  # NFC/NFD agree
    assert sorted(["a.jpg", "a/b.jpg", "a b.jpg"], key=batch.order_key) == ["a/b.jpg", "a b.jpg", "a.jpg"]


def test_plan_stems_collision_free():
    names = ["a.jpg", "a.png", "a_jpg.png", "A.JPG", "b.png", "x" * 240 + ".png", "x" * 240 + ".jpg"]
    stems = batch.plan_stems(names)
    assert stems["b.png"] == "b"
    vals = [v.casefold() for v in stems.values()]
    assert len(set(vals)) == len(vals)
    assert all(len((v + "_anyface_face9.webp").encode()) < 255 for v in stems.values())
    assert batch.plan_stems(names) == stems  # deterministic


def test_iter_inputs_is_a_lazy_stable_walk(tmp_path):
    for rel in ["b/2.png", "b/1.png", "a.png", "a/z.png", "c.txt", ".h.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    gen = batch.iter_inputs(tmp_path, recursive=True)
    assert iter(gen) is gen and not isinstance(gen, (list, tuple))
    rels = [i.rel for i in gen]
    assert rels == ["a/z.png", "a.png", "b/1.png", "b/2.png"]
    assert rels == sorted(rels, key=batch.order_key)
    assert [i.rel for i in batch.iter_inputs(tmp_path)] == ["a.png"]


def test_another_runs_output_folder_inside_the_input_is_not_an_input(tmp_path):
    """`edit nest -r -o nest/edited` then `edit nest -r -o nest/edited2` edited the first run's outputs again
    (edited2/edited/*_anyface_anyface.png)."""
    for rel in ["p.png", "sub/q.png", "edited/p_anyface.png", "edited/sub/q_anyface.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "edited" / batch.STATE_DIR).mkdir()
    rels = [i.rel for i in batch.iter_inputs(tmp_path, recursive=True, output_dir=tmp_path / "edited2")]
    assert rels == ["p.png", "sub/q.png"]
    # an earlier run IN PLACE (outputs beside the photos) leaves its state there too: the photos stay inputs
    for rel in ["family/a.png", "family/a_anyface.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "family" / batch.STATE_DIR).mkdir()
    rels = [i.rel for i in batch.iter_inputs(tmp_path, recursive=True, output_dir=tmp_path / "edited2")]
    assert rels == ["family/a.png", "p.png", "sub/q.png"]
    # pointed at directly, that folder's images are inputs like any others
    assert [i.rel for i in batch.iter_inputs(tmp_path / "edited", recursive=True)] == ["p_anyface.png",
                                                                                      "sub/q_anyface.png"]


def test_classify_permission_denied_even_as_root(tmp_path):
    """Root reads chmod-000 files, so the permission path is also checked with a processor that raises it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.png").write_bytes(_encode(astronaut(32), "PNG"))

    def denied(path, should_cancel=None):
        raise PermissionError(13, "Permission denied", str(path))

    r = batch.run(tmp_path / "in", tmp_path / "out", denied)
    assert [(i.status, i.code) for i in r.items] == [("failed", "permission_denied")]
    assert r.exit_code == 1


# ----------------------------------------------------------------------------------------------- corpus

def test_corpus_every_input_accounted_for(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    exp = make_corpus(src)
    assert sum(v != "ok" for v in exp.values()) >= 20 and len(exp) >= 55
    before = snapshot(src)
    seen = []
    r = batch.run(src, out, fake_process, recursive=True, progress=lambda d, t: seen.append((d, t)))
    assert snapshot(src) == before  # inputs byte-identical (and modes unchanged)
    got = {it.rel: it for it in r.items}
    assert set(got) == set(exp), (set(got) ^ set(exp))
    for rel, code in exp.items():
        it = got[rel]
        if code == "ok":
            assert it.status == "ok", (rel, it.code, it.reason)
            assert len(it.outputs) == 1
            o = out / it.outputs[0]
            assert o.is_file() and o.name.endswith("_anyface.png")
            with Image.open(o) as im:
                assert im.size[0] > 0
        else:
            assert (it.status, it.code) == ("failed", code), (rel, it.code, it.reason)
            assert it.reason and not it.outputs
            # the row gives the path; every reason names the file the same way, by its name
            assert str(src) not in it.reason, it.reason
            if code in ("invalid_image", "no_face"):
                assert Path(rel).name in it.reason, it.reason
    # subfolders mirrored, duplicate names kept apart, same-stem files kept apart
    assert (out / "sub1/photo_anyface.png").is_file() and (out / "sub2/photo_anyface.png").is_file()
    assert (out / "sub2/deeper/photo_anyface.png").is_file()
    outs = [o for it in r.items for o in it.outputs]
    assert len(outs) == len(set(o.casefold() for o in outs)) == sum(v == "ok" for v in exp.values())
    # report files: CSV + JSON with every input, and a summary line
    assert r.total == len(exp) and r.ok + r.failed == r.total and not r.cancelled
    with open(r.report_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(exp) and all(row["status"] in ("ok", "failed") for row in rows)
    js = json.loads(Path(r.report_json).read_text())
    assert js["summary"]["failed"] == r.failed and len(js["items"]) == r.total
    assert f"{r.ok} of {r.total}" in r.summary_line() and f"{r.failed} failed" in r.summary_line()
    assert seen[0] == (0, r.total) and seen[-1] == (r.total, r.total)
    assert not no_temp_files(out)
    # a re-run redoes nothing that is done, retries the failures, and leaves the inputs alone
    r2 = batch.run(src, out, fake_process, recursive=True)
    assert r2.reused == r.ok and keys(r2.items) == keys(r.items)
    assert snapshot(src) == before


def test_output_folder_is_input_folder(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    png = _encode(astronaut(64), "PNG")
    for n in ("a.png", "b.jpg", "c.png"):
        (src / n).write_bytes(png if n.endswith("png") else _encode(astronaut(64), "JPEG"))
    (src / "c_anyface.png").write_bytes(b"user's own file, not ours")  # sits where c's output would go
    before = snapshot(src)
    r = batch.run(src, src, fake_process)
    after = snapshot(src)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing touched, not even c_anyface.png
    got = {it.rel: it for it in r.items}
    assert set(got) == {"a.png", "b.jpg", "c.png"}  # outputs and our state are not inputs
    assert got["a.png"].status == got["b.jpg"].status == "ok"
    assert (got["c.png"].status, got["c.png"].code) == ("failed", "write_failed")
    assert "not written by this batch" in got["c.png"].reason
    r2 = batch.run(src, src, fake_process)  # second run: outputs are not taken as inputs, nothing redone
    assert r2.total == 3 and r2.reused == 2
    assert {k: v for k, v in snapshot(src).items() if k in before} == before


def test_resume_redoes_missing_partial_and_changed(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}.png").write_bytes(_encode(astronaut(48 + i), "PNG"))
    calls = []

    def proc(path, should_cancel=None):
        calls.append(Path(path).name)
        return fake_process(path)

    r = batch.run(src, out, proc, params={"caption": "smile"})
    assert r.ok == 6 and len(calls) == 6
    (out / "p1_anyface.png").unlink()  # missing
    data = (out / "p2_anyface.png").read_bytes()
    (out / "p2_anyface.png").write_bytes(data[: len(data) // 2])  # partial
    calls.clear()
    r = batch.run(src, out, proc, params={"caption": "smile"})
    assert sorted(calls) == ["p1.png", "p2.png"] and r.reused == 4 and r.ok == 6
    with Image.open(out / "p2_anyface.png") as im:
        im.load()
    calls.clear()  # a photo replaced under the same name (same size even) is done again; it was skipped
    old = (src / "p3.png").stat()
    (src / "p3.png").write_bytes(_encode(astronaut(48 + 3)[::-1].copy(), "PNG"))
    os.utime(src / "p3.png", ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    r = batch.run(src, out, proc, params={"caption": "smile"})
    assert calls == ["p3.png"] and r.reused == 5 and r.ok == 6
    calls.clear()
    r = batch.run(src, out, proc, params={"caption": "frown"})  # another job: everything redone, in place
    assert len(calls) == 6 and r.reused == 0 and r.ok == 6
    assert sorted(p.name for p in out.glob("*.png")) == [f"p{i}_anyface.png" for i in range(6)]


def test_unsafe_output_through_symlinked_folder(tmp_path):
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "p.png").write_bytes(_encode(astronaut(48), "PNG"))
    (src / "q.png").write_bytes(_encode(astronaut(48), "PNG"))
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "sub")  # the mirrored subfolder points out of the output folder
    r = batch.run(src, out, fake_process, recursive=True)
    got = {it.rel: it for it in r.items}
    assert (got["sub/p.png"].status, got["sub/p.png"].code) == ("failed", "unsafe_output")
    assert got["q.png"].status == "ok"
    assert list(elsewhere.iterdir()) == []


def test_unwritable_output_location(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "p.png").write_bytes(_encode(astronaut(48), "PNG"))
    (src / "ro" ).mkdir()
    (src / "ro" / "p.png").write_bytes(_encode(astronaut(48), "PNG"))
    (src / "q.png").write_bytes(_encode(astronaut(48), "PNG"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the mirrored folder should be")
    (out / "ro").mkdir()
    os.chmod(out / "ro", 0o555)  # read-only output subfolder (root writes anyway)
    try:
        r = batch.run(src, out, fake_process, recursive=True)
    finally:
        os.chmod(out / "ro", 0o755)
    got = {it.rel: it for it in r.items}
    assert (got["sub/p.png"].status, got["sub/p.png"].code) == ("failed", "write_failed")
    assert got["ro/p.png"].status == ("ok" if IS_ROOT else "failed")
    assert got["q.png"].status == "ok"
    if Path("/proc/self").is_dir():  # a folder nobody, not even root, can create
        with pytest.raises(OutputError):
            batch.run(src, "/proc/self/anyface-out", fake_process)


def test_images_are_not_kept_in_memory(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(30):
        (src / f"{i:02d}.png").write_bytes(b"x")

    def big(path, should_cancel=None):
        img = np.full((600, 600, 3), int(Path(path).stem), np.uint8)  # ~1 MB per item
        return [batch.Output("raw", lambda p, img=img: p.write_bytes(img[:1].tobytes()))]

    tracemalloc.start()
    try:
        r = batch.run(src, tmp_path / "out", big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.ok == 30
    assert peak < 8e6, peak  # 30 MB if images piled up


# ----------------------------------------------------------------------------------------------- cancel / kill

def test_cancel_stops_within_a_second_and_resumes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        (src / f"p{i}.png").write_bytes(_encode(astronaut(40), "PNG"))
    flag = threading.Event()
    t_set = []

    def slow(path, should_cancel=None):
        if Path(path).name == "p0.png":
            return fake_process(path)
        for _ in range(200):  # 10 s of cooperative work
            if should_cancel():
                raise CancelledError()
            time.sleep(0.05)
        return fake_process(path)

    def trigger():
        time.sleep(0.4)
        t_set.append(time.perf_counter())
        flag.set()

    threading.Thread(target=trigger, daemon=True).start()
    with pytest.raises(CancelledError) as ei:
        batch.run(src, out, slow, should_cancel=flag.is_set)
    assert time.perf_counter() - t_set[0] < 1.0
    rep = ei.value.report
    assert rep.cancelled and rep.ok == 1 and rep.exit_code == 1
    assert Path(rep.report_csv).is_file()
    # the report lists every input: the one cut short and the six never reached are "not_run"
    rows = {it.rel: it.status for it in batch.read_report(rep.report_json)}
    assert rows == {"p0.png": "ok", **{f"p{i}.png": "not_run" for i in range(1, 8)}}
    with open(rep.report_csv, newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 8
    summary = json.loads(Path(rep.report_json).read_text())["summary"]
    assert summary["report_csv"] == rep.report_csv and summary["report_json"] == rep.report_json
    assert rep.failed_items == [] and "not run p7.png" in rep.summary()
    idx = batch.read_manifest(batch.manifest_paths(out))
    assert idx["p0.png"]["status"] == "ok" and {idx[f"p{i}.png"]["status"] for i in range(1, 8)} == {"not_run"}
    # a merge of the cancelled run lists the inputs it did not reach and is not a success
    merged = batch.merge_reports([out], tmp_path / "merged")
    assert (merged.total, merged.ok, merged.failed, merged.cancelled, merged.exit_code) == (8, 1, 0, True, 1)
    assert json.loads(Path(merged.report_json).read_text())["summary"]["report_json"] == merged.report_json
    # a re-run cancelled before it does anything reports what earlier runs finished as ok, not "not_run"
    flag_now = threading.Event()
    flag_now.set()
    with pytest.raises(CancelledError) as ei2:
        batch.run(src, out, fake_process, should_cancel=flag_now.is_set)
    rows2 = {it.rel: it.status for it in batch.read_report(ei2.value.report.report_json)}
    assert rows2["p0.png"] == "ok" and ei2.value.report.ok == 1 and ei2.value.report.reused == 1
    assert sorted(rows2) == sorted(rows) and list(rows2.values()).count("not_run") == 7
    assert sorted(p.name for p in out.glob("*.png")) == ["p0_anyface.png"]
    assert not no_temp_files(out)
    r = batch.run(src, out, fake_process)
    assert r.ok == 8 and r.reused == 1


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np
from core import batch

def slow_write(img):
    def write(p):
        with open(p, "wb") as f:
            f.write(b"\\x89PNG partial")
            f.flush()
            time.sleep(0.03)
        from core.io import write_image
        write_image(p, img, "png")
    return write

def proc(path, should_cancel=None):
    from core.io import read_image
    img = read_image(path)
    time.sleep(0.02)
    return [batch.Output("png", slow_write(img[::2, ::2].copy())),
            batch.Output("npy", lambda p: np.save(p, img[:2]), "_side")]

batch.run(sys.argv[1], sys.argv[2], proc)
"""


def test_sigkill_mid_run_then_resume(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(24):
        (src / f"p{i:02d}.png").write_bytes(_encode(astronaut(32 + i), "PNG"))
    before = snapshot(src)
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out)], env=env)
    manifest = out / batch.STATE_DIR / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.is_file() and manifest.read_text().count('"status": "ok"') >= 6:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    idx = batch.read_manifest([manifest])
    n_done = sum(r["status"] == "ok" for r in idx.values())
    assert 6 <= n_done < 24
    # every file with a final name is complete (atomic writes): PNGs decode
    for p in out.glob("*_anyface.png"):
        with Image.open(p) as im:
            im.load()
    r = batch.run(src, out, fake_process_two)
    assert r.ok == 24 and r.failed == 0 and r.reused >= n_done
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "anyface-report")))
    assert names == sorted([f"p{i:02d}_anyface.png" for i in range(24)] + [f"p{i:02d}_anyface_side.npy"
                                                                         for i in range(24)])
    for p in out.glob("*_anyface.png"):
        with Image.open(p) as im:
            im.load()
    assert not no_temp_files(out)
    assert snapshot(src) == before
    # a record per input with its final state, once
    idx = batch.read_manifest([manifest])
    assert sorted(idx) == [f"p{i:02d}.png" for i in range(24)] and all(v["status"] == "ok" for v in idx.values())


def fake_process_two(path, should_cancel=None):
    from core.io import read_image

    img = read_image(path)
    return [batch.image_output(img[::2, ::2].copy(), "png"),
            batch.Output("npy", lambda p: np.save(p, img[:2]), "_side")]


# ----------------------------------------------------------------------------------------------- shards

def _thirty(src: Path) -> None:
    a = astronaut(40)
    for i in range(30):
        sub = ("", "s1/", "s2/")[i % 3]
        p = src / f"{sub}img{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"broken" if i % 10 == 7 else _encode(a, "PNG"))


def test_three_shards_cover_thirty_inputs_exactly_once(tmp_path):
    src = tmp_path / "in"
    _thirty(src)
    single = batch.run(src, tmp_path / "single", fake_process, recursive=True)
    assert single.total == 30 and single.failed == 3
    outs, seen = [], []
    for k in (1, 2, 3):
        r = batch.run(src, tmp_path / f"shard{k}", fake_process, recursive=True, shard=f"{k}/3")
        seen += [it.rel for it in r.items]
        outs += [o for it in r.items for o in it.outputs]
        assert (tmp_path / f"shard{k}" / f"anyface-report.shard-{k}-of-3.csv").is_file()
    assert len(seen) == len(set(seen)) == 30  # no overlap, nothing missed
    files = [p for k in (1, 2, 3) for p in (tmp_path / f"shard{k}").rglob("*_anyface.png")]
    assert len(files) == len(outs) == 27
    merged = batch.merge_reports([tmp_path / f"shard{k}" for k in (1, 2, 3)], tmp_path / "merged")
    assert keys(merged.items) == keys(single.items)
    assert (merged.total, merged.ok, merged.failed) == (30, 27, 3)
    assert [it.to_json()["rel"] for it in batch.read_report(tmp_path / "merged" / "anyface-report.json")] == \
        [it.rel for it in single.items]

    # the same three shards writing into ONE shared folder (a job array on a shared disk)
    shared = tmp_path / "shared"
    for k in (1, 2, 3):
        batch.run(src, shared, fake_process, recursive=True, shard=(k, 3))
    assert len(list(shared.rglob("*_anyface.png"))) == 27
    merged2 = batch.merge_reports([shared])
    assert keys(merged2.items) == keys(single.items)
    # merging manifest files directly works too
    m3 = batch.merge_reports(sorted((shared / batch.STATE_DIR).glob("manifest.shard-*.jsonl")), tmp_path / "m3")
    assert keys(m3.items) == keys(single.items)
    # an unsharded re-run in the shared folder finds everything done; a fixed input is redone, and the newest
    # record wins over the shard's older failure when reports are merged
    fixed = next(it.rel for it in single.items if it.status == "failed")
    (src / fixed).write_bytes(_encode(astronaut(40), "PNG"))
    again = batch.run(src, shared, fake_process, recursive=True)
    assert again.reused == 27 and again.ok == 28 and again.failed == 2
    after = {it.rel: it.status for it in batch.merge_reports([shared]).items}
    assert after[fixed] == "ok" and sum(v == "ok" for v in after.values()) == 28


# ----------------------------------------------------------------------------------------------- photo editing

class _FakeEngine:
    """The Engine surface EditProcessor uses: resolution, pack_id, invert, edit."""

    resolution, pack_id, num_ws, w_dim = 64, "fake", 8, 16

    def __init__(self):
        self.inverted = 0

    def invert(self, crop, tier="fast", *, progress=None, should_cancel=None):
        import torch

        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        self.inverted += 1
        return torch.zeros(self.num_ws, self.w_dim)

    def edit(self, ws, captions, strength, method=None, identity_layers=None, *, seed=0, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(image=np.full((64, 64, 3), (255, 0, 0), np.uint8), ws=ws + strength, method="cmd",
                               pack_id=self.pack_id)


def test_edit_processor_real_photo_pipeline_fake_engine(tmp_path):
    """read -> detect (real dlib/YuNet) -> align -> invert/edit (fake) -> paste back -> outputs, via run_batch."""
    from skimage.data import astronaut as _a

    src = tmp_path / "in"
    src.mkdir()
    face = _a()[0:300, 60:360]
    (src / "face.jpg").write_bytes(_encode(face, "JPEG"))
    (src / "noface.png").write_bytes(_encode(np.full((200, 200, 3), 90, np.uint8), "PNG"))
    eng = _FakeEngine()
    r = batch.run_batch(eng, src, ["smiling"], output_dir=tmp_path / "out", strength=0.5, save_latent=True,
                        fmt="png", tier="fast", detector="auto", identity_layers=None, method="cmd")
    got = {it.rel: it for it in r.items}
    assert got["face.jpg"].outputs == ["face_anyface.png", "face_anyface_face0.npz"]
    assert (got["noface.png"].status, got["noface.png"].code) == ("failed", "no_face")
    with Image.open(tmp_path / "out" / "face_anyface.png") as im:
        out = np.asarray(im.convert("RGB"))
    assert out.shape == face.shape
    assert (out.astype(int) - face).any() and (out[0, 0].astype(int) - face[0, 0]).max() <= 3  # face edited only
    from core.latents import load_latent

    lat = load_latent(tmp_path / "out" / "face_anyface_face0.npz")
    assert float(np.asarray(lat.ws).max()) == pytest.approx(0.5)
    # aligned crops only, jpg
    r2 = batch.run_batch(eng, src, ["smiling"], output_dir=tmp_path / "crops", aligned_only=True, fmt="jpg")
    assert [it.outputs for it in r2.items if it.status == "ok"] == [["face_anyface_face0.jpg"]]
    with pytest.raises(ValueError):
        batch.EditProcessor(eng, ["x"], strength=1.5)


def test_face_all_skips_faces_too_small_to_edit(tmp_path, monkeypatch):
    """--face all on a group photo with a tiny background face edits the others instead of failing the photo."""
    from types import SimpleNamespace

    import core.photo as photo_mod
    from core.align import Face

    img = astronaut(96)
    big = Face(box=np.array([10., 10., 60., 60.]), landmarks=np.array([[20., 30.], [45., 30.], [32., 40.],
                                                                          [24., 50.], [40., 50.]]), score=1.0,
               detector="fake")
    tiny = Face(box=np.array([80., 80., 84., 84.]), landmarks=np.array([[80., 81.], [82., 81.], [81., 82.],
                                                                          [80.5, 83.], [81.5, 83.]]), score=1.0,
                detector="fake")
    calls = []

    def fake_prepare(path, *, resolution, detector="auto", face="largest", **kw):
        calls.append(face)
        faces = [big, tiny]
        sel = [0, 1] if face == "all" else [face] if isinstance(face, int) else list(face)
        if 1 in sel:
            raise FaceTooSmallError("Face 1 is too small to edit.")
        return SimpleNamespace(image=img, faces=faces, selected=sel, transforms=[None] * len(sel), alpha=None,
                               aligned=[np.zeros((64, 64, 3), np.uint8)] * len(sel))

    monkeypatch.setattr(photo_mod, "prepare_photo", fake_prepare)
    monkeypatch.setattr(photo_mod, "compose_all", lambda prepared, edited: prepared.image.copy())
    src = tmp_path / "in"
    src.mkdir()
    (src / "group.png").write_bytes(_encode(img, "PNG"))
    r = batch.run_batch(_FakeEngine(), src, ["smiling"], output_dir=tmp_path / "out", face="all")
    assert [(it.status, it.outputs) for it in r.items] == [("ok", ["group_anyface.png"])]
    assert calls == ["all", [], [0]]
    r = batch.run_batch(_FakeEngine(), src, ["smiling"], output_dir=tmp_path / "out1", face=1)
    assert [(it.status, it.code) for it in r.items] == [("failed", "face_too_small")]


def test_merge_lists_the_inputs_of_a_shard_that_never_ran(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(9):
        (src / f"p{i}.png").write_bytes(_encode(astronaut(40 + i), "PNG"))
    for k in (1, 2):  # shard 3/3 is never run
        batch.run(src, out, fake_process, shard=(k, 3))
    missing = {i.rel for i in batch.iter_inputs(src, shard=(3, 3))}
    assert missing
    r = batch.merge_reports([out])
    assert r.total == 9 and r.ok == 9 - len(missing) and r.cancelled and r.exit_code == 1
    rows = {it.rel: it for it in r.items}
    assert all(rows[m].status == "not_run" and "shard 3/3 never ran" in rows[m].reason for m in missing)
    assert f"{len(missing)} not run (a shard never ran)" in r.summary_line()  # it said "cancelled with N left"
    batch.run(src, out, fake_process, shard=(3, 3))
    r = batch.merge_reports([out])
    assert r.total == 9 and r.ok == 9 and not r.cancelled and r.exit_code == 0


def test_shards_run_side_by_side_but_not_beside_an_unsharded_run(tmp_path):
    """An unsharded run and a shard run into one folder used to go ahead together (different manifest locks), and
    the unsharded one then failed photos the shard had just written ("not written by this batch")."""
    from core.errors import OutputError

    state = tmp_path / batch.STATE_DIR
    state.mkdir()
    s1 = batch._Manifest(state / "manifest.shard-1-of-2.jsonl", shared=True, n=2)
    s2 = batch._Manifest(state / "manifest.shard-2-of-2.jsonl", shared=True, n=2)  # shards of one job: side by side
    with pytest.raises(OutputError, match="Shards of another split"):  # 1/3 overlaps 1/2's inputs
        batch._Manifest(state / "manifest.shard-1-of-3.jsonl", shared=True, n=3)
    with pytest.raises(OutputError, match=r"Another batch \(or shards of one\)"):
        batch._Manifest(state / "manifest.jsonl")
    with pytest.raises(OutputError, match="already running"):  # the same shard twice
        batch._Manifest(state / "manifest.shard-1-of-2.jsonl", shared=True, n=2)
    s1.close()
    s2.close()
    whole = batch._Manifest(state / "manifest.jsonl")
    with pytest.raises(OutputError, match="An unsharded batch is already running"):
        batch._Manifest(state / "manifest.shard-1-of-3.jsonl", shared=True, n=3)
    whole.close()
    batch._Manifest(state / "manifest.shard-1-of-3.jsonl", shared=True, n=3).close()  # the 1/2 split ended


def test_merge_lists_what_a_killed_shard_or_an_earlier_job_left(tmp_path):
    """A shard killed (kill -9) after it started, and a folder where the last job ran only some shards over an
    earlier job's results: the merge said 'all done', exit 0."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        (src / f"p{i}.png").write_bytes(_encode(astronaut(40 + i), "PNG"))
    batch.run(src, out, fake_process, shard=(1, 2), params={"caption": "a"})
    state = out / batch.STATE_DIR
    # shard 2/2 started and was killed at once: only its run event is on disk
    first = (state / "manifest.shard-1-of-2.jsonl").read_text().splitlines()[0]
    run_event = json.loads(first)
    run_event.update(shard=[2, 2], time=run_event["time"] + 0.001)
    (state / "manifest.shard-2-of-2.jsonl").write_text(json.dumps(run_event) + "\n")
    two = {i.rel for i in batch.iter_inputs(src, shard=(2, 2))}
    r = batch.merge_reports([out])
    rows = {it.rel: it for it in r.items}
    assert r.total == 8 and r.exit_code == 1
    assert all(rows[m].status == "not_run" and "stopped before reaching it" in rows[m].reason for m in two)
    # finish job "a", then job "b" runs shard 1/2 only: shard 2/2's results are job a's
    batch.run(src, out, fake_process, shard=(2, 2), params={"caption": "a"})
    assert batch.merge_reports([out]).exit_code == 0
    batch.run(src, out, fake_process, shard=(1, 2), params={"caption": "b"})
    r = batch.merge_reports([out])
    rows = {it.rel: it for it in r.items}
    assert r.exit_code == 1 and all(rows[m].code == "stale" and rows[m].status == "not_run" for m in two)
    assert all(rows[m].status == "ok" for m in rows if m not in two)


def test_merge_of_finished_runs_stays_clean_when_inputs_moved_or_outputs_sit_beside_them(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}.png").write_bytes(_encode(astronaut(40 + i), "PNG"))
    batch.run(src, out, fake_process)
    src.rename(tmp_path / "moved")  # merged elsewhere, or the photos were moved: the manifests alone decide
    r = batch.merge_reports([out])
    assert (r.total, r.ok, r.exit_code) == (6, 6, 0)
    (tmp_path / "moved").rename(src)
    o1 = tmp_path / "o1"
    batch.run(src, o1, fake_process, shard=(1, 2), params={"caption": "x"})
    batch.run(src, src, fake_process, shard=(2, 2), params={"caption": "x"})  # this shard wrote in place
    r = batch.merge_reports([o1, src])
    assert (r.total, r.ok, r.exit_code) == (6, 6, 0), [(it.rel, it.status) for it in r.items]


def test_in_place_a_users_own_photo_named_like_an_output_is_an_input(tmp_path):
    """With -o the input folder, 'me_anyface.png' (no 'me.*' beside it) was skipped and left out of the report."""
    for n in ("p.png", "p_anyface.png", "q.jpg", "q_anyface_face0.png", "me_anyface.png", "me_anyface_anyface.png"):
        (tmp_path / n).write_bytes(b"x")
    rels = [i.rel for i in batch.iter_inputs(tmp_path, output_dir=tmp_path)]
    assert rels == ["me_anyface.png", "p.png", "q.jpg"]
    other = tmp_path / "other_out"  # not in place: the input folder is taken as it is
    assert len([i.rel for i in batch.iter_inputs(tmp_path, output_dir=other)]) == 6


def test_a_write_error_that_names_its_file_is_not_said_twice(tmp_path):
    """A full disk read "Could not write 'x.png': Could not write 'x.png': [Errno 28] No space left on device." (the
    image writer's error already names the file); the run keeps going."""
    from core.io import write_image

    src = tmp_path / "in"
    src.mkdir()
    for n in ("a.png", "b.png"):
        (src / n).write_bytes(b"x")

    def full_disk(path, should_cancel=None):
        def write(p):
            if Path(path).stem == "a":
                raise OutputError(f"Could not write '{p}': [Errno 28] No space left on device")
            write_image(p, np.zeros((4, 4, 3), np.uint8), "png")
        return [batch.Output("png", write)]

    r = batch.run(src, tmp_path / "out", full_disk)
    (bad,) = r.failed_items
    assert bad.reason.count("Could not write") == 1 and "No space left on device" in bad.reason, bad.reason
    assert str(tmp_path / "out" / "a_anyface.png") in bad.reason and r.ok == 1


def test_a_cancel_seen_after_a_photo_was_made_writes_nothing_for_it(tmp_path):
    """A review: on an 8000x6000 photo, cancel waited for the 4 s PNG write of the photo in progress. The outputs of a
    photo whose processing ended after the cancel are not written; the next run does it."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(_encode(astronaut(40), "PNG"))
    flag = threading.Event()
    writes = []

    def process(path, should_cancel=None):
        flag.set()  # the user presses Cancel while this photo is being made (no cooperative check in between)
        return [batch.Output("png", lambda p: (writes.append(p), p.write_bytes(b"x")))]

    with pytest.raises(CancelledError) as ei:
        batch.run(src, out, process, should_cancel=flag.is_set)
    assert writes == [] and not (out / "a_anyface.png").exists()
    assert ei.value.report.cancelled
    flag.clear()
    r = batch.run(src, out, process, should_cancel=lambda: False)
    assert r.ok == 1 and (out / "a_anyface.png").is_file()


def test_a_run_with_another_output_skips_what_an_earlier_run_wrote_in_place(tmp_path):
    """A review: after an in-place run (`edit rp -o rp -r`), `edit rp -o rp/edited -r` edited its outputs again
    (astronaut_anyface_anyface.png, sub/s1_anyface_anyface.png), also when the folder holds only subfolders. What
    the earlier run's manifest lists as written beside a photo that is still there is skipped; the user's own
    files named like outputs are not."""
    src = tmp_path / "rp"
    for rel in ("a.png", "sub/s1.png", "only/deep/d.png", "sub/party_anyface.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(_encode(astronaut(40), "PNG"))
    before = {i.rel for i in batch.iter_inputs(src, recursive=True)}
    r = batch.run(src, src, fake_process, recursive=True)
    assert r.ok == 4 and (src / "sub" / "s1_anyface.png").is_file() and (src / "only/deep/d_anyface.png").is_file()
    again = {i.rel for i in batch.iter_inputs(src, recursive=True, output_dir=src / "edited")}
    assert again == before == {"a.png", "sub/s1.png", "only/deep/d.png", "sub/party_anyface.jpg"}
    # a folder that was another run's -o (its photos are elsewhere) is still taken as it is
    other_out = tmp_path / "out"
    batch.run(src, other_out, fake_process, recursive=True, overwrite=True)
    assert {i.rel for i in batch.iter_inputs(other_out, recursive=True, output_dir=tmp_path / "o2")} == {
        "a_anyface.png", "sub/s1_anyface.png", "only/deep/d_anyface.png", "sub/party_anyface_anyface.png"}


def test_an_input_folder_that_cannot_be_listed_says_so(tmp_path, monkeypatch):
    """It raised a bare PermissionError: the GUI showed "Unexpected error" (root reads any folder, so scandir is
    made to fail)."""
    from core.errors import AnyFaceError

    (tmp_path / "in").mkdir()
    real = os.scandir

    def denied(path):
        if Path(path) == tmp_path / "in":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(AnyFaceError, match="Cannot list the folder .*in': Permission denied"):
        list(batch.iter_inputs(tmp_path / "in"))
