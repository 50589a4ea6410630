"""Filter drivers and snapshot-access: children, roles and permission rules.

``copy-before-write`` (``file`` FILTERED|PRIMARY plus ``target`` DATA),
``copy-on-read``, ``compress``, ``throttle`` and ``preallocate`` (``file``
FILTERED|PRIMARY), ``snapshot-access`` (not a filter: ``file`` DATA|PRIMARY,
takes nothing, shares everything), and the internal job filters
``commit_top``/``mirror_top`` (``filtered_child_is_backing``), which are not
offered to blockdev-add.  No data path lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms, filter_default_perms
from qmpgraph.graph.perms import PERM_ALL, OpenFlag, Perm, Role
from qmpgraph.protocol.qjson import qdict_order

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph

_FILTERED = Role.FILTERED | Role.PRIMARY
# Drivers that write compressed clusters (block_driver_can_compress).
_COMPRESSING = frozenset({"qcow2", "qcow", "vmdk"})


class _SimpleFilter(Driver):
    """A filter with one FILTERED|PRIMARY ``file`` child."""

    is_filter = True
    children = (ChildSpec("file", _FILTERED),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open the filtered child."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", _FILTERED)

    def size(self, node: Node) -> int:
        """The filtered child's size."""
        edge = node.file or node.backing
        if edge is None or edge.child is None or edge.child.driver is None:
            return 0
        return edge.child.driver.size(edge.child)


class CopyOnRead(_SimpleFilter):
    """copy-on-read: passthrough, plus WRITE_UNCHANGED unless inactive."""

    format_name = "copy-on-read"
    options = frozenset({"bottom"})
    supports_reopen = False

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """cor_open: ``file``, then the ``bottom`` node (which may not be a filter)."""
        super().open(ctx, node, options)
        bottom = options.get("bottom")
        if bottom is not None:
            found = ctx.graph.lookup(str(bottom))
            if found is None:
                raise GenericError(f"Bottom node '{bottom}' not found")
            if found.driver is not None and found.driver.is_filter:
                raise GenericError(f"Bottom node '{bottom}' is a filter")

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
        """Filter passthrough plus WRITE_UNCHANGED (copy-on-read writes back)."""
        nperm, nshared = filter_default_perms(perm, shared)
        if not node.open_flags & OpenFlag.INACTIVE:
            nperm |= Perm.WRITE_UNCHANGED
        return nperm, nshared


class Compress(_SimpleFilter):
    """compress: compressed writes through the default filter rule."""

    format_name = "compress"
    supports_reopen = False

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """compress_open: the child's driver must write compressed clusters."""
        super().open(ctx, node, options)
        child = node.file.child if node.file is not None else None
        name = child.format_name if child is not None else None
        if name not in _COMPRESSING:
            raise GenericError(
                f"Compression is not supported for underlying format: {name or '(no format)'}"
            )


class Throttle(_SimpleFilter):
    """throttle: I/O limits by group; the default filter rule."""

    format_name = "throttle"
    options = frozenset({"throttle-group"})
    mutable_options = options

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """throttle_reopen_prepare: the (required) group must exist.

        Moving the node's group membership on commit is the throttle module's
        business (``qmpgraph.drivers.throttle``); the node keeps its state here.
        """
        del node
        # Imported here: the objects package imports the drivers.
        from qmpgraph.objects import tree_for  # noqa: PLC0415
        from qmpgraph.objects.throttle_group import ThrottleGroup  # noqa: PLC0415

        name = options.pop("throttle-group", None)
        if name is not None:
            obj = tree_for(graph).lookup(str(name))
            if not isinstance(obj, ThrottleGroup) or not obj.initialized:
                raise GenericError(f"Throttle group '{name}' does not exist")
        return None


class Preallocate(_SimpleFilter):
    """preallocate: takes WRITE|RESIZE and unshares them when its parents hold both."""

    format_name = "preallocate"
    options = frozenset({"prealloc-align", "prealloc-size"})

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """preallocate_open: ``file``, then the sizes (QemuOpts) and the alignment."""
        super().open(ctx, node, options)
        for key in qdict_order([k for k in sorted(self.options) if k in options]):
            if int(options[key]) < 0:
                raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")
        align = int(options.get("prealloc-align", 1 << 20))
        if align % 512:
            raise GenericError(
                "prealloc-align parameter of preallocate filter is not aligned to 512"
            )
        child = node.file.child if node.file is not None else None
        child_align = child.driver.request_alignment(child) if child and child.driver else 1
        if align % child_align:
            raise GenericError(
                "prealloc-align parameter of preallocate filter is not aligned to request "
                f"alignment of underlying node ({child_align})"
            )

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """preallocate_reopen_prepare: re-reads both sizes (neither is mutable)."""
        del graph, node
        align = options.pop("prealloc-align", 1 << 20)
        options.pop("prealloc-size", None)
        if int(align) % 512:
            raise GenericError(
                "prealloc-align parameter of preallocate filter is not aligned to 512"
            )
        return None

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
        """Default, then WRITE|RESIZE forced and unshared when parents need both."""
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        both = Perm.WRITE | Perm.RESIZE
        if perm & both == both:
            nperm |= both
            nshared &= ~both
        return int(nperm), int(nshared)


class CopyBeforeWrite(Driver):
    """copy-before-write: copies old data to ``target`` before guest writes."""

    format_name = "copy-before-write"
    is_filter = True
    supports_reopen = False
    options = frozenset({"bitmap", "on-cbw-error", "cbw-timeout"})
    children = (ChildSpec("file", _FILTERED), ChildSpec("target", Role.DATA))

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open the source (``file``), then ``target``, then look up ``bitmap``."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", _FILTERED)
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
            # qmpgraph has no dirty bitmaps (block-dirty-bitmap-add is not implemented).
            raise GenericError(f"Dirty bitmap '{bitmap.get('name')}' not found")

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
        if not role & Role.FILTERED:
            return int(Perm.WRITE), PERM_ALL & ~Perm.RESIZE
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        if node.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return int(nperm), int(nshared)

    def size(self, node: Node) -> int:
        """The source's size."""
        edge = node.file
        if edge is None or edge.child is None or edge.child.driver is None:
            return 0
        return edge.child.driver.size(edge.child)


class SnapshotAccess(Driver):
    """snapshot-access: reads a cbw node's snapshot; not a filter."""

    format_name = "snapshot-access"
    supports_reopen = False
    children = (ChildSpec("file", Role.DATA | Role.PRIMARY),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file`` (the cbw node) with DATA|PRIMARY."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", Role.DATA | Role.PRIMARY)

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
        """Takes nothing, shares everything."""
        return 0, PERM_ALL


class CommitTop(Driver):
    """commit_top: the commit job's implicit filter; its filtered child is ``backing``."""

    format_name = "commit_top"
    is_filter = True
    filtered_child_is_backing = True
    children = (ChildSpec("backing", _FILTERED),)

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
        """Takes nothing, shares everything."""
        return 0, PERM_ALL


class MirrorTop(Driver):
    """mirror_top: the mirror job's implicit filter (default rule while running)."""

    format_name = "mirror_top"
    is_filter = True
    filtered_child_is_backing = True
    children = (ChildSpec("backing", _FILTERED),)


DRIVERS = (CopyOnRead(), Compress(), Throttle(), Preallocate(), CopyBeforeWrite(), SnapshotAccess())
INTERNAL_DRIVERS = (CommitTop(), MirrorTop())
