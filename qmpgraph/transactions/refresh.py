"""Permission refresh over a topologically sorted node list (section 3.6).

Every composite first changes the graph without checking permissions, then
calls ``refresh_subtrees`` in the same transaction; a failure raises and the
caller's transaction aborts, undoing the edge permission writes too.

What does not live here: the pure rules (``qmpgraph.graph.permissions``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, topological_sort
from qmpgraph.graph.model import Node
from qmpgraph.graph.permissions import (
    ReopenQueue,
    child_perms,
    conflict_error,
    cumulative_perms,
    is_writable_after_reopen,
)
from qmpgraph.graph.perms import Perm
from qmpgraph.transactions.actions import set_edge_perm
from qmpgraph.transactions.engine import Action, Transaction

_WRITE_ANY = Perm.WRITE | Perm.WRITE_UNCHANGED


@dataclass(frozen=True, slots=True)
class DriverPermAction(Action):
    """The driver's set_perm on commit, abort_perm_update on abort."""

    name = "driver-set-perm"
    node: Node

    def commit(self) -> None:
        if self.node.driver is not None:
            perm, shared = cumulative_perms(self.node)
            self.node.driver.set_perm(self.node, perm, shared)

    def abort(self) -> None:
        if self.node.driver is not None:
            self.node.driver.abort_perm_update(self.node)


def refresh_node_list(
    tran: Transaction, graph: BlockGraph, nodes: Iterable[Node], queue: ReopenQueue | None = None
) -> None:
    """Check and update permissions for ``nodes`` (parents before children)."""
    for node in nodes:
        if graph.lookup(node.node_name) is not node:
            continue  # deleted earlier in this transaction
        err = conflict_error(node)
        if err is not None:
            raise err
        perm, shared = cumulative_perms(node)
        if perm & _WRITE_ANY and not is_writable_after_reopen(node, queue):
            if not is_writable_after_reopen(node, None):
                raise GenericError("Block node is read-only")
            raise GenericError(
                f"Read-only block node '{node.node_name}' cannot support read-write users"
            )
        drv = node.driver
        if drv is None:
            continue
        if perm & _WRITE_ANY and not perm & Perm.RESIZE:
            size = (drv.size(node) + 511) // 512 * 512
            if size % drv.request_alignment(node):
                raise GenericError(
                    "Cannot get 'write' permission without 'resize': "
                    "Image size is not a multiple of request alignment"
                )
        drv.check_perm(node, perm, shared)
        tran.add(DriverPermAction(node))
        for edge in node.children:
            nperm, nshared = child_perms(node, edge, edge.role, queue)
            set_edge_perm(tran, edge, nperm, nshared)


def refresh_subtrees(
    tran: Transaction,
    graph: BlockGraph,
    starts: Iterable[Node | None],
    queue: ReopenQueue | None = None,
) -> None:
    """Refresh the subtrees of ``starts``, sorted as QEMU's shared-set DFS sorts them."""
    alive = [n for n in starts if n is not None]
    refresh_node_list(tran, graph, topological_sort(alive), queue)
