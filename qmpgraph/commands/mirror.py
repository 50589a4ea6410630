"""``blockdev-mirror`` and ``drive-mirror`` (QEMU 7.2's blockdev.c).

drive-mirror first creates the target image (unless ``mode=existing``:
without a backing file for ``sync=full``, else backed by the source's
backing file or, for ``sync=none``, by the source), opens it without its
backing, then runs blockdev-mirror's checks; on completion the target gets
the source's backing chain (``mode=existing``: the image's own backing file
is opened).

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

from qmpgraph.commands.backup import create_target, open_target
from qmpgraph.commands.block import device_or_node_name
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.transaction import lookup_bs
from qmpgraph.drivers.base import node_size
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, cow_child, skip_filters, skip_implicit_filters
from qmpgraph.graph.model import Node, ParentKind
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.jobs.mirror import MirrorParams, start_mirror
from qmpgraph.jobs.mirror_graph import backing_chain_next, can_replace
from qmpgraph.transactions.actions import unref_node


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


@command("drive-mirror")
def drive_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Mirror ``device`` into a new (or existing) image file (qmp_drive_mirror)."""
    daemon = ctx.daemon
    with daemon.graph_transaction("drive-mirror", args) as tran:
        graph = daemon.graph
        source = root_bs(graph, str(args["device"]))
        blocked(source, "mirror-source")
        mode = str(args.get("mode", "absolute-paths"))
        fmt = args.get("format")
        if fmt is None and mode != "existing":
            fmt = source.format_name
        sync = str(args["sync"])
        unfiltered = skip_filters(source)
        edge = cow_child(unfiltered) if unfiltered is not None else None
        backing = edge.child if edge is not None else None
        if backing is None and sync == "top":
            sync = "full"
        if sync == "none":
            backing = source
        size = node_size(source)
        if args.get("replaces") is not None and args.get("node-name") is None:
            raise GenericError(
                "a node-name must be provided when replacing a named node of the graph"
            )
        flags = int(source.open_flags | OpenFlag.RDWR | OpenFlag.NO_BACKING)
        path = str(args["target"])
        if mode != "existing":
            assert fmt is not None
            new_backing = None if sync == "full" or backing is None else backing
            create_target(graph, path, str(fmt), size, new_backing, no_backing=True)
        opts: dict[str, Any] = {}
        if args.get("node-name") is not None:
            opts["node-name"] = args["node-name"]
        target = open_target(tran, graph, path, fmt, flags, opts=opts)
        params = mirror_params(args, sync)
        params.backing_mode = "source" if mode == "absolute-paths" else "open"
        # A new image reads as zeros already (bdrv_has_zero_init).
        params.zero_target = sync == "full" and mode == "existing"
        params.filter_node_name = None
        mirror_common(graph, source, target, params)
        job = start_mirror(
            daemon, tran, args.get("job-id"), source=source, target=target, params=params
        )
        # The job holds the target now (bdrv_unref).
        unref_node(tran, graph, target)
    job.start()
