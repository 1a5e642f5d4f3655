"""The window on the REAL core code path (Engine, dlib detection, FFHQ alignment, inversion, paste-back,
core.batch) with tiny random-weight models, so it runs without the bundled pack. The same flows on the
trained pack are in test_gui_e2e.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytestqt")

from anyface_desktop.backend import Backend  # noqa: E402
from anyface_desktop.dialogs import open_error_boxes  # noqa: E402
from anyface_desktop.settings import ENV_SETTINGS_FILE  # noqa: E402

pytestmark = pytest.mark.gui


def _engine():
    from core.cmd import CMD
    from core.cvae import CVAE
    from core.engine import Engine
    from tests.fakes import FakeClip, FakeGenerator

    torch.manual_seed(0)
    G = FakeGenerator(num_ws=8, w_dim=16, img_resolution=32)
    clip = FakeClip(embed_dim=32)
    cmd = CMD(32, 8, 16, d_model=32, num_layers=2, num_heads=4, hidden_dim=64, dropout=0.0)
    cvae = CVAE(32, 8, 16, z_dim=8, hidden_dim=32, num_layers=2)
    with torch.no_grad():
        cmd.head[-1].weight.normal_(std=0.3)
        cvae.decoder[-1].weight.normal_(std=0.5)
    cmd.set_w_avg(G.w_avg)
    cvae.set_w_stats(G.w_avg, 0.5)
    return Engine(G, clip, cmd=cmd, cvae=cvae, pack_id="toy", device="cpu")


class ToyBackend(Backend):
    def load(self, pack=None, device=None, progress=None, should_cancel=None, detector="auto", tier="fast", force=False):
        self.warm_up(detector)
        self.warm_up_engine("balanced")
        return self.info(0.0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("engine_gui")
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    Image.fromarray(data.coffee()[::2, ::2]).save(d / "coffee.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return d


@pytest.fixture(scope="module")
def win(qapp, workdir):
    import os

    old = os.environ.get(ENV_SETTINGS_FILE)
    os.environ[ENV_SETTINGS_FILE] = str(workdir / "settings.ini")
    from anyface_desktop.main_window import MainWindow

    w = MainWindow(pack="toy", device="cpu", backend=ToyBackend(_engine()))
    w.settings.set("ask_before_discard", False)
    w.settings.set("tier", "balanced")  # 50 optimisation steps: a real, cancellable, progress-reporting job
    w.show()
    end = time.time() + 30
    while w.engine_info is None and time.time() < end:
        qapp.processEvents()
        time.sleep(0.005)
    yield w
    w.close()
    assert not w.host.thread.isRunning()
    if old is None:
        os.environ.pop(ENV_SETTINGS_FILE, None)
    else:
        os.environ[ENV_SETTINGS_FILE] = old


def _idle(qtbot, w, timeout=60000):
    qtbot.waitUntil(lambda: w.idle, timeout=timeout)


class Probe:
    def __init__(self):
        from PySide6.QtCore import QTimer

        self.gaps, self.last = [], time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        self.last = now

    def __enter__(self):
        self.last = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()

    @property
    def worst_ms(self):
        return 1000 * max(self.gaps, default=0)


def test_real_pipeline_open_invert_edit_undo_export(qtbot, win, workdir):
    assert win.engine_info.methods == ["cmd", "cvae"]
    # KNN is offered too (no bank yet: picking it offers to build one, see test_gui_bank.py)
    assert [win.captions.method.itemData(i) for i in range(win.captions.method.count())] == ["cmd", "cvae", "knn"]
    assert "first use" in win.captions.method.itemText(2)
    with Probe() as probe:
        win.open_photo(str(workdir / "astronaut.png"))
        qtbot.waitUntil(lambda: win.face is not None or bool(open_error_boxes()), timeout=60000)
        _idle(qtbot, win)
    assert not open_error_boxes(), open_error_boxes()[-1].text()
    assert len(probe.gaps) > 10 and probe.worst_ms < 100, f"event loop blocked {probe.worst_ms:.0f} ms"
    assert win.face.aligned.shape == (32, 32, 3) and tuple(win.face.ws.shape) == (8, 16)
    win.captions.add_caption("a smiling woman")
    win.captions.add_caption("with red hair")
    win.captions.set_strength(0.1)
    _idle(qtbot, win)
    low = win.current_entry.composed.copy()
    for v in range(10, 101, 10):
        win.captions.slider.setValue(v)
        qtbot.wait(3)
    _idle(qtbot, win)
    high = win.current_entry.composed
    assert high.shape == low.shape == (512, 512, 3)
    assert np.abs(high.astype(int) - low.astype(int)).sum() > 0, "the preview did not change"
    n = win.history.index
    win.act_undo.trigger()
    assert win.history.index == n - 1
    win.act_redo.trigger()
    assert np.array_equal(win.current_entry.composed, high)
    out = workdir / "out" / "edit.webp"
    win.export_to({"path": str(out), "fmt": "webp", "quality": 90, "size": 256, "save_latent": True})
    _idle(qtbot, win)
    from anyface_desktop.export import read_provenance
    from core.latents import load_latent

    meta = read_provenance(str(out))
    assert meta["provenance"] == "made/edited with AnyFace Desktop" and meta["pack"] == "toy"
    assert load_latent(out.with_suffix(".npz")).captions == ["a smiling woman", "with red hair"]


def test_real_pipeline_cancel_inversion(qtbot, win, workdir):
    win.settings.set("tier", "best")  # 300 steps
    cancelled = []
    win.host.worker.cancelled.connect(lambda j: cancelled.append(j.kind))
    try:
        win.pick_face(0)
        qtbot.waitUntil(lambda: win.progress.maximum() > 1, timeout=30000)  # progress is reported
        win.cancel_long_job()
        qtbot.waitUntil(lambda: "invert" in cancelled, timeout=30000)
        _idle(qtbot, win)
    finally:
        win.settings.set("tier", "balanced")


def test_real_generate(qtbot, win):
    win.captions.set_captions(["an old man"])
    win.generate(4, 5)
    qtbot.waitUntil(lambda: len(win.gallery.results) == 4 and win.idle, timeout=30000)
    assert [r.seed for r in win.gallery.results] == [5, 6, 7, 8]
    again = win.host.backend.engine.synthesize(["an old man"], 1, 6)[0]
    assert np.array_equal(again.image, win.gallery.results[1].image)


def test_real_batch_report_lists_corrupt_and_no_face(qtbot, win, workdir):
    src = workdir / "batch"
    src.mkdir()
    for name in ("astronaut.png", "coffee.png", "corrupt.jpg"):
        (src / name).write_bytes((workdir / name).read_bytes())
    win.settings.set("tier", "fast")
    win.open_batch()
    dlg = win.batch_dialog
    dlg.input.setText(str(src))
    dlg.output.setText(str(workdir / "batch_out"))
    dlg.captions.setText("smiling")
    with Probe() as probe:
        dlg.start()
        qtbot.waitUntil(lambda: dlg.job is None, timeout=60000)
    assert probe.worst_ms < 100, f"event loop blocked {probe.worst_ms:.0f} ms during the batch"
    rep = dlg.report
    assert rep is not None and rep.ok == 1, dlg.log.toPlainText()
    assert {Path(i.path).name for i in rep.failed_items} == {"coffee.png", "corrupt.jpg"}
    assert (workdir / "batch_out" / "astronaut_anyface.png").exists()
    dlg.close()
