"""The daemon's state shared by every monitor and session: schema, events, quit.

What does not live here: sockets and tasks (``qmpgraph.server``), the
command-line parsing (``qmpgraph.cmdline``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qmpgraph import QEMU_VERSION, __version__
from qmpgraph.schema import Schema
from qmpgraph.schema import load as load_schema

EventSink = Callable[[dict[str, Any]], None]


class Daemon:
    """One qmpgraph daemon: what its commands act on."""

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema if schema is not None else load_schema()
        self.package = f"qmpgraph {__version__}"
        self.quit_requested = False
        self._quit_callbacks: list[Callable[[], None]] = []
        self._event_sinks: list[EventSink] = []

    def version_info(self) -> dict[str, Any]:
        """The ``query-version`` reply (and the greeting's ``version``)."""
        return {"qemu": dict(QEMU_VERSION), "package": self.package}

    def greeting(self) -> dict[str, Any]:
        """The QMP greeting sent to each new client."""
        return {"QMP": {"version": self.version_info(), "capabilities": ["oob"]}}

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the daemon is to stop (``quit`` or a signal)."""
        self._quit_callbacks.append(callback)

    def request_quit(self) -> None:
        """Mark that a client asked to quit; the server stops once the reply is out."""
        self.quit_requested = True

    def stop(self) -> None:
        """Stop the daemon now: runs every ``on_stop`` callback."""
        for cb in self._quit_callbacks:
            cb()

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Deliver every event to ``sink``; returns the unsubscribe function."""
        self._event_sinks.append(sink)
        return lambda: self._event_sinks.remove(sink)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every subscribed session, timestamped now."""
        now = time.time()
        seconds = int(now)
        event: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        for sink in list(self._event_sinks):
            sink(event)
