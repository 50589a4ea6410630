"""What the filter drivers share: one filtered child, its size, "takes nothing".

* ``FilterDriver``: a filter whose filtered child is ``file``
  (FILTERED|PRIMARY); ``open`` rejects unknown options and opens ``file``
  (subclasses call it first, then open their other children); the node's
  size is the filtered child's.
* ``TakesNothing``: a driver that takes no permission on its children and
  shares everything (snapshot-access, commit_top).

The drivers themselves live in their own modules (``copy_on_read``,
``compress``, ``preallocate``, ``copy_before_write``, ``throttle``,
``blklogwrites``, ``snapshot_access``, ``job_filters``).  No data path lives
here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qmpgraph.drivers.base import FILTERED, ChildSpec, Driver, OpenContext, node_size
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue
from qmpgraph.graph.perms import PERM_ALL


class FilterDriver(Driver):
    """A filter with a FILTERED|PRIMARY ``file`` child."""

    is_filter = True
    children: ClassVar[tuple[ChildSpec, ...]] = (ChildSpec("file", FILTERED),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Reject unknown options, then open the filtered child."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", FILTERED)

    def size(self, node: Node) -> int:
        """The filtered child's size."""
        edge = node.file or node.backing
        return node_size(edge.child if edge is not None else None)


class TakesNothing(Driver):
    """A driver that takes nothing on its children and shares everything."""

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
        del node, edge, role, perm, shared, queue
        return 0, PERM_ALL
