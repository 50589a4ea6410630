"""``block_resize`` and ``block-set-write-threshold``.

block_resize follows qmp_block_resize and bdrv_co_truncate of QEMU 7.2: the
node lookup (``device`` names a BlockBackend, ``node-name`` a node), the size
check, the RESIZE operation blocker, a temporary anonymous BlockBackend that
takes RESIZE (so permission conflicts read "an unnamed block device ... as
'root' child"), then the truncate chain: at each level the maximum-length and
read-only checks, then the driver (``file`` truncates the host file, ``raw``
resizes its window, ``qcow2`` rewrites its metadata through
``qmpgraph.drivers.qcow2_resize``, filters pass the request to their filtered
child, anything else cannot resize).  The whole command is one graph
transaction: an abort restores every byte written to an image.

Writes and truncations of qcow2 metadata mark the image file node's dirty
bitmaps as QEMU's requests through ``bs->file`` do (``MarkingWriter``,
``mark_metadata_writes``, ``mark_discard``; internal snapshots use them too).

The write threshold of a node (bs->write_threshold_offset) lives in a table
here, changed through an undoable action; query-named-block-nodes reads it
with ``write_threshold(node)``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.drivers import qcow2_resize
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.drivers.qcow2_discard import FreedClusters, passed_types
from qmpgraph.drivers.raw import RawState
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, filter_child
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.transactions.actions import add_root_parent, remove_root_parent, set_runtime
from qmpgraph.transactions.composite import detach_child, root_attach
from qmpgraph.transactions.engine import Action, Transaction

# BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB.
_MAX_LENGTH = ((1 << 63) - 1) // (1 << 30) * (1 << 30)
_UINT64 = 1 << 64

_thresholds: dict[int, int] = {}
# qcow2's free_cluster_index per open node (QEMU keeps it in BDRVQcow2State).
_free_hints: dict[int, int] = {}


def write_threshold(node: Node) -> int:
    """The node's write threshold as BlockDeviceInfo shows it (an int64)."""
    value = _thresholds.get(node.id, 0)
    return value - _UINT64 if value >= 1 << 63 else value


@dataclass(frozen=True, slots=True)
class TableUndo(Action):
    """Undo of a change in one of this module's per-node tables."""

    name = "node-table"
    table: dict[int, int]
    key: int
    old: int | None

    def abort(self) -> None:
        if self.old is None:
            self.table.pop(self.key, None)
        else:
            self.table[self.key] = self.old


def _set_table(tran: Transaction, table: dict[int, int], key: int, value: int) -> None:
    tran.add(TableUndo(table, key, table.get(key)))
    table[key] = value


@dataclass(frozen=True, slots=True)
class ImageUndo(Action):
    """An image file rewritten in place: put every byte back on abort."""

    name = "image-write"
    io: qcow2_resize.ImageWriter

    def abort(self) -> None:
        self.io.restore()


@dataclass(slots=True)
class MarkingWriter(qcow2_resize.ImageWriter):
    """An ``ImageWriter`` that remembers where it wrote, so that the image file
    node's dirty bitmaps can be marked as QEMU's writes through ``bs->file``
    mark them (``mark_metadata_writes``)."""

    writes: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False

    def write(self, offset: int, data: bytes) -> None:
        """Write (journaled) and remember the range."""
        qcow2_resize.ImageWriter.write(self, offset, data)
        self.writes.append((offset, len(data)))

    def truncate(self, length: int) -> None:
        """Set the length (journaled) and remember that it was set."""
        qcow2_resize.ImageWriter.truncate(self, length)
        self.truncated = True


# Offset bits of L1 and refcount table entries.
_TABLE_OFFSET = 0x00FF_FFFF_FFFF_FE00


def mark_metadata_writes(image: Node | None, io: MarkingWriter) -> None:
    """bdrv_set_dirty on the image file node for the qcow2 metadata written
    through ``io``.  QEMU writes L2 tables and refcount blocks whole, from its
    metadata caches, and the refcount table whole: a write inside one of them
    marks all of it (the tables as the header now lists them)."""
    writes, io.writes = io.writes, []
    if image is None or not bitmap_registry.bitmaps_of(image) or not writes:
        return
    header = io.read(0, 72)
    cluster_bits, l1_size, l1_offset, reftable, reftable_clusters = struct.unpack_from(
        ">20xI12xIQQI", header
    )
    cs = 1 << cluster_bits
    entries = io.read(l1_offset, l1_size * 8) + io.read(reftable, reftable_clusters * cs)
    tables = {e & _TABLE_OFFSET for (e,) in struct.iter_unpack(">Q", entries)} - {0}
    for offset, length in writes:
        start = offset - offset % cs
        if reftable <= offset < reftable + reftable_clusters * cs:
            bitmap_registry.mark_dirty(image, reftable, reftable_clusters * cs)
        elif offset + length <= start + cs and start in tables:
            bitmap_registry.mark_dirty(image, start, cs)
        else:
            bitmap_registry.mark_dirty(image, offset, length)


def mark_discard(image: Node, offset: int, length: int) -> None:
    """bdrv_set_dirty for clusters discarded in the image file.  qmpgraph
    discards once the command commits, after any cut of the file that QEMU
    makes later (and which then drops the marks): marks past the bitmaps'
    current end are dropped here, and never grow them."""
    bitmaps = bitmap_registry.bitmaps_of(image)
    if bitmaps:
        end = min(offset + length, bitmaps[0].size)
        if end > offset:
            bitmap_registry.mark_dirty(image, offset, end - offset)


def lookup_bs(graph: BlockGraph, device: str | None, node_name: str | None) -> Node:
    """bdrv_lookup_bs: a BlockBackend by ``device``, else a node by ``node-name``."""
    if device is not None:
        bb = graph.backend_by_name(device)
        if bb is not None:
            if bb.root is None or bb.root.child is None:
                raise GenericError(f"Device '{device}' has no medium")
            return bb.root.child
    if node_name is not None:
        node = graph.lookup(node_name)
        if node is not None:
            return node
    raise GenericError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def _file_fd(node: Node) -> int:
    state = node.state
    if not isinstance(state, FileState) or state.lock.closed:
        raise GenericError("Image format driver does not support resize")
    return state.lock.fd


def _truncate_file(tran: Transaction, node: Node, size: int) -> None:
    fd = _file_fd(node)
    io = qcow2_resize.ImageWriter(fd, os.fstat(fd).st_size)
    tran.add(ImageUndo(io))
    old_length = io.length
    try:
        io.truncate(size)
    except OSError as err:
        raise GenericError(f"Could not resize file: {os.strerror(err.errno or 0)}") from err
    if old_length == 0 and size > 0:
        # file-posix's allocate_first_block: speeds up later alignment probes.
        io.write(0, bytes(512 if size < 4096 else 4096))


def _truncate_qcow2(tran: Transaction, node: Node, size: int) -> None:
    state = node.state
    assert isinstance(state, Qcow2State)
    if size % 512:
        raise GenericError("The new size must be a multiple of 512")
    image = node.file.child if node.file is not None else None
    if image is None or image.format_name != "file":
        raise GenericError("Image format driver does not support resize")
    fd = _file_fd(image)
    io = MarkingWriter(fd, os.fstat(fd).st_size)
    tran.add(ImageUndo(io))
    header = state.header
    # Freed clusters are discarded in the file once the resize commits (an
    # abort puts the journaled bytes back).
    passed = passed_types(node)
    discards = FreedClusters(fd, header.cluster_bits, passed) if passed else None
    if discards is not None:
        discards.on_discard = lambda offset, length: mark_discard(image, offset, length)
        tran.on_commit(discards.process)
    try:
        result = qcow2_resize.resize(
            io,
            size,
            nb_snapshots=header.nb_snapshots,
            version=header.version,
            free_hint=_free_hints.get(node.id, 0),
            discards=discards,
        )
    finally:  # what was written stays marked, as in QEMU
        mark_metadata_writes(image, io)
    if io.truncated:
        # The file was cut (bdrv_co_truncate on bs->file): its bitmaps follow.
        bitmap_registry.truncate_node(tran, image, io.length)
    _set_table(tran, _free_hints, node.id, result.free_hint)
    if header.has_data_file:
        for edge in node.children:
            if edge.name == "data-file" and edge.child is not None:
                truncate(tran, edge.child, size)
    header = replace(
        header, size=size, l1_size=result.l1_size, l1_table_offset=result.l1_table_offset
    )
    set_runtime(tran, node, state=replace(state, header=header))


def truncate(tran: Transaction, node: Node, size: int) -> None:
    """bdrv_co_truncate on ``node`` (PREALLOC_MODE_OFF), recursing as QEMU does."""
    if size < 0:
        raise GenericError("Image size cannot be negative")
    if size > _MAX_LENGTH:
        raise GenericError(f"offset({size}) exceeds maximum({_MAX_LENGTH})")
    if node.read_only:
        raise GenericError("Image is read-only")
    drv = node.driver
    name = node.format_name
    if name == "file":
        _truncate_file(tran, node, size)
    elif name == "raw":
        state = node.state
        assert isinstance(state, RawState)
        if state.has_size:
            raise GenericError("Cannot resize fixed-size raw disks")
        if (1 << 63) - 1 - size < state.offset:
            raise GenericError("Disk size too large for the chosen offset")
        set_runtime(tran, node, state=replace(state, size=size))
        child = node.file.child if node.file is not None else None
        assert child is not None
        truncate(tran, child, size + state.offset)
    elif name == "qcow2":
        _truncate_qcow2(tran, node, size)
    elif drv is not None and drv.is_filter and (edge := filter_child(node)) is not None:
        assert edge.child is not None
        truncate(tran, edge.child, size)
    else:
        raise GenericError("Image format driver does not support resize")
    bitmap_registry.truncate_node(tran, node, size)


@command("block_resize")
def block_resize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Resize a node (and what lies beneath it) to ``size`` bytes."""
    daemon = ctx.daemon
    device = args.get("device")
    node_name = args.get("node-name")
    size = int(args["size"])
    with daemon.graph_transaction("block_resize", args) as tran:
        graph = daemon.graph
        node = lookup_bs(graph, device, node_name)
        if size < 0:
            raise GenericError("Parameter 'size' expects a >0 size")
        if node.op_blockers.get("resize"):
            raise GenericError(f"Device '{device if device is not None else '(null)'}' is in use")
        # blk_new_with_bs(bs, BLK_PERM_RESIZE, BLK_PERM_ALL): a temporary user.
        bb = BlockBackend()
        add_root_parent(tran, graph, bb)
        edge = root_attach(
            tran,
            graph,
            bb,
            node,
            "root",
            role=Role.FILTERED | Role.PRIMARY,
            perm=int(Perm.RESIZE),
            shared=PERM_ALL,
        )
        truncate(tran, node, size)
        detach_child(tran, graph, edge)
        remove_root_parent(tran, graph, bb)


@command("block-set-write-threshold")
def block_set_write_threshold(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Set the offset past which a write raises BLOCK_WRITE_THRESHOLD (0 disables)."""
    daemon = ctx.daemon
    name = str(args["node-name"])
    with daemon.graph_transaction("block-set-write-threshold", args) as tran:
        node = daemon.graph.lookup(name)
        if node is None:
            raise GenericError(f"Device '{name}' not found")
        _set_table(tran, _thresholds, node.id, int(args["write-threshold"]) % _UINT64)
