"""Official-pack-at-once flows in the window, on the REAL tiny pack engine: a pack with no CMD/CVAE/bank offers to
build the KNN bank (size dialog, progress, cancel leaves no file), and Refine with CLIP adds a history entry.
The GUI thread never runs model code: everything goes through the worker, as in the app."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QMessageBox  # noqa: E402

from anyface_desktop.backend import Backend  # noqa: E402
from anyface_desktop.dialogs import open_error_boxes  # noqa: E402
from anyface_desktop.settings import ENV_SETTINGS_FILE  # noqa: E402
from core import weights  # noqa: E402

pytestmark = pytest.mark.gui
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"

if any(s.state == "missing" and not s.file.optional for s in weights.pack_status("tiny")):
    pytestmark = [pytestmark, pytest.mark.skip(reason="bundled tiny pack not built (make pack)")]


class QuickBackend(Backend):
    """The real backend on an already loaded engine, minus the detector warm-up (no photo here)."""

    def load(self, pack=None, device=None, progress=None, should_cancel=None, detector="auto", tier="fast", force=False):
        return self.info(0.0)


@pytest.fixture(scope="module")
def tiny_engine():
    from core.engine import Engine

    return Engine.from_pack("tiny", device="cpu")


@pytest.fixture
def engine(tiny_engine):
    """The tiny engine, restored after each test (tests strip its CMD/CVAE/bank to act as an official pack)."""
    e = tiny_engine
    saved = e.cmd, e.cvae, e.bank
    yield e
    e.cmd, e.cvae, e.bank = saved
    e.clear_cache()


def _window(qapp, engine, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SETTINGS_FILE, str(tmp_path / "settings.ini"))
    from anyface_desktop.main_window import MainWindow

    w = MainWindow(pack="tiny", device="cpu", backend=QuickBackend(engine))
    w.settings.set("ask_before_discard", False)
    w.show()
    end = time.time() + 30
    while w.engine_info is None and time.time() < end:
        qapp.processEvents()
        time.sleep(0.005)
    assert w.engine_info is not None
    return w


@pytest.fixture
def official_win(qapp, engine, tmp_path, monkeypatch):
    """A window on the tiny generator + CLIP only: what an imported official pack looks like."""
    engine.cmd = engine.cvae = engine.bank = None
    w = _window(qapp, engine, tmp_path, monkeypatch)
    yield w
    _close(w)


@pytest.fixture
def full_win(qapp, engine, tmp_path, monkeypatch):
    w = _window(qapp, engine, tmp_path, monkeypatch)
    yield w
    _close(w)


def _close(w):
    for box in open_error_boxes():
        box.close()
    if w.bank_question is not None:
        w.bank_question.close()
    w.close()  # cancels and waits for the worker thread
    assert not w.host.thread.isRunning()


def _bank_file():
    from core.engine import bank_cache_path

    return bank_cache_path("tiny")


def test_pack_without_models_offers_the_bank_and_builds_it(qtbot, official_win):
    w = official_win
    assert w.engine_info.methods == [] and w.captions.method_key() == "knn"
    box = w.bank_question
    assert box is not None and box.isVisible(), "no offer to build the bank on load"
    # the size dialog as the user sees it (default sizes), for the docs
    dlg = w.build_bank_dialog()
    qtbot.waitExposed(dlg)
    assert dlg.size.minimum() == 2000 and dlg.size.maximum() == 200000 and dlg.value() == 20000
    assert "MB" in dlg.estimate.text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert dlg.grab().save(str(SCREENSHOTS / "knn_bank.png"))
    dlg.reject()
    # Yes on the question -> the dialog; a small bank for the test
    w.BANK_SIZES = (16, 200000, 64)
    box.button(QMessageBox.StandardButton.Yes).click()
    dlg = w.bank_dialog
    qtbot.waitExposed(dlg)
    assert dlg.value() == 64
    with qtbot.waitSignal(w.host.worker.result, timeout=60000,
                          check_params_cb=lambda job, value: job.kind == "bank"):
        dlg.accept()
        assert w.progress.isVisible() and w.cancel_btn.isVisible()
    qtbot.waitUntil(lambda: w.idle, timeout=30000)
    assert w.engine_info.methods == ["knn"] and w.engine_info.bank_size == 64
    assert _bank_file().is_file() and not open_error_boxes()
    # generating with KNN now works (no offer, no error)
    w.captions.set_captions(["a smiling woman with red hair"], emit=False)
    w.generate(2, 0)
    qtbot.waitUntil(lambda: len(w.gallery.results) == 2 and w.idle, timeout=60000)
    assert all(r.method == "knn" for r in w.gallery.results) and not open_error_boxes()


def test_generate_with_knn_and_no_bank_asks_instead_of_failing(qtbot, official_win):
    w = official_win
    w.bank_question.close()
    w.captions.set_captions(["an old man"], emit=False)
    w.generate(2, 0)
    assert w.bank_question.isVisible() and not open_error_boxes()
    assert not w.host.busy and w.gallery.results == []


def test_cancelled_bank_build_leaves_no_bank(qtbot, official_win):
    w = official_win
    w.bank_question.close()
    w.build_bank(200000)
    qtbot.waitUntil(lambda: w.progress.maximum() > 0 and w.progress.value() >= 1, timeout=30000)
    with qtbot.waitSignal(w.host.worker.cancelled, timeout=30000):
        w.cancel_btn.click()
    qtbot.waitUntil(lambda: w.idle, timeout=30000)
    folder = _bank_file().parent
    assert not _bank_file().exists() and not (folder.exists() and any(folder.iterdir()))  # no partial file either
    assert w.engine_info.methods == [] and w.host.backend.engine.bank is None
    assert "cancelled" in w.statusBar().currentMessage().lower() and not open_error_boxes()


def test_model_manager_builds_the_bank_of_the_pack_in_use(qtbot, official_win):
    w = official_win
    w.bank_question.close()
    w.open_model_manager()
    mm = w.model_manager
    assert mm.bank_btn.isEnabled()
    w.BANK_SIZES = (16, 1000, 32)
    mm.bank_btn.click()
    dlg = w.bank_dialog
    assert dlg is not None and dlg.value() == 32
    dlg.accept()
    qtbot.waitUntil(lambda: w.idle and w.engine_info.bank_size == 32, timeout=60000)
    assert _bank_file().is_file()
    mm.close()


def test_refine_adds_a_history_entry_that_edits_start_from(qtbot, full_win):
    w = full_win
    w.captions.set_captions(["a man with a beard"], emit=False)
    w.generate(2, 3)
    qtbot.waitUntil(lambda: len(w.gallery.results) == 2 and w.idle, timeout=60000)
    w.gallery.select(0)
    w.refine_steps.setValue(4)
    assert w.act_refine.isEnabled()
    w.captions.set_captions(["a smiling woman with blond hair"], emit=False)
    with qtbot.waitSignal(w.host.worker.result, timeout=60000, check_params_cb=lambda job, v: job.kind == "refine"):
        w.act_refine.trigger()  # the gallery's face becomes the face being edited, then it is refined
    qtbot.waitUntil(lambda: w.idle, timeout=30000)
    assert not open_error_boxes()
    entry = w.history.current
    assert entry.label == "Refined with CLIP (4 steps)" and w.history.index == 1
    assert w.source is entry and w.current_entry is entry
    first = w.history.jump(0)
    assert not np.array_equal(entry.ws.numpy(), first.ws.numpy())
    w.history.jump(1)
    extra = entry.result.extra
    assert extra["clip_similarity_after"] >= extra["clip_similarity_before"]
    assert entry.params["captions"] == ["a smiling woman with blond hair"]
    # refine can be cancelled, and then nothing is added
    job = w.refine_current(steps=400)
    qtbot.waitUntil(lambda: w.progress.value() >= 1, timeout=30000)
    with qtbot.waitSignal(w.host.worker.cancelled, timeout=30000):
        w.cancel_long_job()
    qtbot.waitUntil(lambda: w.idle, timeout=30000)
    assert job.cancelled and w.history.current is entry


def test_a_cvae_that_reads_text_through_the_bank_is_offered_and_builds_it(qtbot, qapp, engine, tmp_path,
                                                                          monkeypatch):
    """Without a bank the bundled CVAE (condition_bank_k 16) silently vanished from the method list; the bundled
    CMD reads captions through the bank too (session 11)."""
    engine.bank = None
    w = _window(qapp, engine, tmp_path, monkeypatch)
    try:
        assert w.engine_info.needs_bank == ["cmd", "cvae"] and w.engine_info.methods == []
        for m in ("cmd", "cvae"):
            i = w.captions.method.findData(m)
            assert i >= 0 and "needs the KNN bank" in w.captions.method.itemText(i), m
        i = w.captions.method.findData("cvae")
        if w.bank_question is not None:
            w.bank_question.close()
        w.captions.method.setCurrentIndex(i)
        assert w.needs_bank()  # picking it offers to build the bank
        qtbot.waitUntil(lambda: w.bank_question is not None and w.bank_question.isVisible(), timeout=5000)
        # the pack has trained text models: the offer says why they need the bank, not that there are none
        assert "its CMD and CVAE read text through it" in w.bank_question.text()
        assert "no trained text model" not in w.bank_question.text()
    finally:
        _close(w)


def _damaged_pack_bank():
    """A damaged copy of the pack's bank where the app looks first (the user data dir): the bundled file is kept."""
    import os

    from core.weights import resources_dir

    own = Path(os.environ["ANYFACE_DATA_DIR"]) / "weights" / "tiny" / "knn_bank.safetensors"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_bytes((resources_dir() / "weights" / "tiny" / "knn_bank.safetensors").read_bytes()[:100_000])
    return own


def test_a_damaged_pack_bank_loads_the_pack_without_it_and_a_built_bank_replaces_it():
    """The GUI refused the whole pack when its KNN bank was damaged, though the bank is the one file the app can
    make again: the pack now loads without it and says why; any other damaged file still stops the load."""
    from core.errors import CorruptWeightsError

    from core.weights import resources_dir

    own = _damaged_pack_bank()  # in this test's own user data dir (conftest), like the bank built below
    b = Backend(pack="tiny", device="cpu")
    info = b.load(detector=None)
    assert info.methods == [] and info.needs_bank == ["cmd", "cvae"] and info.bank_size == 0
    assert "tiny-knn" in info.bank_problem and "corrupt" in info.bank_problem
    info = b.build_bank(16)
    assert info.bank_problem == "" and info.methods == ["knn", "cmd", "cvae"] and info.bank_size == 16
    assert len(b.engine.synthesize(["red hair"], n=1, method="cmd")) == 1
    _bank_file().unlink()  # Models > delete the built bank: the window loads again with force
    assert b.load(detector=None).bank_size == 16  # same pack, same device: nothing read again
    info = b.load(detector=None, force=True)  # read again: the damaged pack bank is back, and said so
    assert info.bank_size == 0 and "tiny-knn" in info.bank_problem
    cmd = own.parent / "cmd.safetensors"  # a damaged CMD is not let through
    cmd.write_bytes((resources_dir() / "weights" / "tiny" / "cmd.safetensors").read_bytes()[:1000])
    with pytest.raises(CorruptWeightsError, match="tiny-cmd"):
        Backend(pack="tiny", device="cpu").load(detector=None)


def test_the_window_says_the_bank_is_damaged_and_offers_to_build_one(qtbot, qapp, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SETTINGS_FILE, str(tmp_path / "settings.ini"))
    from anyface_desktop.main_window import MainWindow

    _damaged_pack_bank()
    w = None
    try:
        w = MainWindow(pack="tiny", device="cpu", backend=Backend(pack="tiny", device="cpu"))
        w.settings.set("ask_before_discard", False)
        w.show()
        qtbot.waitUntil(lambda: w.engine_info is not None, timeout=60000)
        qtbot.waitUntil(lambda: w.idle, timeout=60000)
        assert not open_error_boxes(), "the pack did not load"
        box = w.bank_question
        assert box is not None and box.isVisible()
        assert "is damaged, so the pack loaded without it" in box.text() and "CMD and CVAE read text" in box.text()
        assert "tiny-knn" in box.informativeText() and "A bank built here replaces it" in box.informativeText()
        assert "damaged" in w.statusBar().currentMessage()
        assert w.captions.method.findData("cmd") >= 0  # still listed: "needs the KNN bank: built on first use"
    finally:
        if w is not None:
            _close(w)
