"""The Qt-free latest-request-wins scheduler behind the live preview."""

from __future__ import annotations

import subprocess
import sys

from anyface_desktop.scheduler import LiveScheduler


def test_first_request_starts_at_once_and_stamps_increase():
    s = LiveScheduler()
    a = s.request({"strength": 0.1})
    assert a is not None and a.stamp == 1 and s.in_flight == a and s.pending is None
    assert s.request({"strength": 0.2}) is None
    assert s.pending.stamp == 2 and s.latest_stamp == 2


def test_dragging_never_queues_more_than_one_pending():
    s = LiveScheduler()
    first = s.request(0)
    for v in range(1, 50):  # a drag: 49 more requests while the first one runs
        assert s.request(v) is None
    assert s.pending.params == 49 and s.dropped == 48
    accept, nxt = s.finished(first.stamp)
    assert accept  # newer than anything shown: a progressive preview while dragging
    assert nxt is not None and nxt.params == 49 and s.in_flight == nxt and s.pending is None
    accept, nxt = s.finished(nxt.stamp)
    assert accept and nxt is None and not s.busy


def test_stale_results_are_dropped():
    s = LiveScheduler()
    a = s.request("a")
    s.request("b")
    accept, b = s.finished(a.stamp)
    assert accept
    # an older stamp arriving late (e.g. a one-off job) is never shown over a newer one
    accept, _ = s.finished(b.stamp)
    assert accept
    assert s.finished(a.stamp) == (False, None)


def test_invalidate_drops_in_flight_result_and_pending_request():
    s = LiveScheduler()
    a = s.request("old photo")
    s.request("old photo, more")
    s.invalidate()  # a new photo was opened
    assert s.pending is None
    accept, nxt = s.finished(a.stamp)
    assert not accept and nxt is None
    c = s.request("new photo")
    assert c is not None and s.finished(c.stamp) == (True, None)


def test_failed_or_cancelled_job_is_not_shown_but_starts_the_next():
    s = LiveScheduler()
    a = s.request(1)
    s.request(2)
    accept, nxt = s.finished(a.stamp, ok=False)
    assert not accept and nxt is not None and nxt.params == 2
    assert s.finished(nxt.stamp) == (True, None)


def test_reset_forgets_in_flight():
    s = LiveScheduler()
    s.request(1)
    s.request(2)
    s.reset()
    assert not s.busy
    r = s.request(3)
    assert r is not None and r.stamp == 3


def test_scheduler_module_is_qt_free():
    code = "import anyface_desktop.scheduler, sys; print([m for m in sys.modules if m.startswith('PySide6')])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_one_off_jobs_do_not_make_the_last_preview_stale():
    from anyface_desktop.scheduler import LiveScheduler

    s = LiveScheduler()
    req = s.request("strength 1.0")
    s.next_stamp()  # an export or a generate started while the preview runs
    assert s.is_current(req.stamp)
    assert s.finished(req.stamp) == (True, None)
    newer = s.request("strength 0.5")
    assert not s.is_current(req.stamp) and s.is_current(newer.stamp)
    s.invalidate()  # a new photo: nothing requested before is current
    assert not s.is_current(newer.stamp)
