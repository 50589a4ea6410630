"""The daemon's state shared by every monitor and session: schema, block graph,
transaction log, events, quit.

``Daemon.graph_transaction(command, arguments)`` is how a command changes the
block graph: one engine ``Transaction`` per command, committed when the block
succeeds and aborted when it raises; with a transaction log configured
(``Daemon(transaction_log=path)``) each one is appended to the log with its
actions, outcome and the graph digest afterwards.  Without a log no digest is
computed, so a command's cost does not grow with the graph.

Event timestamps come from ``Daemon.clock`` (``qmpgraph.jobs.clock``: the
wall clock, or a virtual clock for reproducible runs).  ``job_runner`` holds
the daemon's ``qmpgraph.jobs.core.JobRunner`` once a job exists; the monitor
calls ``before_reply``/``after_reply`` around each reply so that jobs a
command entered run as they would in QEMU's main loop.

What does not live here: sockets and tasks (``qmpgraph.server``), the
command-line parsing (``qmpgraph.cmdline``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qmpgraph import QEMU_VERSION, __version__
from qmpgraph.errors import QMPError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.io.events import register_event_sink
from qmpgraph.jobs.clock import Clock, WallClock
from qmpgraph.schema import Schema
from qmpgraph.schema import load as load_schema
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.log import Sink, TransactionLog

EventSink = Callable[[dict[str, Any]], None]


class Daemon:
    """One qmpgraph daemon: what its commands act on."""

    def __init__(
        self,
        schema: Schema | None = None,
        *,
        name_seed: int | None = None,
        transaction_log: str | Path | Sink | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.schema = schema if schema is not None else load_schema()
        # A seed is always chosen, so that a log can record it for replay.
        self.name_seed = name_seed if name_seed is not None else secrets.randbits(32)
        self.graph = BlockGraph(name_seed=self.name_seed)
        # I/O on the graph's nodes may raise events (quorum's).
        register_event_sink(self.graph, self.emit_event)
        self.transaction_log: TransactionLog | None = None
        if transaction_log is not None:
            self.transaction_log = TransactionLog(transaction_log, name_seed=self.name_seed)
        self.package = f"qmpgraph {__version__}"
        self.quit_requested = False
        self._quit_callbacks: list[Callable[[], None]] = []
        self._event_sinks: list[EventSink] = []
        self.clock: Clock = clock if clock is not None else WallClock()
        # A qmpgraph.jobs.core.JobRunner, set by job_runner() on first use
        # (typed Any: the daemon must not import the trio side).
        self.job_runner: Any = None

    @contextmanager
    def graph_transaction(self, command: str, arguments: dict[str, Any]) -> Iterator[Transaction]:
        """One engine transaction for one QMP command, logged when a log is configured.

        Commits when the block succeeds; aborts and re-raises when it raises.
        Errors other than ``QMPError`` are logged with the class ``internal``.
        """
        tran = Transaction()
        log = self.transaction_log
        try:
            yield tran
        except BaseException as exc:
            actions = tran.log() if log is not None else []
            tran.abort()
            if log is not None:
                if isinstance(exc, QMPError):
                    error = exc.to_wire()
                else:
                    error = {"class": "internal", "desc": f"{type(exc).__name__}: {exc}"}
                log.record(command, arguments, actions, graph_digest(self.graph), error)
            raise
        actions = tran.log() if log is not None else []
        tran.commit()
        if log is not None:
            log.record(command, arguments, actions, graph_digest(self.graph))

    async def before_reply(self) -> None:
        """Let the jobs a command entered run up to their first I/O (the reply waits)."""
        if self.job_runner is not None:
            await self.job_runner.quiesce()

    async def after_reply(self) -> None:
        """The reply is queued: held jobs go on (a virtual clock runs them to idle)."""
        if self.job_runner is not None:
            await self.job_runner.after_reply()

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
        """Stop the daemon now: runs every ``on_stop`` callback, closes the log."""
        for cb in self._quit_callbacks:
            cb()
        if self.transaction_log is not None:
            self.transaction_log.close()

    def subscribe(self, sink: EventSink) -> Callable[[], None]:
        """Deliver every event to ``sink``; returns the unsubscribe function."""
        self._event_sinks.append(sink)
        return lambda: self._event_sinks.remove(sink)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every subscribed session, timestamped by the clock."""
        if self.job_runner is not None and self.job_runner.defer_event(name, data):
            return  # after a drain the jobs must first run through (jobs.runner)
        seconds, microseconds = self.clock.event_time()
        event: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        for sink in list(self._event_sinks):
            sink(event)
