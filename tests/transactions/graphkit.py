"""Helpers that build small graphs for the engine tests, with test-only drivers.

``FakeFormat`` is a format with an IMAGE ``file`` and a COW ``backing`` (like
qcow2 without a header); ``FakeFilter`` is a filter with one FILTERED|PRIMARY
``file``.  Nodes are built directly with the primitive actions, so the tests
exercise the engine without files.
"""

from __future__ import annotations

from qmpgraph.drivers import REGISTRY
from qmpgraph.drivers.base import ChildSpec, Driver
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import OpenFlag, Perm, Role
from qmpgraph.transactions.actions import (
    add_node,
    add_root_parent,
    set_monitor_owned,
    unref_node,
)
from qmpgraph.transactions.composite import attach_child, root_attach
from qmpgraph.transactions.engine import Transaction


class FakeFormat(Driver):
    """A qcow2-like format without I/O."""

    format_name = "fakefmt"
    is_format = True
    supports_backing = True
    children = (ChildSpec("file", Role.IMAGE), ChildSpec("backing", Role.COW, required=False))


class FakeFilter(Driver):
    """A throttle-like filter."""

    format_name = "fakefilter"
    is_filter = True
    children = (ChildSpec("file", Role.FILTERED | Role.PRIMARY),)


FMT = FakeFormat()
FILTER = FakeFilter()
NULL = REGISTRY["null-co"]
RW = OpenFlag.RDWR | OpenFlag.ALLOW_RDWR
EXPORT_RW = (
    Perm.CONSISTENT_READ | Perm.WRITE,
    Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED,
)


def new_node(
    tran: Transaction, graph: BlockGraph, name: str, driver: Driver, *, rw: bool = True
) -> Node:
    """A monitor-owned node without children."""
    node = Node(name, driver, int(RW) if rw else 0)
    add_node(tran, graph, node)
    set_monitor_owned(tran, node, True)
    return node


def protocol(graph: BlockGraph, name: str, *, rw: bool = True) -> Node:
    """A committed monitor-owned null-co node."""
    with Transaction() as tran:
        return new_node(tran, graph, name, NULL, rw=rw)


def fmt_on(tran: Transaction, graph: BlockGraph, name: str, file: Node, *, rw: bool = True) -> Node:
    """A monitor-owned FakeFormat node on ``file`` (by reference)."""
    node = new_node(tran, graph, name, FMT, rw=rw)
    attach_child(tran, graph, node, file, "file", role=Role.IMAGE)
    return node


def filter_on(tran: Transaction, graph: BlockGraph, name: str, file: Node) -> Node:
    """A monitor-owned FakeFilter node on ``file`` (by reference)."""
    node = new_node(tran, graph, name, FILTER)
    attach_child(tran, graph, node, file, "file", role=Role.FILTERED | Role.PRIMARY)
    return node


def export(
    tran: Transaction, graph: BlockGraph, node: Node, *, writable: bool = True
) -> BlockBackend:
    """An anonymous BlockBackend (an NBD export) on ``node``."""
    bb = BlockBackend()
    add_root_parent(tran, graph, bb)
    perm, shared = EXPORT_RW
    if not writable:
        perm = Perm.CONSISTENT_READ
    root_attach(
        tran, graph, bb, node, "root", role=Role.FILTERED | Role.PRIMARY, perm=perm, shared=shared
    )
    return bb


def delete(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    """blockdev-del's final step: leave the monitor list, drop the reference."""
    set_monitor_owned(tran, node, False)
    unref_node(tran, graph, node)
