"""The ``snapshot-access`` driver: reads the snapshot a copy-before-write node keeps.

Not a filter: its one child ``file`` (the cbw node) is DATA|PRIMARY; it takes
nothing on it and shares everything.  Not reopenable.  No data path lives
here.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.drivers.base import ChildSpec, OpenContext, node_size
from qmpgraph.drivers.filter_base import TakesNothing
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role

_ROLE = Role.DATA | Role.PRIMARY


class SnapshotAccess(TakesNothing):
    """snapshot-access: reads a cbw node's snapshot; not a filter."""

    format_name = "snapshot-access"
    supports_reopen = False
    children = (ChildSpec("file", _ROLE),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file`` (the cbw node) with DATA|PRIMARY."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", _ROLE)

    def size(self, node: Node) -> int:
        """The ``file`` child's size (QEMU copies its total_sectors at open)."""
        edge = node.file
        return node_size(edge.child if edge is not None else None)


DRIVERS = (SnapshotAccess(),)
