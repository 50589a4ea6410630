"""Per-node facts the block queries read from outside the graph, and their caches.

* A file's size and allocation (``os.stat``) are read again by every query,
  as QEMU stats the file each time (another process may have written to it);
  within one query they are read once per file node and remembered, so that
  a repeated query on an unchanged graph can check, file by file, that its
  cached reply still holds (``begin_query``/``end_query``).
* A qcow2 header's feature bits are decoded once per node state
  (``cached``).

What does not live here: the filename refresh (``filenames.py``) and the
replies (``image_info.py``, ``device_info.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Node

_QCOW2_COMPAT_LAZY = 1
_QCOW2_INCOMPAT_DIRTY = 1
_QCOW2_INCOMPAT_CORRUPT = 2
_QCOW2_INCOMPAT_EXTL2 = 16
_QCOW2_AUTOCLEAR_RAW = 2

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What ``stat`` says about a file node's image."""

    size: int
    allocated: int


@dataclass(frozen=True, slots=True)
class Qcow2Facts:
    """A qcow2 header's feature bits, decoded for the format-specific info."""

    compat: str
    lazy_refcounts: bool
    corrupt: bool
    dirty: bool
    extended_l2: bool
    refcount_bits: int
    compression_type: str
    data_file_raw: bool


_static: dict[int, tuple[object, Any]] = {}
_stats_this_query: dict[int, tuple[Node, FileFacts]] = {}


def begin_query() -> None:
    """Start remembering the file facts a query reads."""
    _stats_this_query.clear()


def end_query() -> tuple[tuple[Node, FileFacts], ...]:
    """Stop; every file node read since ``begin_query``, with its facts."""
    files = tuple(_stats_this_query.values())
    _stats_this_query.clear()
    return files


def file_facts(node: Node) -> FileFacts:
    """The file node's image size and allocated bytes, read now."""
    state = node.state
    assert isinstance(state, FileState)
    try:
        st = os.stat(state.filename)
    except OSError:
        return FileFacts(state.size, 0)
    return FileFacts(st.st_size, st.st_blocks * 512)


def file_facts_now(node: Node) -> FileFacts:
    """The file node's facts, read once per query."""
    hit = _stats_this_query.get(node.id)
    if hit is not None and hit[0] is node:
        return hit[1]
    facts = file_facts(node)
    _stats_this_query[node.id] = (node, facts)
    return facts


def cached(node: Node, compute: Callable[[Node], T]) -> T:
    """``compute(node)``, cached until the node's driver state object changes."""
    hit = _static.get(node.id)
    if hit is not None and hit[0] is node.state:
        value: T = hit[1]
        return value
    value = compute(node)
    _static[node.id] = (node.state, value)
    return value


def prune(graph: BlockGraph, live_keys: dict[Any, Any] | None = None) -> None:
    """Forget facts (and ``live_keys`` entries keyed by (node id, ...)) of deleted nodes."""
    extra = live_keys if live_keys is not None else {}
    if len(_static) > 2 * len(graph) + 64 or len(extra) > 4 * len(graph) + 64:
        live = {n.id for n in graph.named_nodes_oldest_first()}
        for key in [k for k in _static if k not in live]:
            del _static[key]
        for tkey in [k for k in extra if k[0] not in live]:
            del extra[tkey]


def qcow2_facts(node: Node) -> Qcow2Facts:
    """The qcow2 node's header features (use through ``cached``)."""
    state = node.state
    assert isinstance(state, Qcow2State)
    header = state.header
    incompat = header.incompatible_features
    return Qcow2Facts(
        "1.1" if header.version >= 3 else "0.10",
        bool(header.compatible_features & _QCOW2_COMPAT_LAZY),
        bool(incompat & _QCOW2_INCOMPAT_CORRUPT),
        bool(incompat & _QCOW2_INCOMPAT_DIRTY),
        bool(incompat & _QCOW2_INCOMPAT_EXTL2),
        1 << header.refcount_order,
        header.compression,
        bool(header.autoclear_features & _QCOW2_AUTOCLEAR_RAW),
    )
