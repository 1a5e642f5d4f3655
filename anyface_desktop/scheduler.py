"""Latest-request-wins scheduling for live previews (Qt-free, unit-tested on its own).

The strength slider and the caption editor ask for a new preview on every change. Each request gets
an increasing stamp. At most one job is in flight and at most one waits: a new request replaces the
waiting one, so dragging never queues work behind itself. A finished job's result is shown only if it
is newer than what is on screen and newer than the last ``invalidate()`` (a new photo, a new face, an
undo...) — older results are stale and dropped (stylegan3's visualizer; krita-ai-diffusion's
LiveScheduler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    stamp: int
    params: Any = field(compare=False)


class LiveScheduler:
    """Decides which preview request runs next and which results may be shown.

    Usage (the GUI calls these on its own thread; nothing here blocks)::

        job = sched.request(params)       # -> Request to start now, or None (it waits)
        ...worker finishes job.stamp...
        show, nxt = sched.finished(stamp)  # show the result? and the next Request to start (or None)
    """

    def __init__(self) -> None:
        self._stamp = 0
        self._floor = 0  # results with a stamp <= floor are stale (set by invalidate)
        self._shown = 0  # newest stamp whose result was accepted
        self._last_request = 0  # newest preview request (one-off jobs take stamps too, but are no previews)
        self.in_flight: Request | None = None
        self.pending: Request | None = None
        self.dropped = 0  # requests replaced before they ran (for tests and the status bar)

    @property
    def latest_stamp(self) -> int:
        return self._stamp

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or self.pending is not None

    def next_stamp(self) -> int:
        """A fresh stamp for one-off jobs that share the stamp sequence (generate, open...)."""
        self._stamp += 1
        return self._stamp

    def request(self, params: Any) -> Request | None:
        """Register a new request. Returns it if it should start now, else None (it waits, replacing any
        request that was waiting)."""
        req = Request(self.next_stamp(), params)
        self._last_request = req.stamp
        if self.in_flight is None:
            self.in_flight = req
            return req
        if self.pending is not None:
            self.dropped += 1
        self.pending = req
        return None

    def finished(self, stamp: int, ok: bool = True) -> tuple[bool, Request | None]:
        """The job ``stamp`` ended (result, failure or cancel). Returns (accept its result?, next request to
        start). A result is accepted only when ``ok`` and it is newer than anything shown and than the last
        invalidate()."""
        accept = ok and stamp > self._floor and stamp > self._shown
        if accept:
            self._shown = stamp
        nxt = None
        if self.in_flight is not None and self.in_flight.stamp == stamp:
            self.in_flight = None
            if self.pending is not None:
                nxt, self.pending = self.pending, None
                self.in_flight = nxt
        return accept, nxt

    def is_current(self, stamp: int) -> bool:
        """True when ``stamp`` is the newest preview request and nothing newer waits (a one-off job started
        meanwhile, an export or a generate, does not make it stale)."""
        return stamp == self._last_request and stamp > self._floor

    def invalidate(self) -> None:
        """Everything requested so far is stale (the thing being previewed changed). The waiting request
        is dropped; the job in flight still runs to its end but its result will not be shown."""
        self._floor = self._stamp
        if self.pending is not None:
            self.dropped += 1
            self.pending = None

    def reset(self) -> None:
        """Forget the job in flight (the worker was restarted or cancelled everything)."""
        self.invalidate()
        self.in_flight = None
