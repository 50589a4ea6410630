"""The ``copy-on-read`` filter: reads through ``file`` are written back to it.

QEMU 7.2 (block/copy-on-read.c): ``file`` (FILTERED|PRIMARY) opens first,
then the optional ``bottom`` node must exist and not be a filter.
Permissions: the filter passthrough rule plus WRITE_UNCHANGED unless the
node is inactive.  Not reopenable.  No data path lives here.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.drivers.base import OpenContext
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, filter_default_perms
from qmpgraph.graph.perms import OpenFlag, Perm


class CopyOnRead(FilterDriver):
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
        del edge, role, queue
        nperm, nshared = filter_default_perms(perm, shared)
        if not node.open_flags & OpenFlag.INACTIVE:
            nperm |= Perm.WRITE_UNCHANGED
        return nperm, nshared


DRIVERS = (CopyOnRead(),)
