"""Shared fixtures: settings and user dirs redirected to tmp_path (napari's _fresh_settings)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
NO_SKIPS = bool(os.environ.get("CI"))  # CI installs every dependency and builds the pack: a skip is a failure


def _skip_to_failure(rep, what: str) -> None:
    rep.outcome = "failed"
    rep.longrepr = f"{what} skipped under CI, where nothing may be missing: {rep.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if NO_SKIPS and rep.skipped and not hasattr(rep, "wasxfail"):
        _skip_to_failure(rep, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    rep = (yield).get_result()
    if NO_SKIPS and rep.skipped:
        _skip_to_failure(rep, "module")
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _fresh_user_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own user data dir, settings and no stray weights dir."""
    base = tmp_path_factory.mktemp("userdirs")
    monkeypatch.setenv("ANYFACE_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    monkeypatch.delenv("ANYFACE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("ANYFACE_DEVICE", raising=False)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA
