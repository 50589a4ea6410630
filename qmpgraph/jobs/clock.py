"""Where event timestamps and job timers take their time from.

``WallClock`` (the default) is what QEMU uses: events carry the wall-clock
time, rate limits and job sleeps run on the monotonic clock.

``VirtualClock`` (``qmpgraph daemon --clock virtual``) makes runs
reproducible.  Its semantics:

* Time starts at 0 ns and only moves forward when something makes it move.
* Each event takes its timestamp from the clock, then moves the clock on by
  ``EVENT_STEP_NS`` (1 microsecond), so events are strictly ordered in time.
* A job that sleeps (a speed limit) sleeps in virtual time: when every job
  has stopped and one of them waits for a timer, the job runner moves the
  clock straight to the earliest timer (``advance_to``).  Nothing ever waits
  for real time.

Together with the job runner's fixed order (``qmpgraph.jobs.core``), two
runs of the same script produce byte-identical transcripts.

Synchronous and trio-free (the daemon imports it).
"""

from __future__ import annotations

import time
from typing import Protocol

EVENT_STEP_NS = 1000


class Clock(Protocol):
    """A time source for events and job timers."""

    virtual: bool

    def now_ns(self) -> int:
        """The time job timers and rate limits run on, in nanoseconds."""
        ...

    def event_time(self) -> tuple[int, int]:
        """(seconds, microseconds) for the next event's timestamp."""
        ...


class WallClock:
    """Real time: wall clock for events, monotonic clock for timers."""

    virtual = False

    def now_ns(self) -> int:
        """``time.monotonic_ns()``."""
        return time.monotonic_ns()

    def event_time(self) -> tuple[int, int]:
        """The wall-clock time now."""
        now = time.time_ns()
        return now // 1_000_000_000, now // 1000 % 1_000_000


class VirtualClock:
    """Deterministic time: moved by events (one step each) and by job timers."""

    virtual = True

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns

    def now_ns(self) -> int:
        """The current virtual time."""
        return self._now

    def event_time(self) -> tuple[int, int]:
        """The current virtual time; the clock then moves on by one step."""
        now = self._now
        self._now += EVENT_STEP_NS
        return now // 1_000_000_000, now // 1000 % 1_000_000

    def advance_to(self, when_ns: int) -> None:
        """Move the clock forward to ``when_ns`` (never backward)."""
        self._now = max(self._now, when_ns)


def make_clock(name: str) -> WallClock | VirtualClock:
    """The clock called ``name`` on the command line (``realtime`` or ``virtual``)."""
    if name == "virtual":
        return VirtualClock()
    if name in ("realtime", "wall"):
        return WallClock()
    raise ValueError(f"unknown clock '{name}'")
