"""The block jobs' implicit filters ``commit_top`` and ``mirror_top``.

Only the daemon instantiates them (they are not offered to blockdev-add):
their filtered child is ``backing`` (``filtered_child_is_backing``).
``commit_top`` takes nothing and shares everything; ``mirror_top`` keeps the
default rule while its job runs (for an active commit, ``mark_commit``,
without CONSISTENT_READ and sharing WRITE, as QEMU's ``is_commit``).  The
jobs themselves live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmpgraph.drivers.base import FILTERED, ChildSpec, Driver, node_size
from qmpgraph.drivers.filter_base import TakesNothing
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms
from qmpgraph.graph.perms import PERM_ALL, Perm
from qmpgraph.protocol.qjson import dumps

# Ids of the mirror_top nodes of active commit jobs (node ids are never reused).
_COMMIT_FILTERS: set[int] = set()


def mark_commit(node: Node) -> None:
    """Make ``node`` (a mirror_top) an active commit's filter (MirrorBDSOpaque.is_commit)."""
    _COMMIT_FILTERS.add(node.id)


class _JobFilter(Driver):
    """A job's filter: its filtered child is ``backing``."""

    is_filter = True
    filtered_child_is_backing = True
    children = (ChildSpec("backing", FILTERED),)

    def size(self, node: Node) -> int:
        """The filtered (backing) child's size."""
        edge = node.backing
        return node_size(edge.child if edge is not None else None)

    def refresh_exact_filename(
        self, node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
    ) -> str:
        """bdrv_mirror_top/commit_top_refresh_filename: the backing child's
        filename, its exact filename or else its ``json:`` name (the child's
        full options are under "backing": a job filter's backing always
        counts as overridden)."""
        edge = node.backing
        if edge is None or edge.child is None:
            return ""
        child = exact(edge.child)
        if child:
            return child
        return "json:" + dumps(full_options.get("backing"))


class CommitTop(TakesNothing, _JobFilter):
    """commit_top: the commit job's implicit filter."""

    format_name = "commit_top"


class MirrorTop(_JobFilter):
    """mirror_top: the mirror job's implicit filter (default rule while running)."""

    format_name = "mirror_top"

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
        """The default rule; nothing at all once the job stops (``state.stop``).

        An active commit's filter takes no CONSISTENT_READ (everything above
        the base unshares it) and shares WRITE (else it would block itself at
        the base).
        """
        del edge
        if getattr(node.state, "stop", False):
            return 0, PERM_ALL
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        if node.id in _COMMIT_FILTERS:
            nperm &= ~Perm.CONSISTENT_READ
            nshared |= Perm.WRITE
        return nperm, nshared


INTERNAL_DRIVERS = (CommitTop(), MirrorTop())
