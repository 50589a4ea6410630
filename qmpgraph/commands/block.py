"""Graph-changing block commands: ``blockdev-add`` and ``blockdev-del``.

Each command runs as exactly one engine transaction
(``Daemon.graph_transaction``): any failure aborts it, leaving the graph (and
its digest) as it was, and the transaction log records it as aborted.

What does not live here: the open path itself (``qmpgraph.drivers.open``),
the queries (``qmpgraph.commands.query``), reopen and snapshots.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.drivers.open import open_node_tree
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import BlockBackend, Node, ParentKind
from qmpgraph.jobs.drain import file_attach_drains
from qmpgraph.transactions.actions import set_monitor_owned, unref_node


@command("blockdev-add")
def blockdev_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Open a node tree from ``args``; the top node becomes monitor-owned."""
    daemon = ctx.daemon
    with file_attach_drains(daemon, args), daemon.graph_transaction("blockdev-add", args) as tran:
        open_node_tree(daemon.graph, args, tran)


def device_or_node_name(node: Node) -> str:
    """The name of a named BlockBackend on ``node``, else its node name."""
    for edge in node.parents:
        parent = edge.parent
        if isinstance(parent, BlockBackend) and parent.name:
            return parent.name
    return node.node_name


@command("blockdev-del")
def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Drop the monitor's reference to a node, QEMU's checks in QEMU's order."""
    daemon = ctx.daemon
    name = str(args["node-name"])
    with daemon.graph_transaction("blockdev-del", args) as tran:
        node = daemon.graph.lookup(name)
        if node is None:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        if any(e.kind is ParentKind.BLOCK_BACKEND for e in node.parents):
            raise GenericError(f"Node {name} is in use")
        reasons = node.op_blockers.get("drive-del")
        if reasons:
            raise GenericError(f"Node '{device_or_node_name(node)}' is busy: {reasons[0]}")
        if not node.monitor_owned:
            raise GenericError(f"Node {name} is not owned by the monitor")
        if node.refcnt > 1:
            raise GenericError(f"Block device {device_or_node_name(node)} is in use")
        set_monitor_owned(tran, node, False)
        unref_node(tran, daemon.graph, node)
