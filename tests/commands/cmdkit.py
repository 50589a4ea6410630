"""Helpers for library-level command tests: a daemon, a session, and ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

import qmpgraph.commands  # noqa: F401 (registers the command handlers)
from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.protocol.qjson import RawJSON
from qmpgraph.protocol.session import QMPSession


def plain(value: Any) -> Any:
    """``value`` with cached ``RawJSON`` parts replaced by the values they hold."""
    if isinstance(value, RawJSON):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class Client:
    """A daemon with one negotiated session; ``run`` returns the reply dict."""

    def __init__(self, *, log: Path | None = None, seed: int = 1) -> None:
        self.lines: list[dict[str, Any]] = []
        target: Any = log if log is not None else self._capture
        self.daemon = Daemon(name_seed=seed, transaction_log=target)
        self.session = QMPSession(self.daemon.greeting())
        self.session.accept_capabilities([])
        # strict: an internal exception fails the test instead of becoming a reply.
        self.dispatcher = Dispatcher(self.daemon, strict=True)

    def _capture(self, line: bytes) -> None:
        self.lines.append(orjson.loads(line))

    @property
    def records(self) -> list[dict[str, Any]]:
        """Logged transaction records (the header excluded)."""
        return [r for r in self.lines if "seq" in r]

    def run(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Dispatch one command; the graph invariants must hold afterwards."""
        req: dict[str, Any] = {"execute": command}
        if arguments is not None:
            req["arguments"] = arguments
        reply = self.dispatcher.dispatch(self.session, req)
        assert reply is not None
        assert check_invariants(self.daemon.graph) == []
        return reply

    def ok(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command that must succeed; its return value."""
        reply = self.run(command, arguments)
        assert "return" in reply, reply
        return plain(reply["return"])

    def fails(self, command: str, arguments: dict[str, Any], desc: str) -> None:
        """Run a command that must fail with ``desc`` and leave the graph unchanged."""
        before = graph_digest(self.daemon.graph)
        reply = self.run(command, arguments)
        assert reply.get("error") == {"class": "GenericError", "desc": desc}, reply
        assert graph_digest(self.daemon.graph) == before

    def names(self) -> list[str]:
        """Node names, newest first."""
        return [n.node_name for n in self.daemon.graph.named_nodes_newest_first()]
