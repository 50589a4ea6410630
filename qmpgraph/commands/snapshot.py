"""External snapshots and backing-file edits: ``blockdev-snapshot``,
``blockdev-snapshot-sync`` (commands and transaction actions) and
``change-backing-file`` (sections 5.4, 5.5, 5.9 and 7 of the reference).

The snapshot action follows QEMU 7.2's external_snapshot_prepare step by
step: completion mode, the old node's lookup and its drained section (until
clean or abort: jobs using it pause), the op blocker, for ``-sync``
the node-name checks, the image creation (bdrv_img_create's checks, then a
real qcow2 file written by ``qmpgraph.drivers.qcow2_image``; it stays on disk
whatever happens next, as in QEMU) and the overlay's open, then the overlay
checks and ``append``.  Commit reopens the old node read-only (a failure
there is ignored, as QEMU ignores it); clean drops the reference the open or
lookup took, so a ``-sync`` overlay nobody points at is deleted right away.

What does not live here: the transaction machinery (``transaction.py``),
the qcow2 writer (``qmpgraph.drivers.qcow2_image``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any

from qmpgraph.commands.block import device_or_node_name
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.query import Query, node_length
from qmpgraph.commands.registry import command
from qmpgraph.commands.transaction import BlkAction, action, lookup_bs, single_action
from qmpgraph.drivers import REGISTRY
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.open import TreeOpenContext, open_one
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.drivers.qcow2_image import create_image, rewrite_backing
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, cow_child, filter_or_cow_child
from qmpgraph.graph.model import Node, ParentKind
from qmpgraph.graph.perms import OpenFlag, Perm
from qmpgraph.jobs.drain import transaction_drain
from qmpgraph.transactions.actions import ref_node, set_options, unref_node
from qmpgraph.transactions.composite import append
from qmpgraph.transactions.engine import Action, Transaction
from qmpgraph.transactions.reopen import ReopenRequest, reopen_multiple

# Format drivers of QEMU 7.2 (qemu-img's list) grouped by what bdrv_img_create
# answers for them when given a backing file.
_NO_CREATE = frozenset(
    {"blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
     "copy-before-write", "copy-on-read", "dmg", "ftp", "ftps", "http", "https",
     "null-aio", "null-co", "preallocate", "quorum", "replication",
     "snapshot-access", "throttle", "vvfat"}
)  # fmt: skip
_NO_BACKING = frozenset(
    {"file", "gluster", "host_cdrom", "host_device", "iscsi", "iser", "luks", "nbd",
     "nfs", "nvme", "parallels", "raw", "rbd", "ssh", "vdi", "vhdx", "vpc"}
)  # fmt: skip
_OTHER_BACKING = frozenset({"qcow", "qed", "vmdk"})
QEMU_FORMATS = _NO_CREATE | _NO_BACKING | _OTHER_BACKING | {"qcow2"}
_PROTOCOL_PREFIX = re.compile(r"^([^:/]*):")


def _blocked(node: Node, op: str) -> None:
    """bdrv_op_is_blocked: "Node '%s' is busy: <first reason>"."""
    reasons = node.op_blockers.get(op)
    if reasons:
        raise GenericError(f"Node '{device_or_node_name(node)}' is busy: {reasons[0]}")


def _not_supported(what: str) -> GenericError:
    return GenericError(f"{what} is not supported by qmpgraph yet")


def img_create_checks(path: str, fmt: str, backing_file: str, backing_fmt: str) -> None:
    """bdrv_img_create's checks before anything is created, in QEMU's order."""
    if fmt not in QEMU_FORMATS:
        raise GenericError(f"Unknown file format '{fmt}'")
    prefix = _PROTOCOL_PREFIX.match(path)
    if prefix is not None and prefix.group(1) != "file":
        if prefix.group(1) in QEMU_FORMATS:
            raise _not_supported(f"Creating images over protocol '{prefix.group(1)}'")
        raise GenericError(f"Unknown protocol '{prefix.group(1)}'")
    if fmt in _NO_CREATE:
        raise GenericError(f"Format driver '{fmt}' does not support image creation")
    if fmt in _NO_BACKING:
        raise GenericError(f"Backing file not supported for file format '{fmt}'")
    if path == backing_file:
        raise GenericError(
            "Error: Trying to create an image with the same filename as the backing file"
        )
    if backing_file == "":
        raise GenericError("Expected backing file name, got empty string")
    if fmt == "vmdk" and backing_fmt != "vmdk":
        raise GenericError("backing_file must be a vmdk image")
    if fmt != "qcow2":
        raise _not_supported(f"Creating '{fmt}' images")


def _cumulative_perm(node: Node) -> int:
    perm = 0
    for edge in node.parents:
        perm |= edge.perm
    return perm


@dataclass(frozen=True, slots=True)
class NodeStateUndo(Action):
    """Undo of replacing a node's driver state (e.g. a rewritten qcow2 header)."""

    name = "node-state"
    node: Node
    old: Any

    def abort(self) -> None:
        self.node.state = self.old


def set_node_state(tran: Transaction, node: Node, state: Any) -> None:
    """Replace ``node.state`` (the driver's view of the image) with an undo record."""
    old = node.state
    node.state = state
    tran.add(NodeStateUndo(node, old))


def reopen_read_only(tran: Transaction, graph: BlockGraph, node: Node, read_only: bool) -> None:
    """bdrv_reopen_set_read_only: ``node`` plus the children inheriting the option.

    Only ``read-only`` changes, so the requests are graph-only (flags and the
    permission refresh); the option itself is then recorded in the options,
    and in the explicit options of ``node`` alone, as QEMU's queue does.
    """
    requests: list[ReopenRequest] = []
    queue = [node]
    seen = {node.id}
    while queue:
        cur = queue.pop(0)
        flags = cur.open_flags & ~OpenFlag.RDWR if read_only else cur.open_flags | OpenFlag.RDWR
        requests.append(ReopenRequest(cur, int(flags)))
        for edge in cur.children:
            child = edge.child
            if child is None or child.id in seen or child.inherits_from is not cur:
                continue
            # A backing child stays read-only; an explicit choice is kept.
            if "read-only" in child.explicit_options or edge is cur.backing:
                continue
            seen.add(child.id)
            queue.append(child)
    reopen_multiple(tran, graph, requests)
    for req in requests:
        cur = req.node
        explicit = dict(cur.explicit_options)
        if cur is node:
            explicit["read-only"] = read_only
        set_options(tran, cur, {**cur.options, "read-only": read_only}, explicit)


class ExternalSnapshot(BlkAction):
    """blockdev-snapshot and blockdev-snapshot-sync as transaction actions."""

    old: Node | None = None
    new: Node | None = None
    appended = False
    drained = False

    def prepare(self, tran: Transaction) -> None:
        """external_snapshot_prepare, QEMU 7.2's order."""
        data = self.data
        sync = self.kind == "blockdev-snapshot-sync"
        if sync:
            device, node_name = data.get("device"), data.get("node-name")
        else:
            device = node_name = str(data["node"])
        self.check_completion_mode()
        old = self.old = lookup_bs(self.graph, device, node_name)
        # Drained from here to clean (or abort): the jobs using it pause.
        transaction_drain(tran).begin(self.daemon, old)
        self.drained = True
        _blocked(old, "external-snapshot")
        if sync:
            self.new = self._open_new_image(tran, old, node_name)
        else:
            ref = str(data["overlay"])
            self.new = lookup_bs(self.graph, ref, ref)
            ref_node(tran, self.new)
        new = self.new
        if _cumulative_perm(new) & Perm.CONSISTENT_READ:
            raise GenericError("The overlay is already in use")
        drv = new.driver
        assert drv is not None
        if drv.is_filter:
            raise GenericError("Filters cannot be used as overlays")
        if cow_child(new) is not None:
            raise GenericError("The overlay already has a backing image")
        if not drv.supports_backing:
            raise GenericError("The overlay does not support backing images")
        append(tran, self.graph, new, old)
        self.appended = True

    def _open_new_image(self, tran: Transaction, old: Node, node_name: str | None) -> Node:
        data = self.data
        fmt = str(data.get("format", "qcow2"))
        snapshot_node_name = data.get("snapshot-node-name")
        path = str(data["snapshot-file"])
        if node_name and not snapshot_node_name:
            raise GenericError("New overlay node-name missing")
        if snapshot_node_name and (
            snapshot_node_name in self.graph
            or self.graph.backend_by_name(snapshot_node_name) is not None
        ):
            raise GenericError("New overlay node-name already in use")
        flags = old.open_flags & ~(OpenFlag.SNAPSHOT | OpenFlag.COPY_ON_READ)
        flags |= OpenFlag.NO_BACKING
        if data.get("mode", "absolute-paths") != "existing":
            size = node_length(old)
            backing_file = Query().refresh(old).filename
            backing_fmt = old.format_name or ""
            img_create_checks(path, fmt, backing_file, backing_fmt)
            create_image(
                path.removeprefix("file:"),
                size,
                backing_file,
                backing_fmt,
                opened=self.graph.names.generate,
            )
        return self._open(tran, path, fmt, snapshot_node_name, int(flags))

    def _open(
        self, tran: Transaction, path: str, fmt: str, node_name: str | None, flags: int
    ) -> Node:
        """bdrv_open(path, NULL, {driver, node-name}, flags): options come from the flags."""
        drv = REGISTRY.get(fmt)
        if drv is None:
            if fmt in QEMU_FORMATS:
                raise _not_supported(f"Opening '{fmt}' overlays")
            raise GenericError(f"Unknown driver '{fmt}'")
        opts: dict[str, Any] = {"driver": fmt}
        if node_name:
            opts["node-name"] = node_name
        opts["read-only"] = not flags & OpenFlag.RDWR
        opts["auto-read-only"] = bool(flags & OpenFlag.AUTO_RDONLY)
        opts["cache"] = {
            "direct": bool(flags & OpenFlag.NOCACHE),
            "no-flush": bool(flags & OpenFlag.NO_FLUSH),
        }
        if flags & OpenFlag.UNMAP:
            opts["discard"] = "unmap"
        if drv.protocol:
            opts["filename"] = path
        else:
            opts["file"] = {"driver": "file", "filename": path.removeprefix("file:")}
        if drv.supports_backing:
            opts["backing"] = None  # BDRV_O_NO_BACKING: append attaches it
        node = open_one(TreeOpenContext(self.graph, tran), opts, None)
        # Only what the caller passed counts as explicit (the rest came from flags).
        explicit = {k: v for k, v in opts.items() if k in ("driver", "node-name")}
        set_options(tran, node, dict(node.options), explicit)
        return node

    def commit(self, tran: Transaction) -> None:
        """Make the old node read-only; a failure is ignored, as in QEMU."""
        old = self.old
        assert old is not None
        if old.open_flags & OpenFlag.COPY_ON_READ:
            return
        mark = tran.mark()
        try:
            reopen_read_only(tran, self.graph, old, True)
        except GenericError:
            tran.rollback_to(mark)

    def abort(self, tran: Transaction) -> None:
        """End the drain of the old node."""
        self._end_drain(tran)

    def clean(self, tran: Transaction) -> None:
        """Drop the reference the open (or lookup) took on the overlay; end the drain."""
        if self.new is not None:
            unref_node(tran, self.graph, self.new)
        self._end_drain(tran)

    def _end_drain(self, tran: Transaction) -> None:
        if self.drained:
            self.drained = False
            transaction_drain(tran).end()


for _kind in ("blockdev-snapshot", "blockdev-snapshot-sync"):
    action(_kind)(ExternalSnapshot)


@command("blockdev-snapshot")
def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Put an existing overlay node on top of ``node`` (a one-action transaction)."""
    single_action(ctx, "blockdev-snapshot", args)


@command("blockdev-snapshot-sync")
def blockdev_snapshot_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create an overlay image, open it and put it on top (a one-action transaction)."""
    single_action(ctx, "blockdev-snapshot-sync", args)


# -- change-backing-file --------------------------------------------------------


def root_bs(ctx: CommandContext, name: str) -> Node:
    """qmp_get_root_bs: a node whose parents are all BlockBackends."""
    node = lookup_bs(ctx.daemon.graph, name, name)
    if any(e.kind is not ParentKind.BLOCK_BACKEND for e in node.parents):
        raise GenericError("Need a root block node")
    if node.driver is None:
        raise GenericError("Device has no medium")
    return node


def _chain_contains(top: Node, target: Node) -> bool:
    cur: Node | None = top
    while cur is not None:
        if cur is target:
            return True
        edge = filter_or_cow_child(cur)
        cur = edge.child if edge is not None else None
    return False


def _image_path(node: Node) -> str | None:
    edge = node.file
    child = edge.child if edge is not None else None
    if child is not None and isinstance(child.state, FileState):
        return child.state.filename
    return None


@command("change-backing-file")
def change_backing_file(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Rewrite the backing file name in an image header; the graph stays as it is."""
    device = str(args["device"])
    image_name = str(args["image-node-name"])
    backing_file = str(args["backing-file"])
    daemon = ctx.daemon
    with daemon.graph_transaction("change-backing-file", args) as tran:
        bs = root_bs(ctx, device)
        image = lookup_bs(daemon.graph, None, image_name)
        if filter_or_cow_child(image) is None:
            raise GenericError(
                "not allowing backing file change on an image without a backing file"
            )
        _blocked(bs, "change")
        if not _chain_contains(bs, image):
            raise GenericError(f"'{device}' and image file are not in the same chain")
        read_only = image.read_only
        if read_only:
            reopen_read_only(tran, daemon.graph, image, False)
        error: GenericError | None = None
        state = image.state
        # QEMU passes the image's own format name as the backing format here.
        fmt = image.format_name or ""
        path = _image_path(image)
        if isinstance(state, Qcow2State) and path is not None:
            try:
                header = rewrite_backing(path, state.header, backing_file, fmt)
            except OSError as err:
                error = GenericError(
                    f"Could not change backing file to '{backing_file}': "
                    f"{os.strerror(err.errno or 0)}"
                )
            else:
                # bdrv_change_backing_file also sets auto_backing_file to the new
                # name, so an implicitly opened backing child may now count as
                # overridden in filenames.
                set_node_state(
                    tran, image, replace(state, header=header, auto_backing_file=backing_file)
                )
        elif not isinstance(state, Qcow2State):
            error = GenericError(
                f"Could not change backing file to '{backing_file}': Operation not supported"
            )
        if read_only:
            reopen_read_only(tran, daemon.graph, image, True)
        if error is not None:
            raise error
