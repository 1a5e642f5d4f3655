"""GUI logic with a fake engine (fast, deterministic): captions, live preview stamps, undo/redo, export
metadata, error boxes, cancel, responsiveness, clean close. End-to-end tests on the real pack: test_gui_e2e.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytestqt")

from anyface_desktop.backend import Backend  # noqa: E402
from anyface_desktop.dialogs import open_error_boxes  # noqa: E402
from anyface_desktop.export import read_provenance  # noqa: E402
from anyface_desktop.settings import ENV_SETTINGS_FILE, Settings  # noqa: E402
from core.errors import CancelledError, InvalidImageError  # noqa: E402

pytestmark = pytest.mark.gui
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


# ------------------------------------------------------------------------------------------ fakes
@dataclass
class FakeResult:
    image: np.ndarray
    ws: torch.Tensor
    seed: int | None
    captions: list = field(default_factory=list)
    method: str = "cmd"
    strength: float | None = None


class FakeEngine:
    """Same method signatures as core.engine.Engine; images are a deterministic function of ws."""

    pack_id, resolution, num_ws, w_dim, device = "fake", 32, 6, 8, "cpu"
    methods = ["cmd", "cvae", "knn"]

    def __init__(self, delay: float = 0.0, fail_on: str | None = None):
        self.delay, self.fail_on = delay, fail_on
        self.edit_calls = 0
        self.lock = threading.Lock()

    def _text_ws(self, captions, seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(abs(hash(tuple(captions))) % 2**31 + seed)
        return torch.randn(self.num_ws, self.w_dim, generator=g)

    def render(self, ws) -> np.ndarray:
        ws = torch.as_tensor(ws, dtype=torch.float32).reshape(self.num_ws, self.w_dim)
        rgb = (torch.sigmoid(ws[-3:].mean(1) * 2) * 255).numpy()
        yy, xx = np.mgrid[0:self.resolution, 0:self.resolution] / self.resolution
        img = np.empty((self.resolution, self.resolution, 3), np.float32)
        for c in range(3):
            img[..., c] = rgb[c] * (0.6 + 0.4 * (xx if c == 0 else yy))
        return img.clip(0, 255).astype(np.uint8)

    def synthesize(self, captions, n=4, seed=0, method="cmd", diversity=1.0, *, progress=None, should_cancel=None):
        out = []
        for i in range(n):
            if should_cancel is not None and should_cancel():
                raise CancelledError()
            ws = self._text_ws(captions, seed + i) * diversity
            out.append(FakeResult(self.render(ws), ws, seed + i, list(captions), method))
            if progress is not None:
                progress(i + 1, n)
        return out

    def edit(self, source_ws, captions, strength, method="cmd", identity_layers=None, *, seed=0, progress=None,
             should_cancel=None):
        with self.lock:
            self.edit_calls += 1
        if self.fail_on and any(self.fail_on in c for c in captions):
            raise ValueError(f"fake engine cannot do '{self.fail_on}'")
        if self.delay:
            time.sleep(self.delay)
        k = identity_layers or 0
        ws = source_ws.clone()
        ws[k:] = source_ws[k:] + strength * (self._text_ws(captions)[k:] * 3 - source_ws[k:])
        return FakeResult(self.render(ws), ws, seed, list(captions), method, strength)


class FakeBackend(Backend):
    """Photo steps without models: faces are boxes given by the file name; inversion is slow and cancellable."""

    def __init__(self, engine=None, invert_seconds: float = 0.0):
        super().__init__(engine or FakeEngine())
        self.invert_seconds = invert_seconds

    def load(self, pack=None, device=None, progress=None, should_cancel=None, detector=None, tier="fast", force=False):
        return self.info(0.0)

    def read_image(self, path):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise InvalidImageError(f"{Path(path).name} is not a readable image.") from e

    def detect_faces(self, image, detector):
        h, w = image.shape[:2]
        name = getattr(self, "_name", "")
        return [] if "noface" in name else [(w * 0.25, h * 0.2, w * 0.6, h * 0.7), (w * 0.65, h * 0.3, w * 0.9, h * 0.6)][
            : 2 if "two" in name else 1]

    open_seconds = 0.0

    def open_photo(self, path, detector="auto"):
        time.sleep(self.open_seconds)
        self._name = Path(path).name
        return super().open_photo(path, detector)

    def align_face(self, image, face, size):
        from PIL import Image

        x0, y0, x1, y1 = map(int, face)
        crop = Image.fromarray(image[y0:y1, x0:x1]).resize((size, size))
        return np.asarray(crop), (x0, y0, x1, y1)

    def invert(self, aligned, tier, progress, should_cancel):
        steps = 20
        for i in range(steps):
            if should_cancel is not None and should_cancel():
                raise CancelledError()
            time.sleep(self.invert_seconds / steps)
            if progress is not None:
                progress(i + 1, steps)
        return torch.as_tensor(aligned.reshape(-1)[: 48].astype(np.float32) / 128 - 1).reshape(6, 8)

    def batch_processor(self, job):
        from core.batch import image_output

        def process(path, should_cancel=None):
            photo = self.open_photo(str(path), job.detector)
            face = self.prepare_face(photo, 0, job.tier, None, should_cancel)
            out = self.edit(face, face.ws, job.captions, job.strength, job.method, job.identity_layers)
            return [image_output(out.composed, job.fmt, metadata={"captions": job.captions})]

        return process

    def paste_back(self, original, face, transform):
        from PIL import Image

        x0, y0, x1, y1 = transform
        out = original.copy()
        out[y0:y1, x0:x1] = np.asarray(Image.fromarray(face).resize((x1 - x0, y1 - y0)))
        return out


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _settings_file(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_SETTINGS_FILE, str(tmp_path / "settings.ini"))
    Settings().set("ask_before_discard", False)  # a modal question would stop the test (one test turns it on)
    yield
    for box in open_error_boxes():
        box.close()


@pytest.fixture
def photo(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    img = (rng.random((120, 160, 3)) * 60 + np.linspace(60, 190, 160)[None, :, None]).astype(np.uint8)
    p = tmp_path / "portrait.png"
    from PIL import Image

    Image.fromarray(img).save(p)
    return p


def make_window(qtbot, backend=None):
    from anyface_desktop.main_window import MainWindow

    win = MainWindow(pack="tiny", device="cpu", backend=backend or FakeBackend())
    qtbot.addWidget(win)
    win.show()
    qtbot.waitUntil(lambda: win.engine_info is not None, timeout=5000)
    return win


def close_window(qtbot, win):
    win.close()
    assert not win.host.thread.isRunning()


def wait_idle(qtbot, win, timeout=10000):
    qtbot.waitUntil(lambda: win.idle, timeout=timeout)


def generate_faces(qtbot, win, n, seed, caption="a face"):
    """Captions (unless some are there) and Generate; returns when the gallery shows the n faces."""
    if not win.captions.captions():
        win.captions.add_caption(caption)
    win.generate(n, seed)
    qtbot.waitUntil(lambda: len(win.gallery.results) == n, timeout=5000)


def open_ready(qtbot, win, path):
    win.open_photo(str(path))
    qtbot.waitUntil(lambda: win.face is not None, timeout=10000)
    wait_idle(qtbot, win)


# ------------------------------------------------------------------------------------------ tests
def test_empty_window_and_screenshot(qtbot):
    win = make_window(qtbot)
    assert win.engine_info.methods == ["cmd", "cvae", "knn"]
    assert win.captions.method.count() == 3
    assert "Device" in win.device_label.text() and "fake" in win.pack_label.text()
    assert not win.act_undo.isEnabled() and not win.act_save.isEnabled()
    close_window(qtbot, win)


def test_captions_add_remove_edit_in_place(qtbot):
    from anyface_desktop.captions import CaptionEditor

    ed = CaptionEditor()
    qtbot.addWidget(ed)
    seen = []
    ed.captionsChanged.connect(seen.append)
    ed.entry.setText("a smiling woman")
    ed.add_from_entry()
    ed.add_caption("red hair")
    ed.add_caption("   ")
    assert ed.captions() == ["a smiling woman", "red hair"] and seen[-1] == ed.captions()
    ed.edit_caption(1, "ginger locks")
    assert ed.captions() == ["a smiling woman", "ginger locks"] and seen[-1] == ed.captions()
    ed.edit_caption(0, "")  # emptied in place -> removed
    assert ed.captions() == ["ginger locks"]
    ed.list.setCurrentRow(0)
    ed.remove_selected()
    assert ed.captions() == []
    ed.set_history(["a | b", "c"])
    ed.history_menu.actions()[0].trigger()
    assert ed.captions() == ["a", "b"]


def test_open_photo_slider_preview_drops_stale_and_undo_redo(qtbot, photo):
    engine = FakeEngine(delay=0.03)
    win = make_window(qtbot, FakeBackend(engine))
    open_ready(qtbot, win, photo)
    assert win.face is not None and win.history.index == 0
    win.captions.add_caption("a smiling face")
    win.captions.add_caption("grey hair")
    wait_idle(qtbot, win)
    first = win.current_entry.face_image.copy()
    assert win.history.index >= 1
    # a drag: 30 slider moves while the engine takes 30 ms per edit
    calls0 = engine.edit_calls
    win.captions.slider.setSliderDown(True)
    for v in range(0, 100, 3):
        win.captions.slider.setValue(v)
        qtbot.wait(2)
    win.captions.slider.setSliderDown(False)
    wait_idle(qtbot, win)
    runs = engine.edit_calls - calls0
    assert runs < 20, f"dragging queued work behind itself ({runs} edits for 34 moves)"
    assert win.scheduler.dropped > 0
    assert win.current_entry.params["strength"] == pytest.approx(win.captions.strength())
    assert not np.array_equal(first, win.current_entry.face_image)  # the preview changed
    n = win.history.index
    assert n >= 2
    last = win.current_entry.face_image.copy()
    win.act_undo.trigger()
    assert win.history.index == n - 1
    assert not np.array_equal(win.current_entry.face_image, last)
    win.act_redo.trigger()
    assert win.history.index == n and np.array_equal(win.current_entry.face_image, last)
    win.jump_history(0)
    assert win.history.index == 0 and win.act_redo.isEnabled()
    assert win.history_panel.list.count() == n + 1
    wait_idle(qtbot, win)
    close_window(qtbot, win)


def test_stale_result_after_new_photo_is_not_shown(qtbot, photo, tmp_path):
    engine = FakeEngine(delay=0.2)
    win = make_window(qtbot, FakeBackend(engine))
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    qtbot.waitUntil(lambda: win.scheduler.in_flight is not None, timeout=2000)
    stamp = win.scheduler.in_flight.stamp
    win.scheduler.invalidate()  # what opening another photo does
    wait_idle(qtbot, win)
    assert win.history.index == 0 and win.current_entry.params.get("strength") == 0.0, stamp
    close_window(qtbot, win)


def test_generate_gallery_more_like_this_and_edit(qtbot, tmp_path):
    win = make_window(qtbot)
    generate_faces(qtbot, win, 4, 7, "an old man with a beard")
    assert [r.seed for r in win.gallery.results] == [7, 8, 9, 10]
    assert win.gallery.view.item(0).text() == "seed 7"
    # reproducible by seed
    again = FakeEngine().synthesize(["an old man with a beard"], 4, 7)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, win.gallery.results))
    picked = win.gallery.results[1]
    win.gallery.select(1)
    win.gallery.more_btn.click()
    qtbot.waitUntil(lambda: not win.host.busy and len(win.gallery.results) == 5, timeout=5000)
    # the picked face stays first; the variations carry no seed of their own (seed + i alone does not make them)
    assert win.gallery.results[0] is picked and win.gallery.view.item(0).text() == "seed 8"
    assert all(r.seed is None and r.extra["variation_of"] == 8 for r in win.gallery.results[1:])
    assert win.gallery.view.item(1).text() == "like seed 8"
    win.gallery.select(1)
    win.gallery.edit_btn.click()
    assert win.source is not None and win.face is None and win.history.index == 0
    win.captions.set_strength(0.9)
    wait_idle(qtbot, win)
    assert win.history.index == 1
    # the export says how the face was made: the seed it is a variation of, the steps, the identity lock (it had
    # seed None and nothing else, so it could not be traced or remade)
    out = tmp_path / "variation_edit.png"
    win.export_to({"path": str(out), "fmt": "png", "save_latent": False})
    wait_idle(qtbot, win)
    tag = read_provenance(win.last_export.image_path)
    assert tag["variation_of"] == 8 and tag["identity_layers"] == win.captions.identity_layers()
    assert tag["steps"][0] == "Variation of seed 8" and len(tag["steps"]) == 2
    close_window(qtbot, win)


def test_export_writes_metadata_and_latent_never_over_input(qtbot, photo, tmp_path):
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("blue eyes")
    wait_idle(qtbot, win)
    for fmt in ("png", "jpg", "webp"):
        out = tmp_path / "out" / f"face.{fmt}"
        win.export_to({"path": str(out), "fmt": fmt, "size": 64, "quality": 90, "save_latent": True})
        wait_idle(qtbot, win)
        assert out.exists() and out.with_suffix(".npz").exists()
        meta = read_provenance(str(out))
        assert meta["provenance"] == "made/edited with AnyFace Desktop"
        assert meta["prompt"] == "blue eyes" and meta["pack"] == "fake"
        from PIL import Image

        with Image.open(out) as im:
            assert max(im.size) == 64
    before = photo.read_bytes()
    win.export_to({"path": str(photo), "fmt": "png"})
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    assert "input" in open_error_boxes()[-1].text().lower()
    assert photo.read_bytes() == before
    for b in open_error_boxes():
        b.close()
    # the latent round-trips: open it to keep editing
    exported_ws = win.current_entry.ws
    win.open_latent(str(tmp_path / "out" / "face.npz"))
    qtbot.waitUntil(lambda: win.face is None or bool(open_error_boxes()), timeout=5000)
    assert not open_error_boxes(), open_error_boxes()[-1].text()
    assert torch.allclose(win.source.ws, exported_ws) and win.captions.captions() == ["blue eyes"]
    # a photo edit's latent is an edited face, not "Generated face (seed 0)", and exports as edited
    assert win.windowTitle().startswith("Edited face (face.npz)")
    win.settings.set("output_dir", str(tmp_path / "again"))
    win.quick_export()
    wait_idle(qtbot, win)
    assert Path(win.last_export.image_path).name.startswith("anyface_face_")
    assert read_provenance(win.last_export.image_path)["kind"] == "edited"
    close_window(qtbot, win)


def test_export_of_a_preview_not_yet_in_the_history_names_the_steps_to_it(qtbot, photo, tmp_path):
    """A preview shown while the slider is held is not a history step yet; its export named only itself and lost
    the photo's start step."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("blue eyes")
    wait_idle(qtbot, win)
    committed = [e.label for e in win.history.entries]
    win.captions.slider.setSliderDown(True)
    try:
        win.captions.set_strength(0.3)
        qtbot.waitUntil(lambda: win.current_entry is not None and win.current_entry.params.get("strength") == 0.3,
                        timeout=5000)
        wait_idle(qtbot, win)
        live = win.current_entry
        assert not any(e is live for e in win.history.entries)  # shown, not committed
        out = tmp_path / "live.png"
        win.export_to({"path": str(out), "fmt": "png", "save_latent": False})
        wait_idle(qtbot, win)
        steps = read_provenance(str(out))["steps"]
        assert steps == committed + [live.label] and steps[0] == committed[0]
    finally:
        win.captions.slider.setSliderDown(False)
    # once released, the preview is committed: the same face exports the same steps
    win.captions.slider.sliderReleased.emit()
    wait_idle(qtbot, win)
    assert win.history.current is live
    win.export_to({"path": str(tmp_path / "committed.png"), "fmt": "png", "save_latent": False})
    wait_idle(qtbot, win)
    assert read_provenance(str(tmp_path / "committed.png"))["steps"] == steps
    close_window(qtbot, win)


def test_engine_failure_becomes_error_box_and_app_survives(qtbot, photo):
    win = make_window(qtbot, FakeBackend(FakeEngine(fail_on="explode")))
    open_ready(qtbot, win, photo)
    win.captions.add_caption("explode")
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    box = open_error_boxes()[-1]
    assert "explode" in box.text() and "Traceback" in box.detailedText()
    box.close()
    wait_idle(qtbot, win)
    win.captions.set_captions(["fine"])
    wait_idle(qtbot, win)
    assert win.current_entry.params["captions"] == ["fine"]
    close_window(qtbot, win)


def test_unreadable_photo_shows_error(qtbot, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    win = make_window(qtbot)
    win.open_photo(str(bad))
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    assert "broken.png" in open_error_boxes()[-1].text()
    for b in open_error_boxes():
        b.close()
    close_window(qtbot, win)


def test_several_faces_picker(qtbot, tmp_path, photo):
    two = tmp_path / "two_people.png"
    two.write_bytes(photo.read_bytes())
    win = make_window(qtbot)
    open_ready(qtbot, win, two)
    assert win.face_combo.count() == 2 and win.face_combo_action.isVisible()
    assert len(win.canvas.face_boxes) == 2
    win.pick_face(1)
    qtbot.waitUntil(lambda: win.face is not None and win.face.index == 1, timeout=5000)
    close_window(qtbot, win)


def test_inversion_cancel_never_blocks_event_loop_and_no_result_after_cancel(qtbot, photo):
    win = make_window(qtbot, FakeBackend(invert_seconds=1.0))
    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    from PySide6.QtCore import QTimer

    probe = QTimer()
    probe.setInterval(10)
    probe.timeout.connect(tick)
    probe.start()
    results = []
    win.host.worker.result.connect(lambda job, v: results.append(job.kind))
    cancelled = []
    win.host.worker.cancelled.connect(lambda job: cancelled.append(job.kind))
    win.open_photo(str(photo))
    qtbot.waitUntil(lambda: win.host.active and any(j.kind == "invert" for j in win.host.active.values()), timeout=5000)
    qtbot.wait(300)
    win.cancel_long_job()
    qtbot.waitUntil(lambda: "invert" in cancelled, timeout=5000)
    wait_idle(qtbot, win)
    probe.stop()
    assert "invert" not in results and win.face is None
    assert max(gaps) < 0.1, f"event loop blocked for {max(gaps) * 1000:.0f} ms"
    # and a full inversion with the probe running
    win.host.backend.invert_seconds = 0.5
    last[0] = time.perf_counter()
    gaps.clear()
    probe.start()
    win.pick_face(0)
    qtbot.waitUntil(lambda: win.face is not None, timeout=5000)
    probe.stop()
    assert max(gaps) < 0.1, f"event loop blocked for {max(gaps) * 1000:.0f} ms"
    close_window(qtbot, win)


def test_close_while_inverting_cancels_and_waits(qtbot, photo):
    win = make_window(qtbot, FakeBackend(invert_seconds=30))
    win.open_photo(str(photo))
    qtbot.waitUntil(lambda: any(j.kind == "invert" for j in win.host.active.values()), timeout=5000)
    t0 = time.perf_counter()
    win.close()
    assert not win.host.thread.isRunning()
    assert time.perf_counter() - t0 < 5


def test_batch_with_fake_engine_report_and_cancel(qtbot, tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.png").write_bytes(photo.read_bytes())
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "noface.png").write_bytes(photo.read_bytes())
    win = make_window(qtbot)
    win.captions.identity.setValue(3)
    win.open_batch()
    dlg = win.batch_dialog
    assert dlg.identity.value() == 3 and dlg.identity.maximum() == win.engine_info.num_ws - 1  # the main window's lock
    dlg.identity.setValue(2)  # its own setting for this batch
    assert dlg.identity.text() == "2 layers"
    dlg.input.setText(str(src))
    dlg.output.setText(str(tmp_path / "out"))
    dlg.captions.setText("smiling | grey hair")
    assert dlg.batch_job().identity_layers == 2
    dlg.strength.setValue(0.25)
    dlg.close()
    win.open_batch()  # reopened: the user's own choices stay (they were reset from the main window)
    assert dlg.identity.value() == 2 and dlg.strength.value() == 0.25
    dlg.start()
    qtbot.waitUntil(lambda: dlg.report is not None, timeout=10000)
    rep = dlg.report
    assert rep.ok == 3 and {Path(i.path).name for i in rep.failed_items} == {"corrupt.jpg", "noface.png"}
    assert "corrupt.jpg" in dlg.log.toPlainText() and "noface.png" in dlg.log.toPlainText()
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    # cancel
    win.host.backend.invert_seconds = 0.5
    dlg.output.setText(str(tmp_path / "out2"))
    dlg.start()
    qtbot.wait(200)
    dlg.cancel()
    qtbot.waitUntil(lambda: dlg.job is None, timeout=10000)
    assert "cancelled" in dlg.log.toPlainText().lower()
    assert dlg.report is not None and dlg.report.cancelled and dlg.report.ok < 3
    assert len(list((tmp_path / "out2").glob("*.png"))) < 3
    close_window(qtbot, win)


def test_model_manager_states_and_verify(qtbot, tmp_path, monkeypatch):
    import hashlib
    import json

    res = tmp_path / "resources"
    (res / "weights" / "toy").mkdir(parents=True)
    payload = b"x" * 300000
    (res / "weights" / "toy" / "a.bin").write_bytes(payload)
    (res / "weights" / "toy" / "c.bin").write_bytes(b"wrong size")
    man = {"version": 1, "packs": {"toy": {"title": "Toy pack", "resolution": 8, "files": ["toy-a", "toy-b", "toy-c"]}},
           "files": [{"id": "toy-a", "file_name": "a.bin", "pack": "toy", "role": "generator",
                      "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "source": "here"},
                     {"id": "toy-b", "file_name": "b.bin", "pack": "toy", "role": "clip", "sha256": None,
                      "size": None, "source": "https://example.invalid/b.bin"},
                     {"id": "toy-c", "file_name": "c.bin", "pack": "toy", "role": "cmd", "sha256": None,
                      "size": 5, "source": "there"}]}
    (res / "weights" / "manifest.json").write_text(json.dumps(man))
    monkeypatch.setenv("ANYFACE_RESOURCES", str(res))
    from anyface_desktop.model_manager import ModelManager

    mm = ModelManager("toy")
    qtbot.addWidget(mm)
    states = {s.file.id: s.state for s in mm.statuses}
    assert states == {"toy-a": "unverified", "toy-b": "missing", "toy-c": "corrupt"}
    assert "No model pack is ready" in mm.banner.text()
    assert "example.invalid/b.bin" in mm.table.item(1, 3).text()
    mm.verify()
    qtbot.waitUntil(lambda: mm.job is None, timeout=10000)
    assert {s.file.id: s.state for s in mm.statuses}["toy-a"] == "present"
    # import the missing file
    b = tmp_path / "b.bin"
    b.write_bytes(b"clip weights")
    mm.import_paths("toy", [str(b)])
    qtbot.waitUntil(lambda: mm.job is None, timeout=10000)
    assert {s.file.id: s.state for s in mm.statuses}["toy-b"] in ("present", "unverified")
    junk = tmp_path / "download.pkl"
    junk.write_bytes(b"<html>quota exceeded</html>")
    mm.import_paths("toy", [str(junk)])  # not a pack file: goes to core.packs.import_file, which refuses it
    qtbot.waitUntil(lambda: mm.job is None and bool(open_error_boxes()), timeout=10000)
    assert "download.pkl" in open_error_boxes()[-1].text()
    mm.shutdown()
    assert not mm.host.thread.isRunning()


def test_settings_persist(tmp_path, qtbot):
    s = Settings()
    s.set("device", "cpu")
    s.set("tier", "best")
    s.add_recent_file(str(tmp_path))
    s.add_prompt("a | b")
    s.sync()
    s2 = Settings()
    assert s2.device == "cpu" and s2.tier == "best" and s2.prompt_history() == ["a | b"]
    assert s2.recent_files() == [str(tmp_path.resolve())]


def test_worker_never_emits_result_after_cancel(qtbot):
    from anyface_desktop.worker import WorkerHost

    host = WorkerHost(None)
    got = []
    host.worker.result.connect(lambda j, v: got.append(("result", v)))
    host.worker.cancelled.connect(lambda j: got.append(("cancelled", j.kind)))
    started = threading.Event()

    def slow(_b, progress, cancel):
        started.set()
        time.sleep(0.2)  # ignores should_cancel on purpose: finishes, but its result is still dropped
        return 42

    job = host.submit("slow", slow)
    assert started.wait(5)
    host.cancel(job)
    with qtbot.waitSignal(host.worker.finished, timeout=5000):
        pass
    qtbot.wait(20)
    assert got == [("cancelled", "slow")]

    def boom(_b, progress, cancel):
        raise RuntimeError("boom")

    with qtbot.waitSignal(host.worker.failed, timeout=5000) as blocker:
        host.submit("boom", boom)
    assert isinstance(blocker.args[1], RuntimeError) and "boom" in blocker.args[2]
    host.shutdown()
    assert not host.thread.isRunning()


def test_drag_and_drop_recent_files_and_shortcuts(qtbot, photo):
    from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
    from PySide6.QtGui import QDropEvent

    win = make_window(qtbot)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(photo))])
    ev = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton,
                    Qt.KeyboardModifier.NoModifier)
    win.canvas.dropEvent(ev)
    qtbot.waitUntil(lambda: win.face is not None, timeout=5000)
    wait_idle(qtbot, win)
    # every photo type the app reads is taken by a drop and offered by Open, in either case; other files are not
    from anyface_desktop.canvas import PhotoCanvas
    from anyface_desktop.main_window import _image_filter

    def dropped(name):
        m = QMimeData()
        m.setUrls([QUrl.fromLocalFile(str(photo.parent / name))])
        return PhotoCanvas._dropped_path(m)

    assert dropped("a.GIF") and dropped("b.jpe") and dropped("c.TIFF") and not dropped("notes.txt")
    # several items: the first photo opens and the status bar says what was left; a photo without a suffix is a
    # photo (the reader goes by content); a folder opens Batch on it
    second = photo.parent / "second"  # no suffix
    second.write_bytes(photo.read_bytes())
    win._on_dropped([str(second), str(photo)])
    qtbot.waitUntil(lambda: win.photo is not None and Path(win.photo.path) == second, timeout=5000)
    wait_idle(qtbot, win)
    assert "2 items dropped: opened second" in win.statusBar().currentMessage()
    # the note is said for that photo only: a drop whose first photo has no face leaves nothing for a later one
    noface = photo.parent / "noface_x.png"
    noface.write_bytes(photo.read_bytes())
    win._on_dropped([str(noface), str(photo)])
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    for b in open_error_boxes():
        b.close()
    wait_idle(qtbot, win)
    open_ready(qtbot, win, photo)
    assert "dropped" not in win.statusBar().currentMessage()
    m = QMimeData()
    m.setUrls([QUrl.fromLocalFile(str(photo.parent))])
    assert PhotoCanvas._dropped_paths(m) == [str(photo.parent)]
    win._on_dropped([str(photo.parent)])
    assert win.batch_dialog is not None and win.batch_dialog.input.text() == str(photo.parent)
    win.batch_dialog.close()
    assert "*.gif" in _image_filter() and "*.JPG" in _image_filter() and _image_filter().endswith("All files (*)")
    win._fill_recent()
    assert [a.text() for a in win.recent_menu.actions()] == [photo.name, "noface_x.png", "second"]
    assert win.act_open.shortcut().toString() == "Ctrl+O"
    assert win.act_undo.shortcut().toString() == "Ctrl+Z"
    assert win.act_redo.shortcut().toString() == "Ctrl+Shift+Z"
    assert win.act_save.shortcut().toString() == "Ctrl+S"
    assert win.act_save_as.shortcut().toString() == "Ctrl+Shift+S"
    assert [a.shortcut().toString() for a in (win.act_after, win.act_before, win.act_wipe)] == ["A", "B", "W"]
    # zoom / pan / fit / before-after / aligned crop
    fit_scale = win.canvas.scale
    win.act_zoom_in.trigger()
    assert win.canvas.scale > fit_scale
    win.act_fit.trigger()
    assert win.canvas.scale == pytest.approx(fit_scale)
    win.captions.add_caption("smile")
    wait_idle(qtbot, win)
    for mode in ("before", "wipe", "after"):
        win.set_view_mode(mode)
        assert win.canvas.view_mode == mode
    win.canvas.set_wipe(0.3)
    assert win.canvas.wipe == pytest.approx(0.3)
    win.display_combo.setCurrentIndex(1)  # aligned crop
    assert win.canvas.after.width() == FakeEngine.resolution
    win.display_combo.setCurrentIndex(0)
    assert win.canvas.after.width() == 160
    close_window(qtbot, win)


def test_excepthook_shows_error_box(qtbot):
    import sys

    from anyface_desktop.app import install_excepthook

    old = sys.excepthook
    try:
        install_excepthook()
        try:
            raise RuntimeError("something unexpected")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        box = open_error_boxes()[-1]
        assert box.text() == "something unexpected" and "Traceback" in box.detailedText()
    finally:
        sys.excepthook = old


def test_apply_edit_stacks_and_undo_restores_source(qtbot, photo):
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    start = win.source
    win.captions.add_caption("smile")
    wait_idle(qtbot, win)
    edited = win.current_entry
    win.act_apply.trigger()
    assert win.source is not start and torch.equal(win.source.ws, edited.ws) and win.captions.captions() == []
    win.captions.add_caption("grey hair")
    wait_idle(qtbot, win)
    assert win.current_entry.source is win.source
    k = win.history.index
    win.jump_history(1)  # back to the first edit: its source is the photo again
    assert win.source is start
    win.jump_history(k)
    assert win.source.params.get("applied")
    close_window(qtbot, win)


def test_apply_and_export_right_after_a_slider_move_use_the_value_the_slider_shows(qtbot, photo, tmp_path):
    """A review found Ctrl+Enter right after a slider move applied the value before it (and a fast drag-and-release
    committed a step at a value the user only passed through); an export of an applied step had no captions."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    win.captions.set_strength(0.5)
    wait_idle(qtbot, win)
    assert win.current_entry.params["strength"] == 0.5
    win.captions.set_strength(0.9)  # the preview of 0.9 is not made yet
    win.act_apply.trigger()
    wait_idle(qtbot, win)
    applied = win.source
    assert applied.params.get("applied") and applied.params["applied_params"]["strength"] == 0.9
    assert "Applied" in win.history.current.label
    # the export of the applied step says what it applied
    win.settings.set("output_dir", str(tmp_path / "out"))
    win.export_to({"path": str(tmp_path / "out" / "applied.png"), "fmt": "png"})
    wait_idle(qtbot, win)
    tag = read_provenance(str(tmp_path / "out" / "applied.png"))
    assert tag["captions"] == ["smile"] and tag["strength"] == 0.9, tag
    # a drag that ends with a quick last move commits the last value only
    win.captions.add_caption("grey hair")
    wait_idle(qtbot, win)
    steps = len(win.history.entries)
    slider = win.captions.slider
    slider.setSliderDown(True)
    slider.setValue(90)
    wait_idle(qtbot, win)
    slider.setValue(30)
    slider.setSliderDown(False)  # released before the 0.30 preview was made
    wait_idle(qtbot, win)
    added = [e.params.get("strength") for e in win.history.entries[steps:]]
    assert added == [0.3], added
    # Export As suggests a name no image or latent of another format has taken
    (tmp_path / "out" / "portrait_anyface_001.npz").write_bytes(b"a latent of an earlier export")
    assert Path(win._suggest_path("webp")).name == "portrait_anyface_002.webp"
    close_window(qtbot, win)


def test_an_apply_waiting_for_its_preview_is_dropped_by_undo_a_face_switch_or_a_failed_preview(qtbot, photo,
                                                                                                 tmp_path):
    """A review: Apply pressed right after a slider move and then Undo applied the older step anyway (and lost the
    redo step); after a failed preview an older edit was applied."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    win.captions.set_strength(0.6)
    wait_idle(qtbot, win)
    steps = [e.label for e in win.history.entries]
    win.captions.set_strength(0.9)
    win.act_apply.trigger()  # waits for the 0.9 preview...
    win.undo()  # ...but the user goes back first
    wait_idle(qtbot, win)
    assert not any(e.params.get("applied") for e in win.history.entries)
    assert [e.label for e in win.history.entries][:len(steps)] == steps
    # a preview that fails drops the waiting Apply
    backend = win.host.backend
    win.captions.set_strength(0.3)
    orig = backend.edit
    backend.edit = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("preview failed"))
    try:
        win.act_apply.trigger()
        qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
        wait_idle(qtbot, win)
    finally:
        backend.edit = orig
        for box in open_error_boxes():
            box.close()
    assert not any(e.params.get("applied") for e in win.history.entries)
    close_window(qtbot, win)


def test_history_steps_of_long_caption_sets_differ_and_show_them_whole(qtbot, photo):
    """A review: after a fifth caption, steps 3 and 4 read the same ("“cheerful | blond curly hair…” @ 0.60")."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.set_captions(["cheerful", "blond curly hair", "green background", "looking up"])
    win.captions.set_strength(0.6)
    qtbot.waitUntil(lambda: win.history.index >= 1, timeout=5000)
    wait_idle(qtbot, win)
    win.captions.add_caption("dim light")
    qtbot.waitUntil(lambda: win.history.index >= 2, timeout=5000)
    wait_idle(qtbot, win)
    a, b = (e.label for e in win.history.entries[-2:])
    assert a != b and "(4 captions)" in a and "(5 captions)" in b
    item = win.history_panel.list.item(win.history.index)
    assert item.toolTip().splitlines()[-1] == "dim light"
    close_window(qtbot, win)


def test_after_a_tier_change_a_click_on_the_only_face_inverts_it_again(qtbot, photo, monkeypatch):
    from anyface_desktop.main_window import SettingsDialog

    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    assert not win.canvas.pick_single
    monkeypatch.setattr(SettingsDialog, "exec", lambda self: True)
    monkeypatch.setattr(SettingsDialog, "apply", lambda self: (win.settings.set("tier", "best"), {"tier": "best"})[1])
    win.open_settings()
    wait_idle(qtbot, win)
    assert win.canvas.pick_single and "click the face" in win.statusBar().currentMessage()
    close_window(qtbot, win)


def test_method_box_starts_with_the_packs_best_and_keeps_the_users_pick(qtbot):
    from anyface_desktop.captions import CaptionEditor

    ed = CaptionEditor()
    qtbot.addWidget(ed)
    ed.set_methods(["knn", "cmd", "cvae"])  # a pack whose measured-best method is KNN
    assert ed.method_key() == "knn"
    i = ed.method.findData("cvae")
    ed.method.setCurrentIndex(i)
    ed.method.activated.emit(i)  # what a click in the box sends
    ed.set_methods(["cmd", "cvae"])  # another pack: the user's pick stays
    assert ed.method_key() == "cvae"
    ed.set_methods(["knn"])  # not available there: the pack's first
    assert ed.method_key() == "knn"
    ed.set_num_ws(10, default_identity=1)
    assert ed.identity.text() == "1 layer"
    ed.identity.setValue(3)
    assert ed.identity.text() == "3 layers"


def test_no_face_photo_leaves_nothing_to_apply_or_export(qtbot, photo, tmp_path):
    """After a photo with no face, Apply/Refine/Export must not act on the previous photo's face."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("a smiling woman")
    wait_idle(qtbot, win)
    assert win.act_apply.isEnabled() and win.act_save.isEnabled()
    noface = tmp_path / "noface_coffee.png"
    noface.write_bytes(photo.read_bytes())
    win.open_photo(str(noface))
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    # a small photo (160x120) gets the size faces need, as a batch report gives it
    box = open_error_boxes()[-1]
    assert "photo is small (160x120 px)" in box.text() + box.informativeText()
    for b in open_error_boxes():
        b.close()
    wait_idle(qtbot, win)
    assert win.photo.path == str(noface) and win.face is None and win.current_entry is None
    assert not win.act_apply.isEnabled() and not win.act_save.isEnabled()
    assert win.export_to({"path": str(tmp_path / "x.png"), "fmt": "png"}) is None
    win.apply_edit()  # the shortcut still reaches the slot: nothing happens
    wait_idle(qtbot, win)
    assert win.captions.captions() == ["a smiling woman"] and not (tmp_path / "x.png").exists()
    close_window(qtbot, win)


def test_failed_open_gives_back_the_face_whose_inversion_it_stopped(qtbot, photo, tmp_path):
    win = make_window(qtbot, FakeBackend(invert_seconds=1.0))
    win.open_photo(str(photo))
    qtbot.waitUntil(lambda: any(j.kind == "invert" for j in win.host.active.values()), timeout=5000)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    win.open_photo(str(bad))  # stops the running inversion so it can open at once, then fails
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    for b in open_error_boxes():
        b.close()
    qtbot.waitUntil(lambda: win.face is not None, timeout=10000)  # inverted again, without the user asking
    assert win.photo.path == str(photo) and win.face.photo is win.photo
    assert str(bad) not in win.settings.recent_files()
    wait_idle(qtbot, win)
    close_window(qtbot, win)


def test_generate_while_editing_a_generated_face_keeps_showing_it(qtbot):
    win = make_window(qtbot)
    win.captions.add_caption("a bald man")
    wait_idle(qtbot, win)
    win.generate(2, 0)
    qtbot.waitUntil(lambda: len(win.gallery.results) == 2 and win.idle, timeout=10000)
    win.edit_generated(win.gallery.results[1])
    shown = win.canvas.after.toImage()
    win.generate(2, 7)
    qtbot.waitUntil(lambda: win.gallery.results and win.gallery.results[0].seed == 7 and win.idle, timeout=10000)
    assert win.source is not None and win.current_entry is not None
    assert win.canvas.after.toImage() == shown  # still the face being edited, which is what Export writes
    close_window(qtbot, win)


def test_undo_shows_the_method_and_identity_lock_of_the_step(qtbot, photo):
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("grey hair")
    wait_idle(qtbot, win)
    first = win.current_entry.params
    win.captions.identity.setValue(0 if first["identity_layers"] else 1)
    wait_idle(qtbot, win)
    assert win.current_entry.params["identity_layers"] != first["identity_layers"]
    assert "lock" in win.history_panel.list.item(win.history.index).text()
    win.undo()
    assert win.current_entry.params == first
    assert win.captions.identity_layers() == first["identity_layers"]
    assert win.captions.method_key() == first["method"]
    wait_idle(qtbot, win)
    win.jump_history(0)  # the photo as opened: the panel says strength 0 (it kept the last step's), captions stay
    wait_idle(qtbot, win)
    assert win.captions.strength() == 0.0 and win.captions.captions() == ["grey hair"]
    assert win.current_entry is win.history.entries[0] and win.history.index == 0
    close_window(qtbot, win)


def test_export_a_gallery_face_without_editing_it(qtbot, tmp_path, photo, monkeypatch):
    """A face made from text alone can be exported straight from the gallery (Ctrl+S and the gallery's Export…),
    tagged as generated, named after its seed; while a photo is edited, Ctrl+S still writes the photo's edit."""
    from PIL import Image

    win = make_window(qtbot)
    win.settings.set("output_dir", str(tmp_path / "out"))
    assert not win.act_save.isEnabled()  # nothing to export yet
    generate_faces(qtbot, win, 3, 40, "a woman with red hair")
    win.gallery.select(1)
    assert win.act_save.isEnabled() and win.gallery.export_btn.isEnabled() and win.source is None
    win.act_save.trigger()
    wait_idle(qtbot, win)
    written = Path(win.last_export.image_path)
    assert written.parent == tmp_path / "out" and written.name.startswith("anyface_seed41")
    with Image.open(written) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), win.gallery.results[1].image)
    meta = read_provenance(str(written))
    assert meta["kind"] == "generated" and meta["seed"] == 41 and meta["captions"] == ["a woman with red hair"]
    assert win.source is None and win.history.current is None  # exporting did not start an edit
    # Save all: every face, named after its seed; a second time never replaces the first files
    assert win.gallery.save_all_btn.isEnabled()
    win.export_gallery(str(tmp_path / "all"))
    wait_idle(qtbot, win)
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == ["anyface_seed40.npz", "anyface_seed40.png", "anyface_seed41.npz", "anyface_seed41.png",
                     "anyface_seed42.npz", "anyface_seed42.png"]
    first = (tmp_path / "all" / "anyface_seed40.png").read_bytes()
    win.export_gallery(str(tmp_path / "all"))
    wait_idle(qtbot, win)
    assert len(list((tmp_path / "all").glob("anyface_seed4?-1.png"))) == 3
    assert (tmp_path / "all" / "anyface_seed40.png").read_bytes() == first
    assert read_provenance(str(tmp_path / "all" / "anyface_seed42-1.png"))["seed"] == 42
    # the gallery's own button, through the Export dialog, for another face
    win.gallery.select(2)
    win.gallery.export_btn.click()
    dlg = win._export_dialog
    assert Path(dlg.path.text()).name.startswith("anyface_seed42")
    dlg.accept()
    wait_idle(qtbot, win)
    assert Path(win.last_export.image_path).name.startswith("anyface_seed42")
    # with a photo being edited, Export writes the photo's edit, and the gallery button still the gallery face
    open_ready(qtbot, win, photo)
    win.act_save.trigger()
    wait_idle(qtbot, win)
    assert Path(win.last_export.image_path).name.startswith("portrait_anyface")
    assert read_provenance(win.last_export.image_path)["kind"] == "edited"
    win.gallery.select(0)
    win.gallery.export_btn.click()
    win._export_dialog.accept()
    wait_idle(qtbot, win)
    assert Path(win.last_export.image_path).name.startswith("anyface_seed40")
    assert read_provenance(win.last_export.image_path)["kind"] == "generated"
    close_window(qtbot, win)


def test_export_dialog_asks_before_replacing_a_typed_existing_file(qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.dialogs import ExportDialog
    from anyface_desktop.settings import Settings

    settings = Settings()
    settings.set("output_dir", str(tmp_path))
    existing = tmp_path / "mine.png"
    existing.write_bytes(b"precious")
    asked = []
    answer = [QMessageBox.StandardButton.No]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer[0])
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: asked.append(a[2]))
    dlg = ExportDialog(settings, str(tmp_path / "anyface_face_001.png"), 64)
    qtbot.addWidget(dlg)
    dlg.open()
    dlg.path.setText("mine.png")  # a bare name goes in the output folder
    dlg.accept()
    assert dlg.isVisible() and "mine.png already exists" in asked[-1]  # "No": the dialog stays open
    answer[0] = QMessageBox.StandardButton.Yes
    dlg.accept()
    assert not dlg.isVisible() and dlg.options()["path"] == str(existing)
    dlg.open()
    dlg.path.setText(str(tmp_path))  # a folder is not a file name
    dlg.accept()
    assert dlg.isVisible() and "is a folder" in asked[-1]
    dlg.path.setText("  ")
    dlg.accept()
    assert dlg.isVisible() and "Choose a file name" in asked[-1]
    n = len(asked)
    dlg.path.setText(str(tmp_path / "new.png"))  # a new name needs no question
    dlg.accept()
    assert not dlg.isVisible() and len(asked) == n
    assert existing.read_bytes() == b"precious"


def test_export_dialog_follows_the_typed_extension_and_keeps_a_failed_name(qtbot, tmp_path, photo, monkeypatch):
    """A typed "typed.JPG" wrote a PNG named typed.png (only the format box counted); a name under a file was
    accepted and failed with "File exists (folder ...)"; after a failed export the dialog forgot the typed name."""
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.dialogs import ExportDialog

    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warned.append(a[2]))
    settings = Settings()
    settings.set("output_dir", str(tmp_path))
    dlg = ExportDialog(settings, str(tmp_path / "anyface_face_001.png"), 64)
    qtbot.addWidget(dlg)
    dlg.open()
    dlg.path.setText(str(tmp_path / "typed.JPG"))
    dlg.accept()
    assert not dlg.isVisible() and dlg.options()["fmt"] == "jpg" and dlg.options()["path"].endswith("typed.JPG")
    dlg.open()
    dlg.path.setText(str(tmp_path / "John.Smith v1.2"))  # a dot in a name is no file type
    dlg.fmt.setCurrentIndex(dlg.fmt.findData("webp"))
    assert dlg.path.text().endswith("John.Smith v1.2.webp")
    dlg.path.setText(str(tmp_path / "face.gif"))
    dlg.accept()
    assert dlg.isVisible() and "not GIF" in warned[-1]
    (tmp_path / "afile").write_bytes(b"x")
    dlg.path.setText(str(tmp_path / "afile" / "face.png"))
    dlg.accept()
    assert dlg.isVisible() and "is a file, not a folder" in warned[-1]
    dlg.reject()
    # a failed export (here: the folder turned into a file after the dialog) offers the typed name again
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    wait_idle(qtbot, win)
    target = tmp_path / "gone" / "mine.png"
    (tmp_path / "gone").write_bytes(b"now a file")
    win.export_to({"path": str(target), "fmt": "png"})
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    assert "is a file, not a folder" in open_error_boxes()[-1].text()
    for b in open_error_boxes():
        b.close()
    win.export_as()
    assert win._export_dialog.path.text() == str(target)
    win._export_dialog.reject()
    close_window(qtbot, win)


def test_two_quick_exports_in_a_row_never_share_a_name(qtbot, tmp_path, photo):
    """Ctrl+S twice before the first export has run: both names were picked on the GUI thread before either file
    existed, so the second replaced the first."""
    win = make_window(qtbot)
    win.settings.set("output_dir", str(tmp_path / "out"))
    open_ready(qtbot, win, photo)
    win.captions.add_caption("blue eyes")
    wait_idle(qtbot, win)
    win.quick_export()
    win.quick_export()
    wait_idle(qtbot, win)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["portrait_anyface_001-1.png",
                                                                       "portrait_anyface_001.png"]
    close_window(qtbot, win)


def test_settings_output_folder_is_absolute_and_a_file_is_refused(qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.settings import Settings, SettingsDialog

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warned.append(a[2]))
    settings = Settings()
    dlg = SettingsDialog(settings, ["cpu"])
    qtbot.addWidget(dlg)
    dlg.open()
    dlg.output.setText("relative/folder")  # a GUI app's working folder is arbitrary: under the home folder
    dlg.accept()
    assert not dlg.isVisible()
    dlg.apply()
    assert settings.output_dir == str(tmp_path / "home" / "relative" / "folder")
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        dlg.open()
        dlg.output.setText(str(bad))
        dlg.accept()
        assert dlg.isVisible() and "file" in warned[-1]
    dlg.output.setText("")  # empty: the default folder
    dlg.accept()
    dlg.apply()
    assert settings.output_dir and Path(settings.output_dir).is_absolute()


def _region(img, box):
    x0, y0, x1, y1 = map(int, box)
    return img[y0:y1, x0:x1]


def test_edits_of_several_faces_add_up_in_the_photo_and_the_export(qtbot, tmp_path, photo):
    """Editing face 2 used to throw face 1's edit away (the export held face 2's only)."""
    from PIL import Image

    two = tmp_path / "two_people.png"
    two.write_bytes(photo.read_bytes())
    original = np.asarray(Image.open(two).convert("RGB"))
    win = make_window(qtbot)
    win.settings.set("output_dir", str(tmp_path / "out"))
    open_ready(qtbot, win, two)
    boxes = win.photo.face_boxes()
    first = win.face.index
    win.captions.add_caption("blond hair")
    win.captions.set_strength(1.0)
    qtbot.waitUntil(lambda: win.history.index >= 1, timeout=5000)
    wait_idle(qtbot, win)
    edited_first = _region(win.current_entry.composed, boxes[first]).copy()
    assert not np.array_equal(edited_first, _region(original, boxes[first]))
    other = 1 - first
    win.pick_face(other)
    qtbot.waitUntil(lambda: win.face is not None and win.face.index == other, timeout=5000)
    wait_idle(qtbot, win)
    assert win.captions.strength() == 0.0 and win.history.index == 0  # captions kept, applied by the slider
    assert win.unexported_edit()  # face 1's edit lives in the photo now
    win.captions.set_strength(1.0)
    qtbot.waitUntil(lambda: win.history.index >= 1, timeout=5000)
    wait_idle(qtbot, win)
    composed = win.current_entry.composed
    assert np.array_equal(_region(composed, boxes[first]), edited_first)  # face 1's edit is still there
    assert not np.array_equal(_region(composed, boxes[other]), _region(original, boxes[other]))
    win.quick_export()
    wait_idle(qtbot, win)
    exported = np.asarray(Image.open(win.last_export.image_path).convert("RGB"))
    assert np.array_equal(exported, composed)
    assert np.array_equal(np.asarray(Image.open(two).convert("RGB")), original)  # the input is untouched
    # picking the face already being edited keeps its edits (it used to invert again and reset the history)
    n = win.history.index
    win.pick_face(other)
    wait_idle(qtbot, win)
    assert win.history.index == n and win.face.index == other
    edited_other = _region(win.current_entry.composed, boxes[other]).copy()
    # back to face 1: its own history comes back (a review found it inverted face 1's EDITED pixels again, so its
    # original could never be had back), on the photo with face 2's edit kept
    inverts = [0]
    win.host.worker.started.connect(lambda job: inverts.__setitem__(0, inverts[0] + (job.kind == "invert")))
    win.pick_face(first)
    wait_idle(qtbot, win)
    assert inverts[0] == 0 and win.face.index == first and win.history.index >= 1
    assert np.array_equal(_region(win.current_entry.composed, boxes[first]), edited_first)
    assert np.array_equal(_region(win.current_entry.composed, boxes[other]), edited_other)
    win.jump_history(0)  # face 1 as it was: the original pixels, face 2's edit still in the photo
    shown = win.current_entry.composed
    assert np.array_equal(_region(shown, boxes[first]), _region(original, boxes[first]))
    assert np.array_equal(_region(shown, boxes[other]), edited_other)
    win.jump_history(win.history.index + 1)  # and redo
    assert np.array_equal(_region(win.current_entry.composed, boxes[first]), edited_first)
    # face 2 again: its steps are there too
    win.pick_face(other)
    wait_idle(qtbot, win)
    assert inverts[0] == 0 and win.face.index == other and win.history.index == n
    assert np.array_equal(_region(win.current_entry.composed, boxes[first]), edited_first)
    # both faces undone to their start: the photo is as opened, so there is nothing to lose (it still asked)
    win.jump_history(0)
    assert win.unexported_edit()  # face 1's edit is still in the photo
    win.pick_face(first)
    wait_idle(qtbot, win)
    win.jump_history(0)
    assert np.array_equal(win.current_entry.composed, original) and not win.unexported_edit()
    close_window(qtbot, win)


def test_cancelled_face_switch_and_cancelled_open_give_back_the_face_being_edited(qtbot, tmp_path, photo):
    two = tmp_path / "two_people.png"
    two.write_bytes(photo.read_bytes())
    backend = FakeBackend()
    win = make_window(qtbot, backend)
    open_ready(qtbot, win, two)
    first, other = win.face.index, 1 - win.face.index
    backend.invert_seconds = 2.0
    win.pick_face(other)
    qtbot.waitUntil(lambda: win.cancel_btn.isVisible(), timeout=2000)
    win.cancel_btn.click()
    wait_idle(qtbot, win)
    assert win.face.index == first and win.face_combo.currentIndex() == first  # not "Face 2" while editing face 1
    assert win.canvas.selected_face == first and win.photo is win.face.photo
    close_window(qtbot, win)
    # open A; while A's face is inverting, open B and cancel that open: A gets its face back
    backend = FakeBackend(invert_seconds=1.0)
    win = make_window(qtbot, backend)
    win.open_photo(str(two))
    qtbot.waitUntil(lambda: any(j.kind == "invert" for j in win._jobs.values()), timeout=5000)
    backend.open_seconds = 1.0
    win.open_photo(str(photo))
    qtbot.waitUntil(lambda: win._progress_job is not None and win._progress_job.kind == "open", timeout=2000)
    win.cancel_long_job()
    backend.open_seconds = backend.invert_seconds = 0.0
    qtbot.waitUntil(lambda: win.face is not None, timeout=10000)
    wait_idle(qtbot, win)
    assert win.photo.path == str(two) and win.face.photo is win.photo and win.act_save.isEnabled()
    close_window(qtbot, win)


def test_export_right_after_releasing_the_slider_writes_what_the_canvas_ends_up_showing(qtbot, tmp_path, photo):
    """Ctrl+S while the last preview was still being made exported the previous strength, and that preview never
    entered the history; starting another job (Generate) during a preview lost its commit too."""
    engine = FakeEngine()
    win = make_window(qtbot, FakeBackend(engine))
    win.settings.set("output_dir", str(tmp_path / "out"))
    open_ready(qtbot, win, photo)
    win.captions.add_caption("red hair")
    win.captions.set_strength(0.3)
    wait_idle(qtbot, win)
    assert win.history.current.params["strength"] == pytest.approx(0.3)
    engine.delay = 0.4
    win.captions.set_strength(1.0)
    qtbot.waitUntil(lambda: win.scheduler.busy, timeout=2000)
    win.quick_export()
    wait_idle(qtbot, win)
    assert win.history.current.params["strength"] == pytest.approx(1.0)  # the 1.00 state is in the history
    meta = read_provenance(win.last_export.image_path)
    assert meta["strength"] == pytest.approx(1.0)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(win.last_export.image_path).convert("RGB")),
                          win.current_entry.composed)
    # a Generate started while a preview runs does not make that preview stale
    win.captions.set_strength(0.6)
    qtbot.waitUntil(lambda: win.scheduler.busy, timeout=2000)
    win.generate(2, 0)
    wait_idle(qtbot, win)
    assert win.history.current.params["strength"] == pytest.approx(0.6)
    close_window(qtbot, win)


def test_canvas_region_updates_show_the_same_pixels_as_full_updates(qtbot):
    """Previews on a big photo convert and re-scale only the pasted face's region; what is shown must be what a full
    conversion shows (scaled down, zoomed in, wipe)."""
    from anyface_desktop.canvas import PhotoCanvas

    rng = np.random.default_rng(0)
    before = (rng.random((1500, 2000, 3)) * 255).astype(np.uint8)
    before = np.ascontiguousarray(np.repeat(np.repeat(before[::10, ::10], 10, 0), 10, 1))  # smooth-ish content
    shots = {}
    for mode in ("full", "region"):
        c = PhotoCanvas()
        qtbot.addWidget(c)
        c.resize(640, 480)
        c.show()
        c.set_images(before, before, refit=True)
        c.grab()  # the scaled "before" is made at the first paint
        # an "after" that is the photo itself uses the photo's display-size copy (no second smooth scale)
        assert c._scaled["after"][0][0] == c.before.cacheKey()
        for k in range(3):  # consecutive previews
            after = before.copy()
            after[600:900, 800 + 50 * k:1100 + 50 * k] = (40 * k, 200, 90)
            c.set_images(before, after, region=(790 + 50 * k, 590, 1110 + 50 * k, 910) if mode == "region" else None)
            shots[(mode, k)] = c.grab().toImage()
            if mode == "region":  # the full-size "after" (a copy of the whole photo) is not made for a fitted view
                assert c._after is None
        c.set_view_mode("wipe")
        shots[(mode, "wipe")] = c.grab().toImage()
        c.set_view_mode("after")
        c.zoom_by(3.0)
        shots[(mode, "zoom")] = c.grab().toImage()
        c.zoom_by(4.0)  # past 1:1: drawn from the full-size pixmap, made now
        shots[(mode, "zoom 1:1")] = c.grab().toImage()

    def arr(img):
        img = img.convertToFormat(img.Format.Format_RGB888)
        return np.frombuffer(img.constBits(), np.uint8).reshape(img.height(), img.bytesPerLine())[:, : img.width() * 3]

    for key in (0, 1, 2, "wipe", "zoom", "zoom 1:1"):
        a, b = arr(shots[("full", key)]).astype(int), arr(shots[("region", key)]).astype(int)
        d = np.abs(a - b)  # the region is scaled on its own: at most sub-pixel shifts at sharp edges
        assert a.shape == b.shape and d.mean() < 0.5 and (d > 48).mean() < 0.005, (key, d.mean(), (d > 48).mean())


def test_closing_or_opening_over_an_unexported_edit_asks_first(qtbot, tmp_path, photo, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    win = make_window(qtbot)
    win.settings.set("ask_before_discard", True)
    win.settings.set("output_dir", str(tmp_path / "out"))
    asked = []
    answer = [QMessageBox.StandardButton.Cancel]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer[0])
    open_ready(qtbot, win, photo)
    assert not win.unexported_edit()  # the photo as opened is no edit
    win.captions.add_caption("red hair")
    wait_idle(qtbot, win)
    assert win.unexported_edit()
    other = tmp_path / "other.png"
    other.write_bytes(photo.read_bytes())
    win.open_photo(str(other))  # Cancel: the edit stays
    wait_idle(qtbot, win)
    assert "Open another photo" in asked[-1] and win.photo.path == str(photo) and win.current_entry is not None
    win.close()  # Cancel: the window stays open, the worker keeps running
    assert win.isVisible() and win.host.thread.isRunning() and "Close" in asked[-1]
    win.quick_export()
    wait_idle(qtbot, win)
    assert not win.unexported_edit()  # exported as it is: nothing to ask
    n = len(asked)
    win.captions.set_strength(0.4)
    wait_idle(qtbot, win)
    assert win.unexported_edit()
    answer[0] = QMessageBox.StandardButton.Discard
    close_window(qtbot, win)
    assert len(asked) == n + 1 and not win.isVisible()


def test_settings_show_the_device_the_app_runs_on(qtbot):
    from anyface_desktop.settings import Settings, SettingsDialog

    settings = Settings()
    settings.set("device", "auto")
    dlg = SettingsDialog(settings, ["cpu"], current_device="cpu")  # started with --device cpu
    qtbot.addWidget(dlg)
    assert dlg.device.currentData() == "cpu"
    assert "device" not in dlg.apply() and settings.device == "auto"  # untouched: nothing reloads or is stored
    dlg.device.setCurrentIndex(dlg.device.findData("auto"))
    assert dlg.apply()["device"] == "auto"



def test_several_faces_applied_edits_going_back_and_failed_switches(qtbot, tmp_path, photo):
    """An applied (or refined) edit is kept when switching faces too; going back to the face being edited while a
    switch runs stops the switch (it inverted the already-edited face again and applied the captions twice); a
    failed switch gives back the face being edited."""
    from PIL import Image

    two = tmp_path / "two_people.png"
    two.write_bytes(photo.read_bytes())
    original = np.asarray(Image.open(two).convert("RGB"))
    backend = FakeBackend()
    win = make_window(qtbot, backend)
    open_ready(qtbot, win, two)
    boxes = win.photo.face_boxes()
    first, other = win.face.index, 1 - win.face.index
    win.captions.add_caption("grey hair")
    win.captions.set_strength(1.0)
    qtbot.waitUntil(lambda: win.history.index >= 1, timeout=5000)
    wait_idle(qtbot, win)
    win.apply_edit()
    wait_idle(qtbot, win)
    applied = _region(win.current_entry.composed, boxes[first]).copy()
    assert not np.array_equal(applied, _region(original, boxes[first])) and win.unexported_edit()
    # going back while the switch runs: the switch stops, nothing is inverted or edited again
    backend.invert_seconds = 1.0
    shown = win.current_entry
    win.pick_face(other)
    qtbot.waitUntil(lambda: win._inverting(), timeout=2000)
    win.pick_face(first)
    wait_idle(qtbot, win)
    assert win.face.index == first and win.face_combo.currentIndex() == first and win.photo is win.face.photo
    assert win.current_entry is shown
    # the switch again, to the end: the applied edit is in the photo
    backend.invert_seconds = 0.0
    win.pick_face(other)
    qtbot.waitUntil(lambda: win.face.index == other, timeout=5000)
    wait_idle(qtbot, win)
    assert np.array_equal(_region(win.current_entry.composed, boxes[first]), applied)
    # a switch that fails: everything stays on face 2 (face 1 had been edited, so going back to it would resume its
    # history without an inversion: its session is dropped here to make the switch invert)
    def broken(*a, **k):
        raise RuntimeError("inversion failed")
    backend.prepare_face = broken
    win._face_sessions.pop(first)
    win.pick_face(first)
    qtbot.waitUntil(lambda: bool(open_error_boxes()), timeout=5000)
    wait_idle(qtbot, win)
    assert win.face.index == other and win.face_combo.currentIndex() == other and win.photo is win.face.photo
    for b in open_error_boxes():
        b.close()
    close_window(qtbot, win)


def test_an_edited_generated_face_is_named_and_tagged_after_its_own_seed(qtbot, tmp_path):
    win = make_window(qtbot)
    win.settings.set("output_dir", str(tmp_path / "out"))
    generate_faces(qtbot, win, 2, 7, "a smiling man")
    win.edit_generated(win.gallery.results[0])
    win.captions.add_caption("glasses")
    win.captions.set_strength(0.8)
    qtbot.waitUntil(lambda: win.history.index >= 1, timeout=5000)
    wait_idle(qtbot, win)
    win.quick_export()
    wait_idle(qtbot, win)
    assert Path(win.last_export.image_path).name.startswith("anyface_seed7_")  # not "seed0", the edit's own seed
    meta = read_provenance(win.last_export.image_path)
    assert meta["seed"] == 7 and meta["kind"] == "generated"
    close_window(qtbot, win)


def test_history_keeps_the_face_region_of_old_steps_and_never_drops_its_start(qtbot, photo):
    """Every step held a whole copy of the photo (12 MB per step for a 2K photo, 200 steps allowed); and past the
    limit the starting state was dropped, so exports lost the face's seed."""
    from anyface_desktop.history_panel import History, HistoryEntry

    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("red hair")
    shown = {}
    for k, st in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        win.captions.set_strength(st)
        qtbot.waitUntil(lambda: win.history.index == k + 1, timeout=5000)
        wait_idle(qtbot, win)
        shown[k + 1] = win.current_entry.composed.copy()
    entries = win.history.entries
    assert entries[-1].__dict__["_full"] is not None  # the current step stays whole
    for i in range(1, len(entries) - 1):
        assert entries[i].__dict__["_full"] is None and entries[i].__dict__["_patch"] is not None
        assert np.array_equal(entries[i].composed, shown[i])  # rebuilt exactly
    win.undo()  # an old step comes back whole, and is what Export writes
    wait_idle(qtbot, win)
    assert win.history.index == 4 and np.array_equal(win._export_image(win.current_entry), shown[4])
    close_window(qtbot, win)
    h = History(max_len=3)
    start = HistoryEntry("start", None, np.zeros((2, 2, 3), np.uint8))
    h.reset(start)
    for i in range(5):
        h.push(HistoryEntry(f"step {i}", None, np.zeros((2, 2, 3), np.uint8)))
    assert [e.label for e in h.entries] == ["start", "step 3", "step 4"]


def test_seeds_at_the_top_of_the_range_fit_the_seed_box(qtbot):
    win = make_window(qtbot)
    top = win.gallery.seed.maximum()
    generate_faces(qtbot, win, 4, top)
    assert [r.seed for r in win.gallery.results] == [top - 3, top - 2, top - 1, top]  # each can be typed in again
    assert win.gallery.seed.value() == 0  # the next press gives new faces (it repeated the same ones)
    close_window(qtbot, win)



def test_batch_dialog_includes_subfolders_when_asked(qtbot, tmp_path, photo):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "top.png").write_bytes(photo.read_bytes())
    (src / "sub" / "deep.png").write_bytes(photo.read_bytes())
    win = make_window(qtbot)
    win.open_batch()
    dlg = win.batch_dialog
    dlg.input.setText(str(src))
    dlg.output.setText(str(tmp_path / "out"))
    dlg.captions.setText("p | | q|r")
    assert dlg.batch_job().captions == ["p", "q", "r"]
    dlg.start()
    qtbot.waitUntil(lambda: dlg.report is not None, timeout=10000)
    assert dlg.report.total == 1  # the subfolder is not looked in unless asked
    dlg.recursive.setChecked(True)
    dlg.start()
    qtbot.waitUntil(lambda: dlg.job is None and dlg.report is not None and dlg.report.total == 2, timeout=10000)
    assert (tmp_path / "out" / "sub" / "deep_anyface.png").is_file()
    # a start refused for a mistake shows why in the log, not the last run's report as if this one had run
    from PySide6.QtWidgets import QMessageBox

    orig, QMessageBox.warning = QMessageBox.warning, staticmethod(lambda *a, **k: None)
    try:
        dlg.captions.setText("  ")
        dlg.start()
    finally:
        QMessageBox.warning = orig
    assert dlg.log.toPlainText().startswith("Not started: Type at least one caption")
    close_window(qtbot, win)


def test_batch_dialog_checks_like_the_runner_and_resets_its_bar(qtbot, tmp_path, photo, monkeypatch):
    """A review: the dialog counted hidden files as photos (a run of 0 photos started), refused an in-place run the
    CLI does, called an output that is a file "Cannot write ... File exists", and left the busy bar spinning after
    a failed start."""
    from PySide6.QtWidgets import QMessageBox

    monkeypatch.setattr(QMessageBox, "warning", staticmethod(lambda *a, **k: None))
    src = tmp_path / "in"
    src.mkdir()
    (src / ".hidden.png").write_bytes(photo.read_bytes())
    win = make_window(qtbot)
    win.open_batch()
    dlg = win.batch_dialog
    dlg.input.setText(str(src))
    dlg.captions.setText("smile")
    dlg.output.setText(str(src))  # in place: allowed, as in the CLI
    dlg.start()
    assert dlg.job is None and dlg.log.toPlainText().startswith("Not started: No photos (") and "GIF" in \
        dlg.log.toPlainText()
    (src / "me.png").write_bytes(photo.read_bytes())
    (tmp_path / "afile").write_bytes(b"x")
    dlg.output.setText(str(tmp_path / "afile"))
    dlg.start()
    assert "is a file, not a folder" in dlg.log.toPlainText()
    dlg.output.setText(str(src))
    dlg.start()
    qtbot.waitUntil(lambda: dlg.job is None and dlg.report is not None, timeout=10000)
    assert dlg.report.ok == 1 and (src / "me_anyface.png").is_file()
    # a failure before any photo: the bar does not keep spinning
    dlg.progress.setRange(0, 0)
    dlg.job_failed(RuntimeError("boom"), "")
    assert dlg.progress.maximum() == 1 and "Batch failed: boom" in dlg.log.toPlainText()
    close_window(qtbot, win)


def test_captions_typed_on_one_line_split_on_bars_everywhere(qtbot):
    from anyface_desktop.captions import split_captions

    assert split_captions("p | | q") == ["p", "q"] and split_captions("c|d") == ["c", "d"]
    win = make_window(qtbot)
    win.captions.entry.setText("p | | q")
    win.captions.add_from_entry()
    assert win.captions.captions() == ["p", "q"]  # it gave "p" and "| q"
    close_window(qtbot, win)


def test_enter_on_a_gallery_face_edits_it(qtbot):
    from PySide6.QtCore import Qt

    win = make_window(qtbot)
    generate_faces(qtbot, win, 2, 3)
    win.gallery.select(1)
    win.gallery.view.setFocus()
    qtbot.keyClick(win.gallery.view, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: win.source is not None, timeout=2000)
    assert win.source.params["seed"] == 4
    win.tabs.setCurrentWidget(win.gallery)  # editing switched to the History tab
    item = win.gallery.view.item(0)  # a double-click still edits
    win.gallery.select(0)
    rect = win.gallery.view.visualItemRect(item)
    qtbot.mouseClick(win.gallery.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.mouseDClick(win.gallery.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: win.source.params["seed"] == 3, timeout=2000)
    close_window(qtbot, win)


def test_model_manager_deletes_an_imported_generator(qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.model_manager import ModelManager
    from core import weights

    root = Path(__file__).resolve().parents[1]
    golden = next(p for p in (root / "tests" / "data" / "golden" / "rosinality_tiny.pt",
                              root.parent / "shared" / "golden" / "rosinality_tiny.pt") if p.is_file())
    src = tmp_path / "my_gan.pt"
    src.write_bytes(golden.read_bytes())
    mm = ModelManager("tiny")
    qtbot.addWidget(mm)
    mm.import_paths(None, [str(src)])
    qtbot.waitUntil(lambda: mm.job is None, timeout=20000)
    # the banner says what the imported generator's pack still needs (it cannot be used without a CLIP)
    assert "Imported:" in mm.banner.text() and "still needs" in mm.banner.text()
    mm.refresh()
    mm.packs.setCurrentRow([mm.packs.item(i).data(0x0100) for i in range(mm.packs.count())].index("custom-32"))
    row = next(r for r, s in enumerate(mm.statuses) if s.file.id.startswith("imported-"))
    copy = mm.statuses[row].path
    assert not mm.delete_btn.isEnabled()
    mm.table.selectRow(row)
    assert mm.delete_btn.isEnabled()
    mm.current_pack = "custom-32"  # a file of the pack in use is not deleted (the app then failed at every start)
    mm._update_delete()
    assert not mm.delete_btn.isEnabled() and "pack in use" in mm.delete_btn.toolTip()
    mm.current_pack = "tiny"
    mm._update_delete()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    mm.delete_btn.click()
    assert not copy.exists() and src.is_file()  # the import is gone, the user's own file stays
    assert not any(f.startswith("imported-") for f in weights.Manifest.load().packs["custom-32"].files)
    assert not mm.delete_btn.isEnabled()  # no other row is left picked for a second delete
    mm.shutdown()


def test_a_caption_longer_than_the_encoder_reads_is_pointed_out(qtbot):
    win = make_window(qtbot)
    assert win.captions.long_hint.isHidden()
    win.captions.add_caption("a woman " + "with very long flowing hair " * 10)
    assert not win.captions.long_hint.isHidden()
    # shown in the smallest window, it still leaves the gallery tab its room
    win.resize(win.minimumSizeHint())
    qtbot.wait(50)
    side = win.tabs.parentWidget()
    assert win.tabs.geometry().bottom() <= side.contentsRect().bottom()
    assert win.captions.long_hint.width() >= win.captions.long_hint.sizeHint().width()
    win.captions.set_captions(["a smiling man", "grey hair"])
    assert win.captions.long_hint.isHidden()
    close_window(qtbot, win)


def test_words_the_text_model_never_saw_show_what_the_dictionary_reads_them_as(qtbot):
    """The tiny pack's word map (core/wordmap.py, the bundled file): a caption with words outside the CLIP's training
    vocabulary shows what each is read as; plain captions show nothing; a pack without a map shows nothing."""
    from core.wordmap import WordMap

    engine = FakeEngine()
    engine.word_map = WordMap.load(Path(__file__).resolve().parent.parent / "resources/weights/tiny/wordmap.json.gz")
    win = make_window(qtbot, FakeBackend(engine))
    hint = win.captions.reading_hint
    win.captions.add_caption("a smiling woman with red hair")
    assert hint.isHidden()
    win.captions.add_caption("someone with a crimson mane")
    assert not hint.isHidden()
    words = dict(win.captions.readings())
    assert set(words) == {"crimson", "mane"} and words["mane"] == ("hair",)
    assert "mane → hair" in hint.text() and "crimson →" in hint.text() and "mane → hair" in hint.toolTip()
    win.captions.add_caption("a zxqv person")  # no dictionary word: said too
    assert "Not known: zxqv" in hint.text()
    # in the smallest window the hint leaves the gallery tab its room
    win.resize(win.minimumSizeHint())
    qtbot.wait(50)
    side = win.tabs.parentWidget()
    assert win.tabs.geometry().bottom() <= side.contentsRect().bottom()
    assert hint.width() >= hint.sizeHint().width()
    win.grab().save(str(SCREENSHOTS / "caption_reading_hint.png"))
    win.captions.set_captions(["a smiling man", "grey hair"])
    assert hint.isHidden()
    win.captions.set_captions(["someone with a crimson mane"])
    assert not hint.isHidden()
    win.captions.set_word_map(None)  # what a pack without a map (an official CLIP) shows
    assert hint.isHidden() and win.captions.readings() == []
    # the Batch dialog's captions say it too
    win.open_batch()
    dlg = win.batch_dialog
    dlg.captions.setText("a person with red hair | someone with a crimson mane")
    assert not dlg.reading_hint.isHidden() and "mane → hair" in dlg.reading_hint.text()
    dlg.captions.setText("a person with red hair")
    assert dlg.reading_hint.isHidden()
    close_window(qtbot, win)


def test_at_its_smallest_the_window_squeezes_no_gallery_button(qtbot):
    """The side panel had a fixed minimum width of 340 px, below what a row of four gallery buttons needs: at the
    smallest window size the buttons were squeezed over each other and over the list of faces."""
    win = make_window(qtbot)
    win.resize(win.minimumSizeHint())
    qtbot.wait(50)
    g = win.gallery
    buttons = (g.more_btn, g.edit_btn, g.export_btn, g.save_all_btn)
    rects = [b.geometry().translated(b.parentWidget().mapTo(g, b.pos()) - b.pos()) for b in buttons]
    for b, r in zip(buttons, rects):
        assert r.width() >= b.minimumSizeHint().width(), b.text()
        assert not r.intersects(g.view.geometry()), b.text()
    assert not any(r.intersects(q) for i, r in enumerate(rects) for q in rects[i + 1:])
    side = win.tabs.parentWidget()  # the gallery tab is not cut off at the bottom either
    assert win.tabs.geometry().bottom() <= side.contentsRect().bottom()
    close_window(qtbot, win)


def test_at_1280_px_with_the_face_picker_every_toolbar_button_shows(qtbot):
    """With the face picker shown (a photo with several faces), Settings moved behind the toolbar's "»" at 1280 px.
    Undo and Redo are arrows only now; their tooltips still say what they do."""
    win = make_window(qtbot)
    win.resize(1280, 800)
    win.face_combo.addItems([f"Face {i} of 12" for i in range(1, 13)])
    win.face_combo_action.setVisible(True)
    qtbot.wait(50)
    from PySide6.QtWidgets import QToolBar

    tb = win.findChild(QToolBar, "main_toolbar")
    hidden = [a.iconText() for a in tb.actions()
              if not a.isSeparator() and a.isVisible() and not tb.widgetForAction(a).isVisible()]
    assert hidden == [], hidden
    assert "Undo" in win.act_undo.toolTip() and "Redo" in win.act_redo.toolTip()
    close_window(qtbot, win)


def test_junk_in_the_settings_file_falls_back_to_defaults(qtbot, photo, tmp_path):
    """Values from another computer, an older version or a hand edit: an unknown pack or device is replaced (and
    said), a junk detector/tier is the default, and export values are kept within what the Export dialog allows
    (a stored size of -100 wrote a 1x1 image on Ctrl+S; quality 500 or format gif failed every time)."""
    from PIL import Image

    from anyface_desktop.settings import SettingsDialog

    s = Settings()
    for k, v in {"pack": "no_such_pack", "device": "quantum", "detector": "bogus", "tier": "ultra",
                 "export/size": -100, "export/quality": 500, "export/format": "gif",
                 "output_dir": str(tmp_path / "out")}.items():
        s.set(k, v)
    s.sync()
    from anyface_desktop.main_window import MainWindow

    win = MainWindow(backend=FakeBackend())  # no --pack / --device: the stored ones count
    qtbot.addWidget(win)
    win.show()
    qtbot.waitUntil(lambda: win.engine_info is not None, timeout=5000)
    assert (win.pack_id, win.device_pref) == ("tiny", "auto")
    assert (win.settings.detector, win.settings.tier) == ("auto", "fast")
    msg = win.statusBar().currentMessage()
    assert "no_such_pack" in msg and "quantum" in msg
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    wait_idle(qtbot, win)
    win.quick_export()
    wait_idle(qtbot, win)
    assert not open_error_boxes()
    out = Path(win.last_export.image_path)
    assert out.suffix == ".png"
    with Image.open(out) as im, Image.open(photo) as src:
        assert im.size == src.size
    # Settings shows the device in use (automatic); OK stores it in place of the one this computer lacks
    dlg = SettingsDialog(win.settings, ["cpu"], win, current_device=win.device_pref)
    assert dlg.device.currentData() == "auto"
    assert "device" not in dlg.apply() and win.settings.device == "auto"
    close_window(qtbot, win)


def test_a_cancelled_first_inversion_can_be_started_again_by_clicking_the_face(qtbot, photo):
    """Cancel during the inversion of a photo's only face left the photo without a way back (clicks picked faces
    only when there were two or more): the user had to open the file again."""
    from PySide6.QtCore import QPointF, Qt
    from PySide6.QtGui import QMouseEvent

    backend = FakeBackend()
    backend.invert_seconds = 2.0
    win = make_window(qtbot, backend)
    win.open_photo(str(photo))
    qtbot.waitUntil(lambda: win.photo is not None and win.cancel_btn.isVisible(), timeout=5000)
    win.cancel_btn.click()
    wait_idle(qtbot, win)
    assert win.face is None and len(win.photo.faces) == 1
    assert "click the face" in win.statusBar().currentMessage()
    backend.invert_seconds = 0.0
    x0, y0, x1, y1 = win.photo.face_boxes()[0]
    pos = QPointF((x0 + x1) / 2, (y0 + y1) / 2) * win.canvas.scale + win.canvas.offset
    ev = QMouseEvent(QMouseEvent.Type.MouseButtonPress, pos, pos, Qt.MouseButton.LeftButton,
                     Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    win.canvas.mousePressEvent(ev)
    qtbot.waitUntil(lambda: win.face is not None, timeout=5000)
    wait_idle(qtbot, win)
    assert win.face.index == 0 and not win.canvas.pick_single
    close_window(qtbot, win)


def test_settings_that_cannot_be_saved_are_said(qtbot, tmp_path, monkeypatch):
    """A read-only settings file was silently not written: the choices were gone at the next start."""
    import os

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.settings import SettingsDialog

    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warned.append(a[2]))
    folder = tmp_path / "ro"
    folder.mkdir()
    ini = folder / "settings.ini"
    ini.write_text("[General]\ntier=fast\n")
    settings = Settings(QSettings(str(ini), QSettings.Format.IniFormat))
    dlg = SettingsDialog(settings, ["cpu"])
    qtbot.addWidget(dlg)
    dlg.tier.setCurrentIndex(dlg.tier.findData("best"))
    os.chmod(ini, 0o444)
    os.chmod(folder, 0o555)
    try:
        if os.access(ini, os.W_OK):  # root writes anyway: a file system that refuses is simulated
            monkeypatch.setattr(QSettings, "status", lambda self: QSettings.Status.AccessError)
        dlg.apply()
    finally:
        os.chmod(folder, 0o755)
        os.chmod(ini, 0o644)
    assert warned and "could not be saved" in warned[-1] and str(ini) in warned[-1]
    assert settings.tier == "best"  # still in effect for this session


def test_switching_packs_closes_the_old_packs_work_and_reopens_the_photo(qtbot, photo):
    """Faces and edits live in one pack's W space: after a switch the old face and history stayed, and Refine or
    the slider failed with shape errors while exports named the new pack. Generate stayed enabled while loading."""
    win = make_window(qtbot)
    open_ready(qtbot, win, photo)
    win.captions.add_caption("smile")
    wait_idle(qtbot, win)
    generate_faces(qtbot, win, 2, 0)
    old_face = win.face
    win.use_pack("other")
    assert win.engine_info is None and not win.act_generate.isEnabled() and not win.gallery.generate_btn.isEnabled()
    assert win.gallery.results == [] and win.current_entry is None
    qtbot.waitUntil(lambda: win.face is not None and win.face is not old_face, timeout=5000)
    wait_idle(qtbot, win)
    assert win.pack_id == "other" and Path(win.photo.path) == photo and win.act_generate.isEnabled()
    # an edited generated face starts with the slider at 0 (it said 0.60 over the unedited face), as after Refine
    generate_faces(qtbot, win, 2, 5)
    win.edit_generated(win.gallery.results[0], ask=False)
    assert win.captions.strength() == 0.0
    close_window(qtbot, win)


def test_models_shows_and_deletes_a_bank_built_here(qtbot, monkeypatch):
    """A bank built in the app replaced the pack's own (also the tiny pack's 20,000 faces) with no sign of it in
    Models and no way back but deleting the file by hand."""
    from PySide6.QtWidgets import QMessageBox

    from anyface_desktop.model_manager import ModelManager
    from core.engine import bank_cache_path

    path = bank_cache_path("tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 4096)
    mm = ModelManager("tiny")
    qtbot.addWidget(mm)
    mm.refresh()
    assert not mm.bank_note.isHidden() and "built on this machine" in mm.bank_note.text()
    assert mm.bank_delete_btn.isEnabled()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    with qtbot.waitSignal(mm.bankDeleted, timeout=2000) as sig:
        mm.bank_delete_btn.click()
    assert sig.args == ["tiny"] and not path.exists() and mm.bank_note.isHidden()
    mm.shutdown()
