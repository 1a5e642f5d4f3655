"""Import of official files (golden fixtures standing in for ffhq.pkl / stylegan2-ffhq-config-f.pt)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from core import packs, weights
from core.checkpoints import load_generator
from core.errors import InvalidCheckpointError, UnsafeCheckpointError

GOLDEN = next(p for p in (Path(__file__).resolve().parent / "data" / "golden",
                          Path(__file__).resolve().parents[2] / "shared" / "golden") if (p / "nvlabs_tiny.pkl").exists())


@pytest.fixture
def official_manifest(tmp_path, monkeypatch):
    """The real manifest plus entries that treat the golden fixtures as if they were official files."""
    res = tmp_path / "resources"
    (res / "weights").mkdir(parents=True)
    m = json.loads((weights.resources_dir() / "weights" / "manifest.json").read_text())
    for name, fid in [("nvlabs_tiny.pkl", "nvlabs-ffhq-32"), ("rosinality_tiny.pt", "rosinality-ffhq-32")]:
        b = (GOLDEN / name).read_bytes()
        m["files"].append({"id": fid, "file_name": name, "pack": "ffhq-32", "role": "generator",
                           "sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "source": "golden",
                           "url": "", "license": "test", "format": "x", "optional": False})
    m["packs"]["ffhq-32"] = {"title": "t", "resolution": 32, "files": ["nvlabs-ffhq-32", "rosinality-ffhq-32"]}
    (res / "weights" / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    return res


@pytest.mark.parametrize("name,key,ref", [("nvlabs_tiny.pkl", "img_c", "nvlabs_tiny_io.pt"),
                                          ("rosinality_tiny.pt", "img_c", "rosinality_tiny_io.pt")])
def test_import_official_generator_gives_working_pack(official_manifest, tmp_path, name, key, ref):
    src = tmp_path / name
    shutil.copy(GOLDEN / name, src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    r = packs.import_file(src)
    assert r.known and r.pack == "ffhq-32" and r.path.suffix == ".safetensors"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # input untouched
    # the pack now resolves to the converted file, which reproduces the golden output
    files = weights.locate_pack_files("ffhq-32")
    assert files["generator"][1] == r.path
    G = load_generator(r.path)
    io = torch.load(GOLDEN / ref, weights_only=True)
    with torch.no_grad():
        img = G.synthesis(io["ws_c"], noise_mode="const")
    torch.testing.assert_close(img, io[key], rtol=1e-4, atol=1e-4)
    packs.delete_imported(r.id)
    assert not r.path.exists()
    from core.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="nvlabs-ffhq-32"):  # only the alternatives remain, absent
        weights.locate_pack_files("ffhq-32")


def test_unknown_generator_is_imported_unverified_into_its_own_pack(tmp_path):
    src = tmp_path / "my_gan.pt"
    shutil.copy(GOLDEN / "rosinality_tiny.pt", src)
    r = packs.import_file(src)
    assert not r.known and r.pack == "custom-32" and "unverified" in r.note
    assert "custom-32" in weights.Manifest.load().packs


def test_import_refuses_non_models_and_malicious_pickles(tmp_path):
    page = tmp_path / "ffhq.pkl"
    page.write_text("<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(InvalidCheckpointError, match="HTML"):
        packs.import_file(page)
    with pytest.raises(UnsafeCheckpointError):
        packs.import_file(GOLDEN / "malicious.pkl")
    assert not Path("/tmp/pwned_marker").exists() or Path("/tmp/pwned_marker").stat().st_mtime < 0


def test_disk_usage_counts_imported(tmp_path):
    src = tmp_path / "g.pt"
    shutil.copy(GOLDEN / "rosinality_tiny.pt", src)
    r = packs.import_file(src)
    assert packs.disk_usage()[r.pack] == r.path.stat().st_size


def test_two_generators_with_the_same_name_are_both_kept_and_registered(tmp_path):
    """`import "ffhq copy.pkl"` then `import "ffhq copy.pt"` (another generator) used to write both to
    custom-32/ffhq copy.safetensors (the first entry then failed verify), and the second import into a pack made by
    an import was never part of the pack."""
    a, b = tmp_path / "ffhq copy.pkl", tmp_path / "ffhq copy.pt"
    shutil.copy(GOLDEN / "nvlabs_tiny.pkl", a)
    shutil.copy(GOLDEN / "rosinality_tiny.pt", b)
    ra, rb = packs.import_file(a), packs.import_file(b)
    assert ra.pack == rb.pack == "custom-32" and ra.path != rb.path and ra.path.is_file() and rb.path.is_file()
    m = weights.Manifest.load()
    assert m.packs["custom-32"].files[:2] == (rb.id, ra.id)  # the newest first
    states = {s.file.id: s.state for s in weights.pack_status("custom-32", manifest=m, verify=True)}
    assert states[rb.id] == "present" and states[ra.id] == "not needed"  # neither is corrupt
    packs.delete_imported(rb.id)
    m = weights.Manifest.load()
    assert rb.id not in m.packs["custom-32"].files and ra.path.is_file() and not rb.path.exists()
