"""Layout rules, entry points and the weights manifest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import weights
from core.errors import CorruptWeightsError, MissingWeightsError, UnknownWeightsError

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("module", ["core", "core.weights", "core.device", "core.errors", "anyface_desktop.cli"])
def test_core_and_cli_never_import_qt_or_training(module):
    import pkgutil

    extra = ""
    if module == "core":  # import every core module, not just the package
        import core

        names = [m.name for m in pkgutil.iter_modules(core.__path__)]
        extra = "; ".join(f"import core.{n}" for n in names)
    r = _run(f"import {module}; {extra}\nimport sys\n"
             "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'training', 'anyface_desktop') "
             "and not m.startswith('anyface_desktop.cli') and m != 'anyface_desktop']\n"
             "print('BAD', bad)")
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout, r.stdout


def test_cli_version_and_help():
    r = subprocess.run([sys.executable, "-m", "anyface_desktop.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "anyface 0.1.0" in r.stdout
    r = subprocess.run([sys.executable, "-m", "anyface_desktop.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "examples:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "anyface_desktop.cli", "--no-such-flag"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2


def test_gui_entry_point_starts_and_closes_offscreen(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "main.py", "--quit-after", "300"], capture_output=True, text=True,
                       timeout=180, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


def test_device_choice(monkeypatch):
    from core import device

    assert device.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("ANYFACE_DEVICE", "cpu")
    assert device.pick_device().type == "cpu"
    assert device.pick_device("auto").type == device.available_devices()[0].split(":")[0]
    if "cuda:7" not in device.available_devices():
        with pytest.raises(ValueError, match="Available"):
            device.pick_device("cuda:7")


# ----------------------------------------------------------------------------------- weights


@pytest.fixture
def toy_manifest(tmp_path, monkeypatch):
    """A manifest with one real file whose size and sha256 are known, in a fake resources dir."""
    res = tmp_path / "resources"
    (res / "weights" / "toy").mkdir(parents=True)
    payload = os.urandom(3000)
    (res / "weights" / "toy" / "a.bin").write_bytes(payload)
    man = {
        "version": 1,
        "packs": {"toy": {"title": "Toy", "resolution": 8, "files": ["toy-a", "toy-b"]}},
        "files": [
            {"id": "toy-a", "file_name": "a.bin", "pack": "toy", "role": "generator", "sha256": hashlib.sha256(payload).hexdigest(),
             "size": len(payload), "source": "https://example.invalid/a.bin"},
            {"id": "toy-b", "file_name": "b.bin", "pack": "toy", "role": "clip", "sha256": None, "size": None,
             "source": "https://example.invalid/b.bin"},
        ],
    }
    (res / "weights" / "manifest.json").write_text(json.dumps(man))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    return weights.Manifest.load(), res, payload


def test_real_manifest_parses_and_has_provenance():
    m = weights.Manifest.load()
    assert "tiny" in m.packs and "ffhq-1024" in m.packs
    for f in m.files.values():
        assert f.license and f.source, f.id
    assert m.get("nvlabs-ffhq-1024").sha256.startswith("a205a346")


def test_unknown_id_lists_valid_ids(toy_manifest):
    m, _, _ = toy_manifest
    with pytest.raises(UnknownWeightsError) as e:
        m.get("nope")
    assert "toy-a" in str(e.value) and "toy-b" in str(e.value)


def test_missing_file_names_itself_where_and_source(toy_manifest):
    m, res, _ = toy_manifest
    with pytest.raises(MissingWeightsError) as e:
        weights.locate("toy-b", manifest=m)
    msg = str(e.value)
    assert "toy-b" in msg and "b.bin" in msg and "example.invalid/b.bin" in msg
    assert str(res / "weights" / "toy" / "b.bin") in msg
    assert str(weights.user_data_dir()) in msg
    with pytest.raises(MissingWeightsError) as e:
        weights.locate_pack("toy", manifest=m)
    assert [x.id for x in e.value.missing] == ["toy-b"]


def test_wrong_size_and_wrong_hash_are_corrupt(toy_manifest, tmp_path, monkeypatch):
    m, res, payload = toy_manifest
    wdir = tmp_path / "w"
    (wdir / "toy").mkdir(parents=True)
    monkeypatch.setenv("ANYFACE_WEIGHTS_DIR", str(wdir))
    (wdir / "toy" / "a.bin").write_bytes(payload[:-1])
    with pytest.raises(CorruptWeightsError, match="size"):
        weights.locate("toy-a", manifest=m)
    flipped = bytes([payload[0] ^ 1]) + payload[1:]
    (wdir / "toy" / "a.bin").write_bytes(flipped)
    assert weights.locate("toy-a", manifest=m) == wdir / "toy" / "a.bin"  # size ok: cheap check passes
    with pytest.raises(CorruptWeightsError, match="sha256"):
        weights.locate("toy-a", manifest=m, verify=True)
    states = {s.file.id: s.state for s in weights.pack_status("toy", manifest=m, verify=True)}
    assert states == {"toy-a": "corrupt", "toy-b": "missing"}


def test_lookup_order_precedence(toy_manifest, tmp_path, monkeypatch):
    m, res, payload = toy_manifest
    wf = m.get("toy-a")
    bundled = res / "weights" / "toy" / "a.bin"
    assert weights.locate(wf) == bundled
    user = weights.user_data_dir() / "weights" / "toy" / "a.bin"
    user.parent.mkdir(parents=True)
    user.write_bytes(payload)
    assert weights.locate(wf) == user
    envdir = tmp_path / "envw"
    envdir.mkdir()
    (envdir / "a.bin").write_bytes(payload)
    monkeypatch.setenv("ANYFACE_WEIGHTS_DIR", str(envdir))
    assert weights.locate(wf) == envdir / "a.bin"
    explicit = tmp_path / "explicit.bin"
    explicit.write_bytes(payload)
    assert weights.locate(wf, explicit) == explicit


def test_verify_streams_with_progress_cancel_and_cache(toy_manifest):
    m, res, payload = toy_manifest
    wf = m.get("toy-a")
    seen = []
    digest = weights.verify_file(wf, res / "weights" / "toy" / "a.bin", progress=lambda d, t: seen.append((d, t)), use_cache=False)
    assert digest == wf.sha256 and seen[-1] == (3000, 3000)
    from core.errors import CancelledError

    with pytest.raises(CancelledError):
        weights.sha256_file(res / "weights" / "toy" / "a.bin", should_cancel=lambda: True)
    states = {s.file.id: s.state for s in weights.pack_status("toy", manifest=m)}
    assert states["toy-a"] == "present"  # cached after the verify above


def test_cli_models_list_json(toy_manifest):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "anyface_desktop.cli", "--json", "models", "verify", "--pack", "toy"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    rows = json.loads(r.stdout)
    assert {x["id"]: x["state"] for x in rows} == {"toy-a": "present", "toy-b": "missing"}
    assert r.returncode == 1


def test_files_with_the_same_role_are_alternatives(tmp_path, monkeypatch):
    res = tmp_path / "resources"
    (res / "weights" / "p").mkdir(parents=True)
    (res / "weights" / "p" / "alt2.bin").write_bytes(b"abc")
    (res / "weights" / "p" / "clip.bin").write_bytes(b"c")
    files = [{"id": i, "file_name": f, "pack": "p", "role": r, "sha256": None, "size": None, "source": "s", "license": "l"}
             for i, f, r in [("alt1", "alt1.bin", "generator"), ("alt2", "alt2.bin", "generator"), ("c", "clip.bin", "clip")]]
    (res / "weights" / "manifest.json").write_text(json.dumps(
        {"packs": {"p": {"title": "P", "resolution": 8, "files": ["alt1", "alt2", "c"]}}, "files": files}))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    m = weights.Manifest.load()
    files_found = weights.locate_pack_files("p", manifest=m)
    assert files_found["generator"][0].id == "alt2"
    assert {s.file.id: s.state for s in weights.pack_status("p", manifest=m)}["alt1"] == "not needed"
    assert weights.usable_packs(m) == ["p"]
    (res / "weights" / "p" / "alt2.bin").unlink()
    with pytest.raises(MissingWeightsError) as e:
        weights.locate_pack("p", manifest=m)
    assert {x.id for x in e.value.missing} == {"alt1", "alt2"}


def _manifest(res: Path, files: list[dict], packs: dict) -> weights.Manifest:
    (res / "weights").mkdir(parents=True, exist_ok=True)
    for f in files:
        f.setdefault("source", f"https://example.invalid/{f['file_name']}")
        f.setdefault("license", "l")
    (res / "weights" / "manifest.json").write_text(json.dumps({"packs": packs, "files": files}))
    return weights.Manifest.load()


def test_a_bad_copy_of_one_alternative_does_not_hide_a_good_one(tmp_path, monkeypatch):
    """A partial ffhq.pkl must not block a good rosinality .pt; and two known copies under ONE file name (the
    rosinality file circulates in three sizes) are both accepted."""
    res, wdir = tmp_path / "resources", tmp_path / "w"
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    monkeypatch.setenv("ANYFACE_WEIGHTS_DIR", str(wdir))
    good, small = b"g" * 500, b"s" * 300
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    files = [dict(id="pkl", file_name="ffhq.pkl", pack="p", role="generator", sha256=sha(good), size=500),
             dict(id="pt-big", file_name="g.pt", pack="p", role="generator", sha256=sha(good), size=500),
             dict(id="pt-small", file_name="g.pt", pack="p", role="generator", sha256=sha(small), size=300),
             dict(id="clip", file_name="clip.bin", pack="p", role="clip", sha256=None, size=None)]
    m = _manifest(res, files, {"p": {"title": "P", "resolution": 8, "files": [f["id"] for f in files]}})
    (wdir / "p").mkdir(parents=True)
    (wdir / "p" / "clip.bin").write_bytes(b"c")
    (wdir / "p" / "ffhq.pkl").write_bytes(good[:123])  # a partial download
    (wdir / "p" / "g.pt").write_bytes(small)  # the smaller copy of the .pt
    found = weights.locate_pack_files("p", manifest=m, verify=True)
    assert found["generator"][0].id == "pt-small" and found["generator"][1] == wdir / "p" / "g.pt"
    states = {s.file.id: (s.state, s.detail) for s in weights.pack_status("p", manifest=m)}
    assert states["pt-small"][0] == "present" and states["pkl"][0] == "not needed"
    assert "ffhq.pkl does not match" in states["pkl"][1]
    (wdir / "p" / "g.pt").write_bytes(small[:-1] + b"x")  # same size, other bytes: only the hash can tell
    assert weights.locate_pack_files("p", manifest=m)["generator"][0].id == "pt-small"  # the cheap check passes
    with pytest.raises(CorruptWeightsError) as e:
        weights.locate_pack_files("p", manifest=m, verify=True)
    assert e.value.id == "pkl" and "ffhq.pkl" in str(e.value) and "example.invalid/ffhq.pkl" in str(e.value)
    assert {s.file.id: s.state for s in weights.pack_status("p", manifest=m, verify=True)} == {
        "pkl": "corrupt", "pt-big": "corrupt", "pt-small": "corrupt", "clip": "present"}


def test_a_file_shared_by_packs_is_found_in_either_pack_folder(tmp_path, monkeypatch):
    """The CLIP is listed under ffhq-1024 but used by ffhq-256 too: a user who puts it in the ffhq-256 folder must
    not be told it is missing."""
    res, wdir = tmp_path / "resources", tmp_path / "w"
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    monkeypatch.setenv("ANYFACE_WEIGHTS_DIR", str(wdir))
    files = [dict(id="g1", file_name="g1.bin", pack="big", role="generator", sha256=None, size=None),
             dict(id="g2", file_name="g2.bin", pack="small", role="generator", sha256=None, size=None),
             dict(id="clip", file_name="clip.bin", pack="big", role="clip", sha256=None, size=None)]
    m = _manifest(res, files, {"big": {"title": "B", "resolution": 8, "files": ["g1", "clip"]},
                               "small": {"title": "S", "resolution": 8, "files": ["g2", "clip"]}})
    (wdir / "small").mkdir(parents=True)
    (wdir / "small" / "g2.bin").write_bytes(b"g")
    (wdir / "small" / "clip.bin").write_bytes(b"c")
    assert weights.locate_pack("small", manifest=m)["clip"] == wdir / "small" / "clip.bin"
    with pytest.raises(MissingWeightsError) as e:  # the big pack does not borrow from the small pack's folder
        weights.locate_pack("big", manifest=m)
    assert {x.id for x in e.value.missing} == {"g1", "clip"}
    (wdir / "small" / "clip.bin").unlink()
    with pytest.raises(MissingWeightsError) as e:
        weights.locate_pack("small", manifest=m)
    looked = [x for x in e.value.missing if x.id == "clip"][0].searched
    assert str(wdir / "small" / "clip.bin") in looked and str(wdir / "big" / "clip.bin") in looked


def test_verify_over_all_packs_fails_only_for_what_is_installed(tmp_path, monkeypatch):
    """On a fresh install `anyface models verify` exited 1 because official packs the user never installed are
    missing; it fails for corrupt files and for missing files of packs that are (partly) there or named."""
    res = tmp_path / "resources"
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    files = [dict(id="mine-g", file_name="g.bin", pack="mine", role="generator", sha256=None, size=1),
             dict(id="big-g", file_name="big.bin", pack="big", role="generator", sha256=None, size=None),
             dict(id="clip", file_name="clip.bin", pack="mine", role="clip", sha256=None, size=None),
             dict(id="half-g", file_name="h.bin", pack="half", role="generator", sha256=None, size=None),
             dict(id="half-c", file_name="hc.bin", pack="half", role="clip", sha256=None, size=None)]
    packs = {"mine": {"title": "M", "resolution": 8, "files": ["mine-g", "clip"], "bundled": True},
             "big": {"title": "B", "resolution": 8, "files": ["big-g", "clip"]}}  # the CLIP is shared
    _manifest(res, files[:3], packs)
    (res / "weights" / "mine").mkdir()
    (res / "weights" / "mine" / "g.bin").write_bytes(b"g")
    (res / "weights" / "mine" / "clip.bin").write_bytes(b"c")  # present for "big" too: big is still not installed
    cmd = [sys.executable, "-m", "anyface_desktop.cli", "models", "verify"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "big-g" in r.stdout and "missing" in r.stdout and "looked in" in r.stdout  # still listed, with where
    r = subprocess.run(cmd + ["--pack", "big"], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert r.returncode == 1
    packs["half"] = {"title": "H", "resolution": 8, "files": ["half-g", "half-c"]}
    _manifest(res, files, packs)
    (res / "weights" / "half").mkdir()
    (res / "weights" / "half" / "h.bin").write_bytes(b"h")  # a pack half installed: its missing CLIP fails verify
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert r.returncode == 1 and "half-c" in r.stdout
