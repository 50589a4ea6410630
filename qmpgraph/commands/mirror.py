"""``blockdev-mirror`` and ``drive-mirror`` (QEMU 7.2's blockdev.c).

The checks run in QEMU's order, each with QEMU's message: the source must
be a root node (``qmp_get_root_bs``: "Need a root block node"), the target
is looked up, then blockdev_mirror_common's checks (granularity range and
power of two, the mirror-source and mirror-target op blockers, ``sync=top``
without a backing file becoming ``full``, ``replaces`` or an implicit filter
on top, the node to replace and its size), then mirror_start's sync modes
("Sync mode 'incremental' not supported"), then ``start_mirror``
(``qmpgraph.jobs.mirror``: buf-size, "Can't mirror node into itself", the
filter, the job and its edges).  Everything is one engine transaction; the
job starts once it committed.

What does not live here: the job (``qmpgraph.jobs.mirror``), the job verbs
(``qmpgraph.commands.jobs``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.block import device_or_node_name
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.transaction import lookup_bs
from qmpgraph.drivers.base import node_size
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, skip_implicit_filters
from qmpgraph.graph.model import Node, ParentKind
from qmpgraph.jobs.mirror import MirrorParams, start_mirror
from qmpgraph.jobs.mirror_graph import backing_chain_next, can_replace


def blocked(node: Node, op: str) -> None:
    """bdrv_op_is_blocked: "Node '%s' is busy: <first reason>"."""
    reasons = node.op_blockers.get(op)
    if reasons:
        raise GenericError(f"Node '{device_or_node_name(node)}' is busy: {reasons[0]}")


def root_bs(graph: BlockGraph, name: str) -> Node:
    """qmp_get_root_bs: a node (or device) with BlockBackend parents only."""
    node = lookup_bs(graph, name, name)
    if any(edge.kind is not ParentKind.BLOCK_BACKEND for edge in node.parents):
        raise GenericError("Need a root block node")
    return node


def check_to_replace_node(graph: BlockGraph, source: Node, name: str) -> Node:
    """check_to_replace_node: exists, not blocked, reachable through filters."""
    node = graph.lookup(name)
    if node is None:
        raise GenericError(f"Failed to find node with node-name='{name}'")
    blocked(node, "replace")
    if not can_replace(source, node):
        raise GenericError(
            f"Cannot replace '{name}' by a node mirrored from '{source.node_name}', "
            "because it cannot be guaranteed that doing so would not lead to an abrupt "
            "change of visible data"
        )
    return node


def mirror_params(args: dict[str, Any], sync: str) -> MirrorParams:
    """The optional arguments with QEMU's defaults."""
    return MirrorParams(
        sync=sync,
        zero_target=sync == "full",
        speed=int(args.get("speed", 0)),
        granularity=int(args.get("granularity", 0)),
        buf_size=int(args.get("buf-size", 0)),
        on_source_error=str(args.get("on-source-error", "report")),
        on_target_error=str(args.get("on-target-error", "report")),
        unmap=bool(args.get("unmap", True)),
        filter_node_name=args.get("filter-node-name"),
        copy_mode=str(args.get("copy-mode", "background")),
        replaces=args.get("replaces"),
        auto_finalize=bool(args.get("auto-finalize", True)),
        auto_dismiss=bool(args.get("auto-dismiss", True)),
    )


def mirror_common(graph: BlockGraph, source: Node, target: Node, params: MirrorParams) -> None:
    """blockdev_mirror_common's checks (they may rewrite ``sync`` and ``replaces``)."""
    gran = params.granularity
    if gran != 0 and (gran < 512 or gran > 64 << 20):
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if gran & (gran - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")
    blocked(source, "mirror-source")
    blocked(target, "mirror-target")
    if params.sync == "top" and backing_chain_next(source) is None:
        params.sync = "full"
    if params.replaces is None:
        unfiltered = skip_implicit_filters(source)
        if unfiltered is not None and unfiltered is not source:
            params.replaces = unfiltered.node_name
    if params.replaces is not None:
        to_replace = check_to_replace_node(graph, source, params.replaces)
        if node_size(source) != node_size(to_replace):
            raise GenericError("cannot replace image with a mirror image of different size")
    if params.sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{params.sync}' not supported")


@command("blockdev-mirror")
def blockdev_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Start a mirror job from ``device`` to the existing node ``target``."""
    daemon = ctx.daemon
    with daemon.graph_transaction("blockdev-mirror", args) as tran:
        graph = daemon.graph
        source = root_bs(graph, str(args["device"]))
        name = str(args["target"])
        target = lookup_bs(graph, name, name)
        params = mirror_params(args, str(args["sync"]))
        mirror_common(graph, source, target, params)
        job = start_mirror(
            daemon, tran, args.get("job-id"), source=source, target=target, params=params
        )
    job.start()
