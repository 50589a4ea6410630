"""Which node holds which dirty bitmaps, their undo records, and the write hook.

Each node's bitmaps are a list, newest first (QEMU inserts at the head of
``bs->dirty_bitmaps`` and lists them in that order).  The lists are kept
beside the graph, keyed by the ``Node`` object, so a deleted node's bitmaps
go with it (``forget``) and a new node of the same name starts with none.

Every change made by a command goes through an engine ``Action`` holding the
old values (``add``, ``remove``, ``change_flags``, ``change_bits``,
``truncate_node``, ``set_successor``, ``abdicate``), so an aborted
transaction puts the bitmaps back exactly; the bitmaps of every named node
join the graph digest through ``register_state_source("bitmaps", ...)``.

``mark_dirty`` is what the generic write path calls when a write,
write-zeroes or discard finished on a node (QEMU's
``bdrv_co_write_req_finish``): every enabled bitmap of the node gets the
range, and a node that grew past a bitmap's end (a file written beyond EOF)
grows the bitmap first, to the sector-rounded end.

What does not live here: the bitmap itself (``model.py``), the QMP commands
and their checks (``qmpgraph.commands.bitmaps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.graph.digest import register_state_source
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Node
from qmpgraph.transactions.engine import Action, Transaction

_SECTOR = 512

_TABLES: dict[Node, list[DirtyBitmap]] = {}
# The graph each node with bitmaps belongs to (several daemons share a process in tests).
_GRAPHS: dict[Node, BlockGraph] = {}
_generation = 0


def generation() -> int:
    """A counter that moves whenever any bitmap's bits or flags change.

    Cached query replies that show bitmaps are valid while it stays.
    """
    return _generation


def touch() -> None:
    """Say that flags changed outside an undo record (after a commit)."""
    _bump()


def _bump() -> None:
    global _generation  # noqa: PLW0603 (one process-wide counter, read via generation)
    _generation += 1


def bitmaps_of(node: Node) -> list[DirtyBitmap]:
    """The node's bitmaps, newest first (a copy: change them through actions)."""
    return list(_TABLES.get(node, ()))


def find(node: Node, name: str) -> DirtyBitmap | None:
    """bdrv_find_dirty_bitmap: the node's bitmap called ``name``."""
    for bm in _TABLES.get(node, ()):
        if bm.name == name:
            return bm
    return None


def prune(graph: BlockGraph) -> None:
    """Forget the bitmaps of nodes that left ``graph`` (deleted nodes)."""
    alive = {id(n) for n in graph.named_nodes_oldest_first()}
    for node in [n for n, g in _GRAPHS.items() if g is graph and id(n) not in alive]:
        forget(node)


def forget(node: Node) -> list[DirtyBitmap]:
    """Drop every bitmap of a closed node (bdrv_release_named_dirty_bitmaps)."""
    gone = _TABLES.pop(node, [])
    _GRAPHS.pop(node, None)
    if gone:
        _bump()
    return gone


def mark_dirty(node: Node, offset: int, length: int) -> None:
    """bdrv_set_dirty after a finished write-like request on ``node``."""
    table = _TABLES.get(node)
    if not table or length <= 0:
        return
    end = offset + length
    for bm in table:
        if end > bm.size:
            bm.truncate((end + _SECTOR - 1) // _SECTOR * _SECTOR)
        if not bm.disabled:
            bm.set_range(offset, length)
    _bump()


@dataclass(frozen=True, slots=True)
class TruncateUndo(Action):
    """A bitmap was resized; abort restores its size and bits."""

    name: ClassVar[str] = "bitmap-truncate"
    bitmap: DirtyBitmap
    size: int
    backup: bytes

    def abort(self) -> None:
        self.bitmap.size = self.size
        self.bitmap.restore_bits(self.backup)
        _bump()


def truncate_node(tran: Transaction, node: Node, size: int) -> None:
    """bdrv_dirty_bitmap_truncate after a node was resized: every bitmap follows.

    ``size`` is rounded up to whole sectors, as QEMU's total_sectors is.
    """
    size = (size + _SECTOR - 1) // _SECTOR * _SECTOR
    for bm in _TABLES.get(node, ()):
        if bm.size != size:
            tran.add(TruncateUndo(bm, bm.size, bm.copy_bits()))
            bm.truncate(size)
    _bump()


def dirty_anywhere(node: Node) -> bool:
    """Whether ``node`` has any bitmap (a cheap test for the data path)."""
    return node in _TABLES


# -- changes with undo records ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddBitmapUndo(Action):
    """A bitmap was put at the head of a node's list; abort takes it out."""

    name: ClassVar[str] = "bitmap-add"
    node: Node
    bitmap: DirtyBitmap

    def abort(self) -> None:
        _unlink(self.node, self.bitmap)


@dataclass(frozen=True, slots=True)
class RemoveBitmapUndo(Action):
    """A bitmap was taken out of a node's list at ``index``; abort puts it back."""

    name: ClassVar[str] = "bitmap-remove"
    node: Node
    bitmap: DirtyBitmap
    index: int

    def abort(self) -> None:
        _TABLES.setdefault(self.node, []).insert(self.index, self.bitmap)
        _bump()


@dataclass(frozen=True, slots=True)
class FlagsUndo(Action):
    """Some of a bitmap's flags changed; abort restores those (and only those)."""

    name: ClassVar[str] = "bitmap-flags"
    bitmap: DirtyBitmap
    old: tuple[tuple[str, bool], ...]

    def abort(self) -> None:
        for key, value in self.old:
            setattr(self.bitmap, key, value)
        _bump()


@dataclass(frozen=True, slots=True)
class BitsUndo(Action):
    """A bitmap's bits changed (clear, merge); abort restores the backup."""

    name: ClassVar[str] = "bitmap-bits"
    bitmap: DirtyBitmap
    backup: bytes

    def abort(self) -> None:
        self.bitmap.restore_bits(self.backup)
        _bump()


def _unlink(node: Node, bitmap: DirtyBitmap) -> int:
    table = _TABLES[node]
    index = next(i for i, bm in enumerate(table) if bm is bitmap)
    del table[index]
    if not table:
        del _TABLES[node]
    _bump()
    return index


def add(tran: Transaction, graph: BlockGraph, node: Node, bitmap: DirtyBitmap) -> None:
    """Put ``bitmap`` at the head of the list of ``node`` (a node of ``graph``)."""
    _GRAPHS[node] = graph
    _TABLES.setdefault(node, []).insert(0, bitmap)
    _bump()
    tran.add(AddBitmapUndo(node, bitmap))


def remove(tran: Transaction, node: Node, bitmap: DirtyBitmap) -> None:
    """bdrv_release_dirty_bitmap: take ``bitmap`` out of the node's list."""
    index = _unlink(node, bitmap)
    tran.add(RemoveBitmapUndo(node, bitmap, index))


def change_flags(tran: Transaction, bitmap: DirtyBitmap, **changes: bool) -> None:
    """Set some flags (``disabled=True``, ``busy=False``, ...), keeping the old ones."""
    assert set(changes) <= set(DirtyBitmap.FLAG_NAMES)
    old = tuple((key, bool(getattr(bitmap, key))) for key in changes)
    for key, value in changes.items():
        setattr(bitmap, key, value)
    _bump()
    tran.add(FlagsUndo(bitmap, old))


@dataclass(frozen=True, slots=True)
class SuccessorUndo(Action):
    """A bitmap's successor was installed or dropped; abort puts the old one back."""

    name: ClassVar[str] = "bitmap-successor"
    bitmap: DirtyBitmap
    old: DirtyBitmap | None

    def abort(self) -> None:
        self.bitmap.successor = self.old
        _bump()


def set_successor(tran: Transaction, bitmap: DirtyBitmap, successor: DirtyBitmap | None) -> None:
    """Install (or, with None, drop) the anonymous bitmap recording for a frozen one."""
    old = bitmap.successor
    bitmap.successor = successor
    _bump()
    tran.add(SuccessorUndo(bitmap, old))


@dataclass(frozen=True, slots=True)
class AbdicateUndo(Action):
    """A frozen bitmap gave its name and persistence to its successor and left
    the node's list at ``index``; abort puts both back as they were."""

    name: ClassVar[str] = "bitmap-abdicate"
    node: Node
    bitmap: DirtyBitmap
    successor: DirtyBitmap
    index: int
    bitmap_name: str | None
    persistent: tuple[bool, bool]  # the bitmap's, the successor's
    busy: bool

    def abort(self) -> None:
        bm, succ = self.bitmap, self.successor
        succ.name, succ.persistent = None, self.persistent[1]
        bm.name, bm.persistent, bm.busy = self.bitmap_name, self.persistent[0], self.busy
        bm.successor = succ
        _TABLES.setdefault(self.node, []).insert(self.index, bm)
        _bump()


def abdicate(tran: Transaction, node: Node, bitmap: DirtyBitmap) -> DirtyBitmap:
    """bdrv_dirty_bitmap_abdicate: the successor takes the bitmap's name and
    persistence and keeps its own place in the list; the bitmap is released."""
    successor = bitmap.successor
    assert successor is not None
    undo = (bitmap.name, (bitmap.persistent, successor.persistent), bitmap.busy)
    successor.name, successor.persistent = bitmap.name, bitmap.persistent
    bitmap.name, bitmap.persistent, bitmap.busy, bitmap.successor = None, False, False, None
    index = _unlink(node, bitmap)
    tran.add(AbdicateUndo(node, bitmap, successor, index, *undo))
    return successor


def change_bits(tran: Transaction, bitmap: DirtyBitmap, bits: bytes | bytearray) -> None:
    """Replace the bits (a clear or a merge), keeping a backup for abort."""
    backup = bitmap.copy_bits()
    bitmap.restore_bits(bytes(bits))
    _bump()
    tran.add(BitsUndo(bitmap, backup))


# -- the digest ------------------------------------------------------------------


def describe(bm: DirtyBitmap) -> list[Any]:
    """A bitmap's canonical picture: name, geometry, flags and the bits' digest."""
    return [bm.name, bm.size, bm.granularity, list(bm.flags()), bm.sha256()]


def bitmaps_state(graph: BlockGraph) -> list[Any] | None:
    """The bitmaps of the graph's named nodes, for the graph digest (None without any)."""
    out = [
        [node.node_name, [describe(bm) for bm in _TABLES[node]]]
        for node in graph.named_nodes_oldest_first()
        if node in _TABLES
    ]
    return out or None


register_state_source("bitmaps", bitmaps_state)
