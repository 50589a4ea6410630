"""Dirty bitmap commands and the bitmap actions of ``transaction`` (QEMU 7.2).

Lives here: ``block-dirty-bitmap-add``, ``-remove``, ``-clear``, ``-enable``,
``-disable``, ``-merge`` and ``x-debug-block-dirty-bitmap-sha256``, with
QEMU's checks in QEMU's order (block/monitor/bitmap-qmp-cmds.c,
block/dirty-bitmap.c, qcow2's can-store check), and the six transaction
actions of blockdev.c.

Each command runs as one graph transaction, and every bitmap change goes
through an undo record (``qmpgraph.bitmaps.registry``), so an aborted
``transaction`` leaves the bitmaps exactly as they were: that is what QEMU's
per-action aborts re-derive.  One 7.2 quirk is kept on top: an ``enable``
action whose prepare fails after finding its bitmap (busy, read-only) leaves
``was_enabled`` false, so its abort *disables* the bitmap, and that stays.
(A failed lookup in ``enable``/``disable`` actions crashes qemu-storage-daemon
7.2, as does a merge with an empty list; qmpgraph answers with the error.)

Also here, for ``block-export-add``: the lookup and busy marking of an NBD
export's ``bitmaps`` and the extents of a ``qemu:dirty-bitmap:NAME`` block
status.  What does not live here: the bitmap model and write tracking
(``qmpgraph.bitmaps``), persistence in qcow2 images
(``qmpgraph.drivers.qcow2_bitmaps``), the NBD protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmpgraph.bitmaps import registry
from qmpgraph.bitmaps.checks import ALLOW_RO, BUSY, DEFAULT, RO, check
from qmpgraph.bitmaps.model import MAX_NAME_SIZE, DirtyBitmap
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.query.image_info import get_info, node_length
from qmpgraph.commands.registry import command
from qmpgraph.commands.transaction import BlkAction, action, lookup_bs
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, filter_or_cow_child
from qmpgraph.graph.model import Node
from qmpgraph.transactions.engine import Transaction

# NBD_STATE_DIRTY of qemu:dirty-bitmap contexts.
STATE_DIRTY = 1

# qcow2-bitmap.c's BME_MAX_TABLE_SIZE and BME_MAX_PHYS_SIZE.
_BME_MAX_TABLE_SIZE = 0x8000000
_BME_MAX_PHYS_SIZE = 0x20000000


def bitmap_lookup(graph: BlockGraph, node_name: str, name: str) -> tuple[Node, DirtyBitmap]:
    """block_dirty_bitmap_lookup: the node (device or node name), then the bitmap."""
    node = _lookup_quiet(graph, node_name)
    if node is None:
        raise GenericError(f"Node '{node_name}' not found")
    bm = registry.find(node, name)
    if bm is None:
        raise GenericError(f"Dirty bitmap '{name}' not found")
    return node, bm


def _lookup_quiet(graph: BlockGraph, name: str) -> Node | None:
    """bdrv_lookup_bs(name, name, NULL): no error text of its own."""
    try:
        return lookup_bs(graph, name, name)
    except GenericError:
        return None


def default_granularity(node: Node) -> int:
    """bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB]."""
    info = get_info(node)
    if info is not None and info[0] > 0:
        return min(65536, max(4096, info[0]))
    return 65536


def _can_store(node: Node, name: str, granularity: int) -> None:
    """bdrv_can_store_new_dirty_bitmap (only qcow2 stores bitmaps)."""
    state = node.state
    if node.format_name != "qcow2" or not isinstance(state, Qcow2State):
        raise GenericError(
            f"Can't store persistent bitmaps to {node.node_name}: Operation not supported"
        )
    prefix = f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
    if state.header.version < 3:
        raise GenericError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
    length = node_length(node)
    nbytes = ((length + granularity - 1) // granularity + 7) // 8
    cluster_size = state.header.cluster_size
    if nbytes > _BME_MAX_PHYS_SIZE or nbytes > _BME_MAX_TABLE_SIZE * cluster_size:
        raise GenericError(
            prefix + "Too much space will be occupied by the bitmap. Use larger granularity"
        )
    if len(name.encode()) > MAX_NAME_SIZE:
        raise GenericError(prefix + f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")


def create_bitmap(
    tran: Transaction, graph: BlockGraph, node: Node, granularity: int, name: str | None
) -> DirtyBitmap:
    """bdrv_create_dirty_bitmap: a new, empty, enabled bitmap at the head of the list."""
    if name is not None:
        if registry.find(node, name) is not None:
            raise GenericError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise GenericError(f"Bitmap name too long: {name}")
    bm = DirtyBitmap(name, node_length(node), granularity)
    registry.add(tran, graph, node, bm)
    return bm


def do_add(tran: Transaction, graph: BlockGraph, args: dict[str, Any]) -> None:
    """qmp_block_dirty_bitmap_add."""
    registry.prune(graph)
    name = str(args["name"])
    if not name:
        raise GenericError("Bitmap name cannot be empty")
    node_name = str(args["node"])
    node = lookup_bs(graph, node_name, node_name)
    if "granularity" in args:
        granularity = int(args["granularity"])
        if granularity < 512 or granularity & (granularity - 1):
            raise GenericError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node)
    persistent = bool(args.get("persistent", False))
    if persistent:
        _can_store(node, name, granularity)
    bm = create_bitmap(tran, graph, node, granularity, name)
    if args.get("disabled", False) or persistent:
        registry.change_flags(
            tran, bm, disabled=bool(args.get("disabled", False)), persistent=persistent
        )


def do_remove(
    tran: Transaction, graph: BlockGraph, args: dict[str, Any], release: bool
) -> DirtyBitmap:
    """block_dirty_bitmap_remove: checks, then drop it (``release``) or keep it."""
    node, bm = bitmap_lookup(graph, str(args["node"]), str(args["name"]))
    check(bm, BUSY | RO)
    if bm.persistent:
        from qmpgraph.drivers import qcow2_bitmaps  # noqa: PLC0415 (optional driver part)

        qcow2_bitmaps.remove_stored(tran, node, str(bm.name))
    if release:
        registry.remove(tran, node, bm)
    return bm


def do_merge(tran: Transaction, graph: BlockGraph, args: dict[str, Any]) -> DirtyBitmap:
    """block_dirty_bitmap_merge: sources into an anonymous bitmap, then into the target."""
    node, dst = bitmap_lookup(graph, str(args["node"]), str(args["target"]))
    anon = DirtyBitmap(None, node_length(node), dst.granularity)
    for src_spec in args["bitmaps"]:
        if isinstance(src_spec, str):
            src = registry.find(node, src_spec)
            if src is None:
                raise GenericError(f"Dirty bitmap '{src_spec}' not found")
        else:
            _, src = bitmap_lookup(graph, str(src_spec["node"]), str(src_spec["name"]))
        # qsd 7.2 checks the target after each source's lookup and before
        # that source's own checks: a missing first source is reported before
        # a read-only target, a read-only target before a size mismatch.
        check(dst, DEFAULT)
        _merge_checks(anon, src)
        anon.merge_from(src)
    _merge_checks(dst, anon)
    merged = DirtyBitmap(None, dst.size, dst.granularity)
    merged.bits = bytearray(dst.bits)
    merged.merge_from(anon)
    registry.change_bits(tran, dst, merged.bits)
    return dst


def _merge_checks(dst: DirtyBitmap, src: DirtyBitmap) -> None:
    """bdrv_merge_dirty_bitmap's checks."""
    check(dst, DEFAULT)
    check(src, ALLOW_RO)
    if src.size != dst.size:
        raise GenericError(
            f"Bitmaps are of different sizes (destination size is {dst.size}, "
            f"source size is {src.size}) and can't be merged"
        )


# -- the QMP commands ----------------------------------------------------------------


@command("block-dirty-bitmap-add")
def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create a dirty bitmap on a node."""
    with ctx.daemon.graph_transaction("block-dirty-bitmap-add", args) as tran:
        do_add(tran, ctx.daemon.graph, args)


@command("block-dirty-bitmap-remove")
def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Delete a dirty bitmap (and its stored copy in a qcow2 image)."""
    with ctx.daemon.graph_transaction("block-dirty-bitmap-remove", args) as tran:
        do_remove(tran, ctx.daemon.graph, args, release=True)


@command("block-dirty-bitmap-clear")
def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Reset every bit of a bitmap."""
    with ctx.daemon.graph_transaction("block-dirty-bitmap-clear", args) as tran:
        _, bm = bitmap_lookup(ctx.daemon.graph, str(args["node"]), str(args["name"]))
        check(bm, DEFAULT)
        registry.change_bits(tran, bm, bytes(len(bm.bits)))


def _set_enabled(ctx: CommandContext, args: dict[str, Any], kind: str, enabled: bool) -> None:
    with ctx.daemon.graph_transaction(kind, args) as tran:
        _, bm = bitmap_lookup(ctx.daemon.graph, str(args["node"]), str(args["name"]))
        check(bm, ALLOW_RO)
        registry.change_flags(tran, bm, disabled=not enabled)


@command("block-dirty-bitmap-enable")
def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Start recording writes."""
    _set_enabled(ctx, args, "block-dirty-bitmap-enable", True)


@command("block-dirty-bitmap-disable")
def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop recording writes."""
    _set_enabled(ctx, args, "block-dirty-bitmap-disable", False)


@command("block-dirty-bitmap-merge")
def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> None:
    """OR bitmaps into a target bitmap (unchanged on any error)."""
    with ctx.daemon.graph_transaction("block-dirty-bitmap-merge", args) as tran:
        do_merge(tran, ctx.daemon.graph, args)


@command("x-debug-block-dirty-bitmap-sha256")
def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext, args: dict[str, Any]) -> dict[str, str]:
    """The sha256 of a bitmap's serialized bits (QEMU's HBitmap last level)."""
    _, bm = bitmap_lookup(ctx.daemon.graph, str(args["node"]), str(args["name"]))
    return {"sha256": bm.sha256()}


# -- transaction actions (blockdev.c) --------------------------------------------------


@action("block-dirty-bitmap-add")
class AddAction(BlkAction):
    """Add the bitmap; the engine abort removes it again."""

    def prepare(self, tran: Transaction) -> None:
        """block_dirty_bitmap_add_prepare."""
        self.check_completion_mode()
        do_add(tran, self.graph, self.data)


@action("block-dirty-bitmap-remove")
class RemoveAction(BlkAction):
    """Keep the bitmap until commit, busy and not to be stored; release on commit."""

    def prepare(self, tran: Transaction) -> None:
        """block_dirty_bitmap_remove_prepare."""
        self.check_completion_mode()
        bm = do_remove(tran, self.graph, self.data, release=False)
        registry.change_flags(tran, bm, skip_store=True, busy=True)
        self.bitmap = bm

    def commit(self, tran: Transaction) -> None:
        """Release the bitmap."""
        node, bm = _owner(self.graph, self.bitmap)
        registry.change_flags(tran, bm, busy=False)
        registry.remove(tran, node, bm)


def _owner(graph: BlockGraph, bm: DirtyBitmap) -> tuple[Node, DirtyBitmap]:
    for node in graph.named_nodes_oldest_first():
        if any(b is bm for b in registry.bitmaps_of(node)):
            return node, bm
    raise AssertionError("a bitmap held by a transaction action vanished")


@action("block-dirty-bitmap-clear")
class ClearAction(BlkAction):
    """Clear the bitmap; the backup in the undo record restores it on abort."""

    def prepare(self, tran: Transaction) -> None:
        """block_dirty_bitmap_clear_prepare."""
        self.check_completion_mode()
        _, bm = bitmap_lookup(self.graph, str(self.data["node"]), str(self.data["name"]))
        check(bm, DEFAULT)
        registry.change_bits(tran, bm, bytes(len(bm.bits)))


class _EnableDisable(BlkAction):
    enable = True

    def prepare(self, tran: Transaction) -> None:
        """block_dirty_bitmap_enable/disable_prepare."""
        self.found: DirtyBitmap | None = None
        self.done = False
        self.check_completion_mode()
        _, bm = bitmap_lookup(self.graph, str(self.data["node"]), str(self.data["name"]))
        self.found = bm
        check(bm, ALLOW_RO)
        registry.change_flags(tran, bm, disabled=not self.enable)
        self.done = True

    def abort(self, tran: Transaction) -> None:
        """7.2's abort reads ``was_enabled`` even when the check failed (false then)."""
        found = getattr(self, "found", None)
        if self.enable and found is not None and not self.done:
            found.disabled = True
            registry._bump()


@action("block-dirty-bitmap-enable")
class EnableAction(_EnableDisable):
    """Enable the bitmap, remembering the old state."""

    enable = True


@action("block-dirty-bitmap-disable")
class DisableAction(_EnableDisable):
    """Disable the bitmap, remembering the old state."""

    enable = False


@action("block-dirty-bitmap-merge")
class MergeAction(BlkAction):
    """Merge into the target, keeping a backup for abort."""

    def prepare(self, tran: Transaction) -> None:
        """block_dirty_bitmap_merge_prepare."""
        self.check_completion_mode()
        do_merge(tran, self.graph, self.data)


# -- NBD exports (nbd_export_create / nbd_export_delete) --------------------------------


def export_bitmaps(
    tran: Transaction, graph: BlockGraph, node: Node, specs: list[Any], readonly: bool
) -> tuple[DirtyBitmap, ...]:
    """The bitmaps an NBD export serves, checked as QEMU 7.2 checks them, then busy.

    A plain name is looked up on the exported node and down its filtered or
    COW chain; a node/name pair by ``block_dirty_bitmap_lookup``.
    """
    found: list[DirtyBitmap] = []
    for spec in specs:
        if isinstance(spec, str):
            cur: Node | None = node
            bm: DirtyBitmap | None = None
            while cur is not None:
                bm = registry.find(cur, spec)
                if bm is not None:
                    break
                edge = filter_or_cow_child(cur)
                cur = edge.child if edge is not None else None
            if bm is None or cur is None:
                raise GenericError(f"Bitmap '{spec}' is not found")
            if readonly and not cur.read_only and not bm.disabled:
                raise GenericError(f"Enabled bitmap '{spec}' incompatible with readonly export")
        else:
            _, bm = bitmap_lookup(graph, str(spec["node"]), str(spec["name"]))
        check(bm, ALLOW_RO)
        found.append(bm)
    for bm in found:
        registry.change_flags(tran, bm, busy=True)
    return tuple(found)


def release_export_bitmaps(tran: Transaction, bitmaps: tuple[DirtyBitmap, ...]) -> None:
    """nbd_export_delete: the export's bitmaps are no longer busy."""
    for bm in bitmaps:
        registry.change_flags(tran, bm, busy=False)


def bitmap_extents(
    bm: DirtyBitmap, offset: int, length: int, add: Callable[[int, int], bool]
) -> None:
    """bitmap_to_extents: clean and dirty extents of ``[offset, offset+length)``.

    ``add(length, flags)`` returns False once the reply is full (then stop).
    """
    end = offset + length
    start = offset
    for lo, hi in bm.dirty_ranges(offset, end):
        if not add(lo - start, 0) or not add(hi - lo, STATE_DIRTY):
            return
        start = hi
    add(end - start, 0)
