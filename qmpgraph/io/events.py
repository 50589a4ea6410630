"""Events the data path sends to the QMP monitor (QUORUM_REPORT_BAD, ...).

Nodes do not know their daemon; a daemon registers its ``emit_event`` for
its graph here, and drivers that emit events from I/O keep a reference to
the graph they were opened in.  Synchronous and trio-free, so the daemon
may import it.

What does not live here: the events' contents (the hooks that send them).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from qmpgraph.graph.graph import BlockGraph

Emit = Callable[[str, dict[str, Any]], None]
_SINKS: weakref.WeakKeyDictionary[BlockGraph, Emit] = weakref.WeakKeyDictionary()


def register_event_sink(graph: BlockGraph, emit: Emit) -> None:
    """Send events raised by I/O on ``graph``'s nodes to ``emit``."""
    _SINKS[graph] = emit


def emit_io_event(graph: BlockGraph | None, name: str, data: dict[str, Any]) -> None:
    """Emit ``name`` for a node of ``graph`` (dropped when no daemon listens)."""
    emit = _SINKS.get(graph) if graph is not None else None
    if emit is not None:
        emit(name, data)
