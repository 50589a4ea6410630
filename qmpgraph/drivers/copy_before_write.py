"""The ``copy-before-write`` filter: old data goes to ``target`` before a write.

QEMU 7.2 (block/copy-before-write.c): ``file`` (the source,
FILTERED|PRIMARY) opens first, then ``target`` (DATA), then ``bitmap`` is
looked up (its node first: "Node '%s' not found"; qmpgraph has no dirty
bitmaps, so a found node still fails with "Dirty bitmap '%s' not found").
Permissions: on ``target`` WRITE, sharing all but RESIZE; on the source the
default rule, plus CONSISTENT_READ for writers and WRITE|RESIZE unshared
once the node has parents.  Not reopenable.  No data path lives here.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.drivers.base import ChildSpec, OpenContext
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms
from qmpgraph.graph.perms import PERM_ALL, Perm, Role


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
        del edge
        if not role & Role.FILTERED:
            return int(Perm.WRITE), PERM_ALL & ~Perm.RESIZE
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        if node.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return int(nperm), int(nshared)


DRIVERS = (CopyBeforeWrite(),)
