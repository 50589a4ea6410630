"""The ``copy-before-write`` filter: old data goes to ``target`` before a write.

QEMU 7.2 (block/copy-before-write.c): ``file`` (the source,
FILTERED|PRIMARY) opens first, then ``target`` (DATA), then ``bitmap`` is
looked up (its node first: "Node '%s' not found", then "Dirty bitmap '%s'
not found") and merged into the copy bitmap: a copy of it as it is at open
is kept (``initial_bitmap``) for the data path, which copies, and lets
snapshot readers read, only the clusters it marks.
Permissions: on ``target`` WRITE, sharing all but RESIZE; on the source the
default rule, plus CONSISTENT_READ for writers and WRITE|RESIZE unshared
once the node has parents.  Not reopenable.  Its exact filename is its
source's filename (``json:`` or not), as cbw_refresh_filename copies it.
No data path lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from qmpgraph import bitmaps
from qmpgraph.bitmaps.model import DirtyBitmap, next_seq
from qmpgraph.drivers.base import ChildSpec, OpenContext, file_child, node_size
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.protocol.qjson import dumps
from qmpgraph.transactions.engine import Action

# sizeof(bs->filename): QEMU truncates longer names.
_PATH_MAX = 4096


def file_child_filename(
    node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
) -> str:
    """The ``file`` child's filename: its exact filename, else its ``json:``
    name (its full options are under "file")."""
    edge = node.file
    if edge is None or edge.child is None:
        return ""
    return exact(edge.child) or ("json:" + dumps(full_options.get("file")))[: _PATH_MAX - 1]


class CopyBeforeWrite(FilterDriver):
    """copy-before-write: copies old data to ``target`` before guest writes."""

    format_name = "copy-before-write"
    supports_reopen = False
    options = frozenset({"bitmap", "on-cbw-error", "cbw-timeout"})
    children = (*FilterDriver.children, ChildSpec("target", Role.DATA))

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open the source (``file``), then ``target``, then look up ``bitmap``."""
        super().open(ctx, node, options)
        ctx.open_child(node, options, "target", Role.DATA)
        bitmap = options.get("bitmap")
        if isinstance(bitmap, dict):
            owner = str(bitmap.get("node"))
            found = ctx.graph.lookup(owner)
            if found is None:
                bb = ctx.graph.backend_by_name(owner)
                found = bb.root.child if bb is not None and bb.root is not None else None
            if found is None:
                raise GenericError(f"Node '{owner}' not found")
            user = bitmaps.find(found, str(bitmap.get("name")))
            if user is None:
                raise GenericError(f"Dirty bitmap '{bitmap.get('name')}' not found")
            _INITIAL[node.id] = _copy_bitmap(node, user)
        _OPEN_SEQ[node.id] = next_seq()
        ctx.tran.add(_ForgetInitial(node.id))

    def refresh_exact_filename(
        self, node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
    ) -> str:
        """cbw_refresh_filename: the source's filename."""
        return file_child_filename(node, exact, full_options)

    def child_perm(
        self,
        node: Node,
        edge: Edge | None,
        role: int,
        perm: int,
        shared: int,
        *,
        queue: ReopenQueue | None,
    ) -> tuple[int, int]:
        """Target: WRITE, shares all but RESIZE; source: see section 3.4."""
        del edge
        if not role & Role.FILTERED:
            return int(Perm.WRITE), PERM_ALL & ~Perm.RESIZE
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        if node.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return int(nperm), int(nshared)


# The user bitmap of each cbw node opened with ``bitmap``, as it was at open
# (block_copy_state_new merges it into the copy bitmap then).
_INITIAL: dict[int, DirtyBitmap] = {}
# When each cbw node made its internal bitmaps (``next_seq`` order).
_OPEN_SEQ: dict[int, int] = {}


def bitmaps_seq(node: Node) -> int:
    """The creation order of a cbw node's internal bitmaps (for listings)."""
    return _OPEN_SEQ.get(node.id, 0)


def initial_bitmap(node: Node) -> DirtyBitmap | None:
    """The areas a cbw node copies and lets snapshot readers read (None: all)."""
    return _INITIAL.get(node.id)


@dataclass(frozen=True, slots=True)
class _ForgetInitial(Action):
    """The cbw open failed later: forget its bitmap copy."""

    name: ClassVar[str] = "cbw-bitmap"
    node_id: int

    def abort(self) -> None:
        _INITIAL.pop(self.node_id, None)
        _OPEN_SEQ.pop(self.node_id, None)


def _copy_bitmap(node: Node, user: DirtyBitmap) -> DirtyBitmap:
    """bdrv_merge_dirty_bitmap's checks (prefixed as block_copy_state_new does), then a copy."""
    prefix = (
        "Cannot create block-copy-state: "
        f"Failed to merge bitmap '{user.name}' to internal copy-bitmap: "
    )
    busy = "is currently in use by another operation and cannot be used"
    if user.busy:
        raise GenericError(f"{prefix}Bitmap '{user.name}' {busy}")
    if user.inconsistent:
        raise GenericError(f"{prefix}Bitmap '{user.name}' is inconsistent and cannot be used")
    source = file_child(node)
    size = (node_size(source) + 511) // 512 * 512
    if user.size != size:
        raise GenericError(
            f"{prefix}Bitmaps are of different sizes (destination size is {size}, "
            f"source size is {user.size}) and can't be merged"
        )
    copy = DirtyBitmap(None, user.size, user.granularity)
    copy.restore_bits(user.copy_bits())
    return copy


DRIVERS = (CopyBeforeWrite(),)
