"""`anyface models build-bank` and `anyface generate --refine` through the console script, on the tiny pack
(small sizes, so each run takes seconds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tests.test_cli import anyface, weights_env  # noqa: F401 - weights_env is a fixture


def _bank_path() -> Path:
    return Path(os.environ["ANYFACE_DATA_DIR"]) / "banks" / "tiny.safetensors"


def test_build_bank_small_with_progress_on_stderr(weights_env):  # noqa: F811
    from core.latent_bank import LatentBank

    r = anyface("models", "build-bank", "--pack", "tiny", "--size", "64", "--batch", "16", env_extra=weights_env,
                check_rc=0)
    assert "building KNN bank" in r.stderr and "64/64" in r.stderr, r.stderr[-2000:]
    assert str(_bank_path()) in r.stdout and "64 faces" in r.stdout
    bank = LatentBank.load(_bank_path())
    assert len(bank) == 64
    r = anyface("models", "build-bank", "--size", "32", "--json", env_extra=weights_env, check_rc=0)
    info = json.loads(r.stdout)
    assert info["size"] == 32 and info["pack"] == "tiny" and info["bytes"] == _bank_path().stat().st_size
    assert r.stderr.strip() == "" or "building" not in r.stderr  # --json: no progress bar
    assert len(LatentBank.load(_bank_path())) == 32
    # a bank built here is listed by `models du` and removed by `models delete --bank` (neither saw it)
    r = anyface("models", "du", "--json", env_extra=weights_env, check_rc=0)
    assert json.loads(r.stdout)["tiny bank"] == _bank_path().stat().st_size
    r = anyface("models", "delete", "--bank", "tiny", env_extra=weights_env, check_rc=0)
    assert not _bank_path().exists() and "is used again" in r.stdout
    anyface("models", "delete", "--bank", "tiny", env_extra=weights_env, check_rc=2)
    assert "file ID or --bank" in anyface("models", "delete", env_extra=weights_env, check_rc=2).stderr


def test_build_bank_usage_errors(weights_env):  # noqa: F811
    r = anyface("models", "build-bank", "--size", "0", env_extra=weights_env, check_rc=2)
    assert "--size" in r.stderr
    r = anyface("models", "build-bank", "--size", "-5", env_extra=weights_env, check_rc=2)
    assert not _bank_path().exists()
    r = anyface("models", "build-bank", "--help", check_rc=0)
    assert "--size" in r.stdout and "example" in r.stdout


def test_generate_with_refine(weights_env, tmp_path):  # noqa: F811
    r = anyface("generate", "a smiling woman with red hair", "-n", "2", "--seed", "5", "--refine", "4",
                "-o", tmp_path, "--json", env_extra=weights_env, check_rc=0)
    out = json.loads(r.stdout)["outputs"]
    assert len(out) == 2 and all(o["refine_steps"] == 4 and o["method"].endswith("+refine") for o in out)
    assert all(o["clip_similarity_after"] >= o["clip_similarity_before"] for o in out)
    assert all(Image.open(o["image"]).size == (64, 64) for o in out)
    r = anyface("generate", "a smiling woman with red hair", "-n", "1", "--refine", "3", "-o", tmp_path / "bar",
                env_extra=weights_env, check_rc=0)
    assert "refining" in r.stderr
