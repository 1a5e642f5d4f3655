"""The `anyface` command line, end to end through the installed console script (.venv/bin/anyface).

The engine is the real one on the bundled tiny pack. While that pack is not built yet (resources/weights/tiny
empty), a random-weight pack with the same file names and shapes stands in (built once per session by
benchmarks/bench_batch.py:make_random_pack, found through $ANYFACE_WEIGHTS_DIR), so every CLI path still runs
the real engine, photo pipeline and batch runner; only the pictures are meaningless then.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "anyface"
if not SCRIPT.exists():
    SCRIPT = ROOT / ".venv" / "bin" / "anyface"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_batch", ROOT / "benchmarks" / "bench_batch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def weights_env(tmp_path_factory) -> dict:
    """Extra environment for the CLI: nothing when the bundled tiny pack is there, else a random stand-in."""
    bench = _bench()
    if bench.bundled_pack_present("tiny"):
        return {}
    root = tmp_path_factory.mktemp("random-pack")
    bench.make_random_pack(root, "tiny")
    return {"ANYFACE_WEIGHTS_DIR": str(root)}


def anyface(*args, env_extra=None, timeout=240, check_rc=None) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"the console script {SCRIPT} is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check_rc is not None:
        assert r.returncode == check_rc, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    return r


def photo(size: int = 256, flip: bool = False) -> np.ndarray:
    from skimage.data import astronaut

    im = Image.fromarray(astronaut()[0:300, 60:360]).resize((size, size), Image.BILINEAR)
    a = np.asarray(im)
    return a[:, ::-1].copy() if flip else a


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- no engine

def test_help_and_usage_errors(tmp_path):
    r = anyface("--help", check_rc=0)
    assert "examples:" in r.stdout and "anyface edit" in r.stdout and "exit codes" in r.stdout
    for cmd in ("generate", "edit", "batch-merge"):
        r = anyface(cmd, "--help", check_rc=0)
        assert "example" in r.stdout
    assert "--shard K/N" in anyface("edit", "--help").stdout
    anyface("edit", check_rc=2)  # missing arguments
    anyface("edit", tmp_path, "--caption", "x", check_rc=2)  # -o missing
    anyface("edit", tmp_path / "nope", "--caption", "x", "-o", tmp_path / "o", check_rc=2)
    anyface("edit", tmp_path, "--caption", "x", "-o", tmp_path / "o", "--shard", "0/3", check_rc=2)
    anyface("edit", tmp_path, "--caption", "x", "-o", tmp_path / "o", "--face", "biggest", check_rc=2)
    anyface("edit", tmp_path, "--caption", "x", "-o", tmp_path / "o", "--strength", "1.5", check_rc=2)
    anyface("edit", tmp_path, "-o", tmp_path / "o", check_rc=2)  # no caption
    anyface("generate", "x", "-n", "0", check_rc=2)
    anyface("--threads", "-1", "generate", "x", check_rc=2)
    anyface("generate", "x", "--threads", "many", check_rc=2)
    anyface("frobnicate", check_rc=2)
    # bad values are refused by the parser or before any model loads, with exit 2 and no traceback
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for bad in (["generate", "x", "--diversity", "-1"], ["generate", "x", "--diversity", "nan"],
                ["generate", "x", "--quality", "0"], ["generate", "x", "--quality", "101", "--format", "webp"],
                ["generate", ""], ["generate", "   "], ["generate", "x", "-o", afile],
                ["edit", tmp_path, "--caption", " ", "-o", tmp_path / "o"],
                ["edit", tmp_path, "--caption", "x", "-o", tmp_path / "o", "--identity-layers", "-1"],
                ["edit", tmp_path, "--caption", "x", "-o", afile],
                ["edit", tmp_path, "--caption", "x", "-o", afile / "sub"],
                ["batch-merge", tmp_path],  # a folder without a batch manifest
                ["batch-merge", afile],  # a file that is not a manifest
                ["models", "download", "--pack", "tiny", "--timeout", "-1"]):
        r = anyface(*bad, check_rc=2)
        assert "Traceback" not in r.stderr and "error:" in r.stderr, (bad, r.stderr)
    # each refusal says what was wrong (not just the first check that happens to fire)
    msg = {"afile": "is a file", "diversity": "--diversity", "quality": "--quality", "blank": "No caption"}
    assert msg["afile"] in anyface("generate", "x", "-o", afile, check_rc=2).stderr
    assert msg["afile"] in anyface("edit", tmp_path, "--caption", "x", "-o", afile / "sub", check_rc=2).stderr
    assert msg["diversity"] in anyface("generate", "x", "--diversity", "-1", check_rc=2).stderr
    assert msg["quality"] in anyface("generate", "x", "--quality", "0", check_rc=2).stderr
    assert msg["blank"] in anyface("generate", "   ", check_rc=2).stderr
    assert "not a batch manifest" in anyface("batch-merge", afile, check_rc=2).stderr
    assert not (tmp_path / "o").exists()


def test_models_list_and_import(tmp_path):
    r = anyface("models", "list", "--json", check_rc=0)  # global flag after the command
    rows = json.loads(r.stdout)
    assert any(row["pack"] == "tiny" for row in rows)
    junk = tmp_path / "not_a_model.pt"
    junk.write_bytes(b"<html>quota exceeded</html>")
    # a real (toy) generator file: converted, registered, reported; the source file is untouched
    from core.checkpoints import save_generator
    from training.stage_utils import toy_generator

    src = tmp_path / "toy_generator.safetensors"
    save_generator(toy_generator(), src)
    before = src.read_bytes()
    r = anyface("--json", "models", "import", junk, src, check_rc=1)  # one of two files failed
    bad, good = json.loads(r.stdout)
    assert not bad["ok"] and "not a model file" in bad["error"]
    assert good["ok"] and good["role"] == "generator" and Path(good["path"]).is_file()
    assert src.read_bytes() == before


def test_batch_merge_cli(tmp_path):
    """Shard outputs merged by the CLI (runs made by core.batch with a stand-in processor: no engine needed)."""
    from core import batch

    src = tmp_path / "in"
    src.mkdir()
    for i in range(9):
        Image.fromarray(photo(32, flip=bool(i % 2))).save(src / f"p{i}.png")
    (src / "bad.jpg").write_text("no image")

    def proc(path, should_cancel=None):
        from core.io import read_image

        return [batch.image_output(read_image(path), "png")]

    single = batch.run(src, tmp_path / "single", proc)
    for k in (1, 2, 3):
        batch.run(src, tmp_path / f"s{k}", proc, shard=(k, 3))
    r = anyface("--json", "batch-merge", *(tmp_path / f"s{k}" for k in (1, 2, 3)), "-o", tmp_path / "m", check_rc=1)
    js = json.loads(r.stdout)
    assert js["summary"]["total"] == 10 and js["summary"]["failed"] == 1
    assert [(d["rel"], d["status"], d["outputs"]) for d in js["items"]] == \
        [(it.rel, it.status, it.outputs) for it in single.items]
    assert (tmp_path / "m" / "anyface-report.csv").is_file()
    anyface("batch-merge", tmp_path / "nothing-here", check_rc=2)  # usage error (README: exit 2), before any work


# ----------------------------------------------------------------------------------------------- real engine

def test_generate(tmp_path, weights_env):
    """Through the console script with PySide6 made unimportable (the CLI is Qt-free); never overwrites."""
    out = tmp_path / "faces"
    out.mkdir()
    theirs = out / "a-smiling-woman-with-glasses_s1.png"
    theirs.write_bytes(b"someone else's file")
    stray = out / "a-smiling-woman-with-glasses_s2.npz"  # a latent without its image: the pair moves to "-1"
    stray.write_bytes(b"a stray latent")
    blocker = tmp_path / "no_qt" / "PySide6"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the CLI must not import Qt')\n")
    env = {**weights_env, "PYTHONPATH": str(blocker.parent)}
    r = anyface("generate", "a smiling woman", "with glasses", "-n", "2", "--seed", "1", "-o", out,
                "--save-latent", "--json", "--device", "cpu", env_extra=env, check_rc=0)
    assert r.stderr.strip() == "", r.stderr[-2000:]  # --json: no progress bars, no library noise
    js = json.loads(r.stdout)
    assert [o["seed"] for o in js["outputs"]] == [1, 2]
    assert js["outputs"][0]["bank"].startswith("pack's own, ")  # the default method (knn) reads the pack's bank
    for o in js["outputs"]:
        assert Path(o["image"]).is_file() and Path(o["latent"]).is_file()
        with Image.open(o["image"]) as im:
            assert im.size[0] == im.size[1] >= 16
    assert Path(js["outputs"][0]["image"]).name == "a-smiling-woman-with-glasses_s1-1.png"
    for o in js["outputs"]:  # an image and its latent share their name
        assert Path(o["image"]).stem == Path(o["latent"]).stem, o
    assert Path(js["outputs"][1]["image"]).name == "a-smiling-woman-with-glasses_s2-1.png"
    assert theirs.read_bytes() == b"someone else's file" and stray.read_bytes() == b"a stray latent"
    # the same provenance tag as a GUI export (the GUI reads it back), marked as generated
    from anyface_desktop.export import read_provenance

    tag = read_provenance(js["outputs"][0]["image"])
    assert tag is not None and tag["kind"] == "generated" and tag["captions"] == ["a smiling woman", "with glasses"]
    assert tag["bank"] == js["outputs"][0]["bank"]
    assert "AI-generated" in tag.get("description", "")


def test_generate_at_diversity_0_says_the_faces_are_the_same(tmp_path, weights_env):
    """--diversity 0 is the most typical face for every seed: the user is told, rather than finding n copies."""
    r = anyface("--quiet", "generate", "red hair", "-n", "2", "--diversity", "0", "-o", tmp_path, env_extra=weights_env,
                check_rc=0)
    assert "same for every seed: 2 identical faces" in r.stderr
    a, b = (np.asarray(Image.open(p)) for p in r.stdout.split())
    assert np.array_equal(a, b)
    r = anyface("--quiet", "generate", "red hair", "-n", "2", "--diversity", "0.5", "-o", tmp_path / "v",
                env_extra=weights_env, check_rc=0)
    assert "identical" not in r.stderr
    a, b = (np.asarray(Image.open(p)) for p in r.stdout.split())
    assert not np.array_equal(a, b)


def test_generate_says_what_the_dictionary_reads_unknown_words_as(tmp_path, weights_env):
    """The tiny pack's word map: words its CLIP never saw are read with a known word added, and the user is told
    which (stderr; "read_as" in --json). Captions of known words get no note."""
    r = anyface("generate", "someone with a crimson mane", "a zxqv person", "-n", "1", "-o", tmp_path / "a",
                env_extra=weights_env, check_rc=0)
    note = next(line for line in r.stderr.splitlines() if line.startswith("note: reading"))
    assert "'mane' as 'hair'" in note and "'crimson' as '" in note and "not known: 'zxqv'" in note
    r = anyface("generate", "someone with a crimson mane", "-n", "1", "-o", tmp_path / "b", "--json",
                env_extra=weights_env, check_rc=0)
    js = json.loads(r.stdout)
    assert js["read_as"]["mane"] == ["hair"] and set(js["read_as"]) == {"crimson", "mane"}
    r = anyface("generate", "a person with red hair", "-n", "1", "-o", tmp_path / "c", "--json",
                env_extra=weights_env, check_rc=0)
    assert "read_as" not in json.loads(r.stdout)
    r = anyface("--quiet", "generate", "someone with a crimson mane", "-n", "1", "-o", tmp_path / "d",
                env_extra=weights_env, check_rc=0)
    assert "reading" not in r.stderr
    # edit says it too, and its --json report carries it (a folder without photos: no inversion needed)
    (tmp_path / "empty").mkdir()
    r = anyface("edit", tmp_path / "empty", "--caption", "a crimson mane", "-o", tmp_path / "e", "--json",
                env_extra=weights_env)
    assert json.loads(r.stdout)["read_as"]["mane"] == ["hair"], (r.returncode, r.stdout[-1000:], r.stderr[-1000:])


def test_edit_single_photo(tmp_path, weights_env):
    src = tmp_path / "me.jpg"
    Image.fromarray(photo(256)).save(src, quality=92)
    before = src.read_bytes()
    out = tmp_path / "out"
    r = anyface("edit", src, "--caption", "grey hair", "--strength", "0.5", "--tier", "fast", "--aligned-only",
                "--threads", "1",
                "--format", "webp", "--save-latent", "-o", out, env_extra=weights_env, check_rc=0)
    assert "1 of 1 photos done, 0 failed" in r.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "anyface-report"))) == \
        ["me_anyface_face0.npz", "me_anyface_face0.webp"]
    assert src.read_bytes() == before
    from core.io import read_metadata

    meta = read_metadata(out / "me_anyface_face0.webp")
    assert meta.get("captions") == ["grey hair"]
    assert meta.get("kind") == "edited" and meta.get("provenance")
    # what the edit used, as a GUI export says it (it said method null, seed 0, identity_layers null)
    assert meta.get("method") == "knn" and meta.get("identity_layers") == 1 and meta.get("seed") is None
    from core.latents import load_latent

    lat = load_latent(out / "me_anyface_face0.npz")  # the latent says the same
    assert lat.method == "knn" and lat.seed is None
    assert lat.extra.get("identity_layers") == 1 and lat.extra.get("tier") == "fast" and "bank" in lat.extra


def test_edit_quiet_still_names_failures_and_bad_values_need_no_photo_work(tmp_path, weights_env):
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = anyface("--quiet", "edit", src, "--caption", "smiling", "-o", tmp_path / "out", env_extra=weights_env,
                check_rc=1)
    assert "FAILED broken.jpg: [invalid_image]" in r.stderr and "0 of 1 photos done, 1 failed" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = anyface("--quiet", "edit", empty, "--caption", "smiling", "-o", tmp_path / "out4", env_extra=weights_env,
                check_rc=0)
    assert "no photos in" in r.stderr and "--recursive" in r.stderr
    # out of range for the pack (10 W+ layers): refused once, before any photo is read
    r = anyface("edit", src, "--caption", "smiling", "--identity-layers", "99", "-o", tmp_path / "out2",
                env_extra=weights_env, check_rc=2)
    assert "identity layers must be in 0..9" in r.stderr
    from core.align import detector_status

    if detector_status()["fan"] is not None:  # FAN weights are not installed here: refused up front
        r = anyface("edit", src, "--caption", "smiling", "--detector", "fan", "-o", tmp_path / "out3",
                    env_extra=weights_env, check_rc=2)
        assert "face detector 'fan' cannot run" in r.stderr and "--detector auto" in r.stderr
        assert not (tmp_path / "out3" / "anyface-report.csv").exists()


def test_edit_folder_sharded_resumed_merged(tmp_path, weights_env):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photo(256)).save(src / "a.jpg", quality=92)
    Image.fromarray(photo(224, flip=True)).save(src / "b.png")
    Image.fromarray(photo(240)).save(src / "sub" / "a.jpg", quality=92)  # same name in a subfolder
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.fromarray(np.full((128, 128, 3), 120, np.uint8)).save(src / "sub" / "wall.png")  # no face
    before = tree_hashes(src)
    out = tmp_path / "edited"
    common = ["edit", src, "--recursive", "--caption", "smiling", "--caption", "grey hair", "--strength", "0.6",
              "--face", "largest", "--tier", "fast", "-o", out]
    rcs = []
    for k in (1, 2):
        r = anyface(*common, "--shard", f"{k}/2", "--json", env_extra=weights_env)
        assert r.returncode in (0, 1), r.stderr[-3000:]
        rcs.append(r.returncode)
        js = json.loads(r.stdout)
        assert js["summary"]["shard"] == [k, 2]
    assert 1 in rcs  # the two bad files are somewhere
    merged = anyface("--json", "batch-merge", out, check_rc=1)
    items = {d["rel"]: d for d in json.loads(merged.stdout)["items"]}
    assert set(items) == {"a.jpg", "b.png", "broken.jpg", "sub/a.jpg", "sub/wall.png"}
    assert {k: (v["status"], v["code"]) for k, v in items.items()} == {
        "a.jpg": ("ok", ""), "b.png": ("ok", ""), "sub/a.jpg": ("ok", ""),
        "broken.jpg": ("failed", "invalid_image"), "sub/wall.png": ("failed", "no_face")}
    for rel, o in [("a.jpg", "a_anyface.png"), ("b.png", "b_anyface.png"), ("sub/a.jpg", "sub/a_anyface.png")]:
        assert items[rel]["outputs"] == [o]
        with Image.open(out / o) as im:
            assert im.size == Image.open(src / rel).size
    # unsharded re-run: everything done is skipped, the failures are retried and reported again
    r = anyface(*common, env_extra=weights_env, check_rc=1)
    assert "3 of 5 photos done (3 by an earlier run), 2 failed" in r.stdout
    assert "FAILED broken.jpg: [invalid_image]" in r.stderr and "FAILED sub/wall.png: [no_face]" in r.stderr
    with open(out / "anyface-report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert tree_hashes(src) == before


@pytest.mark.slow
def test_edit_interrupted_by_sigint_then_resumed(tmp_path, weights_env):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(10):
        Image.fromarray(photo(200 + 4 * i, flip=bool(i % 2))).save(src / f"p{i:02d}.jpg", quality=90)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **weights_env}
    cmd = [str(SCRIPT), "edit", str(src), "--caption", "a beard", "--tier", "fast", "-o", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    manifest = out / ".anyface-batch" / "manifest.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if manifest.is_file() and manifest.read_text().count('"status": "ok"') >= 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr[-3000:]
    assert time.time() - t0 < 10  # stops after the current photo (generous: the test machine is shared)
    assert "cancelled" in stdout
    from core import batch

    idx = batch.read_manifest(batch.manifest_paths(out))
    done = [k for k, v in idx.items() if v["status"] == "ok"]
    assert 1 <= len(done) < 10
    for k in done:
        assert (out / idx[k]["outputs"][0]).is_file()
    r = anyface(*cmd[1:], env_extra=weights_env, check_rc=0)
    assert f"10 of 10 photos done ({len(done)} by an earlier run), 0 failed" in r.stdout
    assert len(list(out.glob("*_anyface.png"))) == 10


def test_auto_threads(monkeypatch):
    """Auto: one thread for small packs on CPU (unless $OMP_NUM_THREADS says otherwise), torch's choice else."""
    from types import SimpleNamespace

    import torch

    from anyface_desktop import cli

    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        cli._set_threads(SimpleNamespace(threads=None), SimpleNamespace(resolution=1024), cpu)
        assert torch.get_num_threads() == 2
        cli._set_threads(SimpleNamespace(threads=None), SimpleNamespace(resolution=64), cpu)
        assert torch.get_num_threads() == 1
        cli._set_threads(SimpleNamespace(threads=2), SimpleNamespace(resolution=64), cpu)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        cli._set_threads(SimpleNamespace(threads=None), SimpleNamespace(resolution=64), cpu)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_generate_interrupted_by_sigint_exits_130_and_json_says_why(tmp_path, weights_env):
    """Ctrl-C in `generate` is an interruption (130, like `edit`), not a failure (1); with --json the reason of a
    run that stops is also on stdout as JSON."""
    out = tmp_path / "g"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **weights_env}
    cmd = [str(SCRIPT), "--json", "generate", "a smiling man", "-n", "3000", "-o", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and not (out.is_dir() and any(out.glob("*.png"))):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr[-3000:]
    js = json.loads(stdout)
    assert js["exit_code"] == 130 and "interrupted" in stderr
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # no staging file left, whenever Ctrl-C came
    # what was made before Ctrl-C is kept and listed (faces are written as they are made, not all at the end)
    written = sorted(out.glob("*.png"))
    assert written and sorted(Path(o["image"]) for o in js["outputs"]) == written
    assert [o["seed"] for o in js["outputs"]] == list(range(len(written)))
    assert len(written) < 3000
    r = anyface("--json", "--pack", "no-such-pack", "generate", "x", env_extra=weights_env)
    assert r.returncode in (1, 2) and r.stderr.strip()
    assert json.loads(r.stdout)["exit_code"] == r.returncode and "no-such-pack" in json.loads(r.stdout)["error"]


def test_convert_names_refuses_and_reports_like_a_user_expects(tmp_path):
    """`convert` used to give tracebacks for `-o ./` or `-o folder/` and silently replaced any file, a photo
    included."""
    golden = next(p for p in (ROOT / "tests" / "data" / "golden" / "rosinality_tiny.pt",
                              ROOT.parent / "shared" / "golden" / "rosinality_tiny.pt") if p.is_file())
    work = tmp_path / "w"
    work.mkdir()
    r = anyface("convert", golden, "-o", str(work) + "/", check_rc=0)  # a folder: <input name>.safetensors in it
    out = work / "rosinality_tiny.safetensors"
    assert out.is_file() and str(out) in r.stdout
    r = anyface("convert", golden, "-o", work, check_rc=2)  # the same again: exists
    assert "--overwrite" in r.stderr and "Traceback" not in r.stderr
    anyface("convert", golden, "-o", work, "--overwrite", check_rc=0)
    photo_file = tmp_path / "precious.jpg"
    photo_file.write_bytes(b"a photo")
    r = anyface("convert", golden, "-o", photo_file, check_rc=2)
    assert ".safetensors" in r.stderr and photo_file.read_bytes() == b"a photo"
    anyface("convert", golden, "-o", tmp_path / "named", check_rc=0)
    assert (tmp_path / "named.safetensors").is_file()
    r = anyface("convert", tmp_path, "-o", work / "x.safetensors", check_rc=2)
    assert "is a folder" in r.stderr
    r = anyface("convert", golden, "-o", photo_file / "x.safetensors", check_rc=2)
    assert "under a file" in r.stderr
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = anyface("convert", golden, "-o", ro, check_rc=1)
        assert "Could not write" in r.stderr and "Traceback" not in r.stderr


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """`generate -o <read-only folder>` loaded the models and made every face before failing (root ignores chmod,
    so a read-only filesystem is stood in for by the write test failing)."""
    import errno
    import tempfile

    from anyface_desktop import cli

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "NamedTemporaryFile", read_only)
        with pytest.raises(cli._UsageError, match="cannot write into .*Read-only file system"):
            cli._output_folder(tmp_path, create=False)
        with pytest.raises(cli._UsageError, match="cannot create the output folder in .*Read-only"):
            cli._output_folder(tmp_path / "new" / "deeper", create=False)
    assert cli._output_folder(tmp_path / "new", create=True).is_dir()


def test_edit_names_an_unusable_method_once_before_any_photo(tmp_path, weights_env):
    """A method that cannot run (here: the pack's bank is damaged, so nothing reads text) failed every photo of a
    folder with the same line; it is said once, before the work, with how to fix it."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(128)).save(src / f"p{i}.png")
    data = tmp_path / "data"
    bad = data / "weights" / "tiny" / "knn_bank.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * 1000)
    env = {**weights_env, "ANYFACE_DATA_DIR": str(data)}
    r = anyface("edit", src, "--caption", "smiling", "--tier", "fast", "-o", tmp_path / "out", env_extra=env)
    assert r.returncode == 1 and "corrupt" in r.stderr and "tiny-knn" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # building one's own bank is not blocked by the damaged one, and then everything works
    r = anyface("models", "build-bank", "--size", "32", env_extra=env, check_rc=0)
    assert "few faces to choose from" in r.stdout and "replaced the bank built here" not in r.stdout
    r = anyface("models", "build-bank", "--size", "32", "--json", env_extra=env, check_rc=0)
    assert json.loads(r.stdout)["replaced_earlier_bank"] is True
    r = anyface("edit", src, "--caption", "smiling", "--tier", "fast", "-o", tmp_path / "out", "--threads", "1",
                env_extra=env, check_rc=0)
    assert "3 of 3 photos done, 0 failed" in r.stdout
    from core.io import read_metadata

    edited = sorted(p for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert read_metadata(edited[0])["bank"] == "built here, 32 faces, seed 0"  # the faces came from that bank
    r = anyface("models", "verify", "--pack", "tiny", env_extra=env)
    assert r.returncode == 1 and "corrupt" in r.stdout  # a damaged file is reported, even an optional one
    # and the list says which bank is in use
    r = anyface("models", "list", "--pack", "tiny", "--json", env_extra=env, check_rc=0)
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert rows["built-bank"]["state"] == "in use" and rows["built-bank"]["path"].endswith("tiny.safetensors")
    assert "not used: the bank built here replaces it" in rows["tiny-knn"]["detail"]
