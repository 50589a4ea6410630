"""A canonical digest of a whole block graph.

``graph_digest(graph)`` is a sha256 hex string over a canonical JSON encoding
of: every named node in naming order (name, driver, flags, refcount, monitor
ownership, options, explicit options, inherits_from, runtime fields, op
blockers, the ``file``/``backing`` edge names, children and parents in list
order with roles, perms and frozen bits), then BlockBackends and jobs.  Edges
are identified by (parent label, edge name), never by object ids, so an
aborted transaction must leave the digest unchanged.

State kept beside the graph by packages above it (the QOM user objects of
``qmpgraph.objects``, which throttle and luks nodes use) joins the digest
through ``register_state_source(name, fn)``: ``fn(graph)`` returns a
JSON-able picture, or None when there is nothing (then the digest is the
graph's alone).  The graph package imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Edge, Node


def _edge(edge: Edge) -> dict[str, Any]:
    return {
        "parent": edge.parent.label(),
        "name": edge.name,
        "child": edge.child.node_name if edge.child is not None else None,
        "role": int(edge.role),
        "perm": edge.perm,
        "shared": edge.shared,
        "frozen": edge.frozen,
    }


def _node(node: Node) -> dict[str, Any]:
    return {
        "name": node.node_name,
        "driver": node.format_name,
        "flags": int(node.open_flags),
        "refcnt": node.refcnt,
        "monitor": node.monitor_owned,
        "options": node.options,
        "explicit": node.explicit_options,
        "inherits_from": node.inherits_from.node_name if node.inherits_from else None,
        "force_share": node.force_share,
        "detect_zeroes": node.detect_zeroes,
        "implicit": node.implicit,
        "backing_blocker": node.backing_blocker,
        "op_blockers": node.op_blockers,
        "file": node.file.name if node.file is not None else None,
        "backing": node.backing.name if node.backing is not None else None,
        "children": [_edge(e) for e in node.children],
        "parents": [[e.parent.label(), e.name] for e in node.parents],
    }


StateSource = Callable[[BlockGraph], Any]
_SOURCES: dict[str, StateSource] = {}


def register_state_source(name: str, source: StateSource) -> None:
    """Include ``source(graph)`` (when not None) in every graph's state as ``name``."""
    _SOURCES[name] = source


def graph_state(graph: BlockGraph) -> dict[str, Any]:
    """The canonical, JSON-able picture of the graph that the digest hashes."""
    state: dict[str, Any] = {
        "nodes": [_node(n) for n in graph.named_nodes_oldest_first()],
        "backends": [
            [bb.label(), _edge(bb.root) if bb.root is not None else None] for bb in graph.backends
        ],
        "jobs": [[job.label(), [_edge(e) for e in job.edges]] for job in graph.jobs],
    }
    for name, source in sorted(_SOURCES.items()):
        extra = source(graph)
        if extra is not None:
            state[name] = extra
    return state


def state_digest(state: dict[str, Any]) -> str:
    """sha256 hex digest of a ``graph_state`` picture."""
    blob = json.dumps(state, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def graph_digest(graph: BlockGraph) -> str:
    """sha256 hex digest of ``graph_state(graph)``."""
    return state_digest(graph_state(graph))
