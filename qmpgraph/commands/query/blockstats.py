"""``query-blockstats``: BlockStats per named BlockBackend, or per node.

QEMU 7.2 (block/qapi.c) keeps I/O accounting in BlockBackends.  A storage
daemon's BlockBackends (exports', jobs') have no name, so the plain query
answers ``[]``; with ``"query-nodes": true`` it lists every node, oldest
first, with the two things a BlockDriverState keeps itself: its
``wr_highest_offset`` and, for file nodes, the file-posix discard counters
(``driver-specific``).  Everything else in a node's BlockDeviceStats is zero
(``timed_stats`` empty, no ``idle_time_ns``: that needs a BlockBackend's
last access).  ``parent`` is the stats of the node's primary child when it
holds data or is filtered, otherwise of its one data child (none if there
are several, as for quorum); ``backing`` is given only at BlockBackend
level (never with ``query-nodes``).

The counters are recorded by the data path (``qmpgraph.io.stats``).  What
does not live here: the other block queries (``device_info.py``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.graph.graph import filter_or_cow_child, primary_child, skip_implicit_filters
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import Role
from qmpgraph.io.stats import discard_counts, highest_offset

# BlockDeviceStats members in QAPI order; every counter a node has is zero.
_COUNTERS = (
    "rd_bytes",
    "wr_bytes",
    "unmap_bytes",
    "rd_operations",
    "wr_operations",
    "flush_operations",
    "unmap_operations",
    "rd_total_time_ns",
    "wr_total_time_ns",
    "flush_total_time_ns",
    "unmap_total_time_ns",
)
_AFTER_HIGHEST = (
    "rd_merged",
    "wr_merged",
    "unmap_merged",
    "failed_rd_operations",
    "failed_wr_operations",
    "failed_flush_operations",
    "failed_unmap_operations",
    "invalid_rd_operations",
    "invalid_wr_operations",
    "invalid_flush_operations",
    "invalid_unmap_operations",
)


def _device_stats(wr_highest_offset: int) -> dict[str, Any]:
    stats: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
    stats["wr_highest_offset"] = wr_highest_offset
    stats.update(dict.fromkeys(_AFTER_HIGHEST, 0))
    stats["account_invalid"] = False
    stats["account_failed"] = False
    stats["timed_stats"] = []
    return stats


def _driver_specific(node: Node) -> dict[str, Any] | None:
    """bdrv_get_specific_stats: only file-posix answers (``file``)."""
    if node.format_name != "file":
        return None
    counts = discard_counts(node)
    return {
        "driver": "file",
        "discard-nb-ok": counts.nb_ok,
        "discard-nb-failed": counts.nb_failed,
        "discard-bytes-ok": counts.bytes_ok,
    }


def _parent_edge(node: Node) -> Edge | None:
    """The child whose stats go under ``parent``."""
    edge = primary_child(node)
    if edge is not None and edge.role & (Role.DATA | Role.FILTERED):
        return edge
    found: Edge | None = None
    for child in node.children:
        if child.role & Role.DATA:
            if found is not None:
                return None  # several data children: none is chosen
            found = child
    return found


def node_stats(node: Node, blk_level: bool) -> dict[str, Any]:
    """bdrv_query_bds_stats: ``node``'s BlockStats (members in QAPI order)."""
    if blk_level:
        node = skip_implicit_filters(node) or node
    out: dict[str, Any] = {}
    if node.node_name:
        out["node-name"] = node.node_name
    out["stats"] = _device_stats(highest_offset(node))
    specific = _driver_specific(node)
    if specific is not None:
        out["driver-specific"] = specific
    parent = _parent_edge(node)
    if parent is not None and parent.child is not None:
        out["parent"] = node_stats(parent.child, blk_level)
    if blk_level:
        below = filter_or_cow_child(node)
        if below is not None and below.child is not None:
            out["backing"] = node_stats(below.child, blk_level)
    return out


@command("query-blockstats")
def query_blockstats(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node's stats with ``query-nodes``, else the named BlockBackends'."""
    graph = ctx.daemon.graph
    if args.get("query-nodes", False):
        return [node_stats(node, False) for node in graph.named_nodes_oldest_first()]
    out: list[dict[str, Any]] = []
    for bb in graph.backends:
        if not bb.name:
            continue
        root = bb.root.child if bb.root is not None else None
        # A BlockBackend without a medium: zeroed stats and no node.
        entry = node_stats(root, True) if root is not None else {"stats": _device_stats(0)}
        # device and qdev come first in QAPI order.
        head: dict[str, Any] = {"device": bb.name}
        if bb.device:
            head["qdev"] = bb.device
        head.update(entry)
        out.append(head)
    return out
