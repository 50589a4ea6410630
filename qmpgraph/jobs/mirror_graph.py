"""The mirror job's graph changes (QEMU 7.2's mirror_start_job and
mirror_exit_common), as engine transactions.

* ``insert_mirror_top``: a ``mirror_top`` node (named by
  ``filter-node-name``, else generated and marked implicit) appended above
  the source: every parent of the source moves onto it, and the source
  becomes its ``backing``.
* ``attach_target_backend``: the job's anonymous BlockBackend on the target
  (perm WRITE, shared WRITE_UNCHANGED; with the target in the source's
  backing chain it shares more, as for an active commit).
* ``mirror_exit``: the BlockBackend goes, the filter stops taking
  permissions, on a completed job the node to replace is replaced by the
  target (the pivot), and the filter's parents move onto whatever its
  ``backing`` is then: the target after a pivot, the source otherwise.

What does not live here: the job itself and its copy loop (``mirror``),
argument checks (``qmpgraph.commands.mirror``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpgraph.drivers import INTERNAL
from qmpgraph.graph.graph import BlockGraph, filter_or_cow_child, skip_filters
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.names import check_node_name
from qmpgraph.graph.perms import OpenFlag, Perm, Role
from qmpgraph.io.mirror_hook import MirrorTopState
from qmpgraph.transactions.actions import (
    add_node,
    add_root_parent,
    ref_node,
    remove_root_parent,
    unref_node,
)
from qmpgraph.transactions.composite import append, detach_child, replace_node, root_attach
from qmpgraph.transactions.engine import Action, Transaction
from qmpgraph.transactions.refresh import refresh_subtrees


def chain_contains(top: Node, node: Node) -> bool:
    """bdrv_chain_contains: ``node`` is ``top`` or below it through filter/COW links."""
    cur: Node | None = top
    while cur is not None:
        if cur is node:
            return True
        edge = filter_or_cow_child(cur)
        cur = edge.child if edge is not None else None
    return False


def backing_chain_next(node: Node) -> Node | None:
    """bdrv_backing_chain_next: the first non-filter below ``node``'s COW child."""
    cur = skip_filters(node)
    if cur is None:
        return None
    edge = cur.backing
    return skip_filters(edge.child) if edge is not None and edge.child is not None else None


def insert_mirror_top(
    tran: Transaction, graph: BlockGraph, source: Node, filter_node_name: str | None
) -> Node:
    """Create the ``mirror_top`` filter and append it above ``source``."""
    if filter_node_name is not None:
        check_node_name(
            filter_node_name,
            is_node_name=graph.__contains__,
            is_backend_name=lambda n: graph.backend_by_name(n) is not None,
        )
        name = filter_node_name
    else:
        name = graph.names.generate()
    top = Node(name, INTERNAL["mirror_top"], int(OpenFlag.RDWR))
    top.implicit = filter_node_name is None
    top.state = MirrorTopState()
    add_node(tran, graph, top)
    append(tran, graph, top, source)
    return top


def attach_target_backend(
    tran: Transaction, graph: BlockGraph, target: Node, *, target_is_backing: bool
) -> Edge:
    """The job's BlockBackend on ``target``; its root edge is how the job writes."""
    perm = int(Perm.WRITE)
    shared = int(Perm.WRITE_UNCHANGED)
    if target_is_backing:
        shared |= int(Perm.CONSISTENT_READ | Perm.WRITE)
    bb = BlockBackend()
    add_root_parent(tran, graph, bb)
    return root_attach(
        tran, graph, bb, target, "root", role=Role.FILTERED | Role.PRIMARY, perm=perm, shared=shared
    )


def detach_target_backend(tran: Transaction, graph: BlockGraph, edge: Edge) -> None:
    """blk_unref of the job's target BlockBackend."""
    parent = edge.parent
    detach_child(tran, graph, edge)
    assert isinstance(parent, BlockBackend)
    remove_root_parent(tran, graph, parent)


@dataclass(frozen=True, slots=True)
class StopUndo(Action):
    """Undo of ``set_stop``."""

    name = "mirror-top-stop"
    state: MirrorTopState
    old: bool

    def abort(self) -> None:
        self.state.stop = self.old


def set_stop(tran: Transaction, graph: BlockGraph, top: Node) -> None:
    """bs_opaque->stop = true, then refresh: the filter takes nothing any more."""
    state = top.state
    assert isinstance(state, MirrorTopState)
    tran.add(StopUndo(state, state.stop))
    state.stop = True
    refresh_subtrees(tran, graph, [top])


def can_replace(source: Node, to_replace: Node) -> bool:
    """bdrv_recurse_can_replace, for the drivers qmpgraph has: ``to_replace``
    must be reachable from ``source`` through filtered links only."""
    cur: Node | None = source
    while cur is not None:
        if cur is to_replace:
            return True
        if cur.driver is None or not cur.driver.is_filter:
            return False
        edge = filter_or_cow_child(cur)
        cur = edge.child if edge is not None else None
    return False


def pivot(tran: Transaction, graph: BlockGraph, to_replace: Node, target: Node) -> None:
    """The completion's bdrv_replace_node(to_replace, target)."""
    ref_node(tran, to_replace)
    replace_node(tran, graph, to_replace, target)
    unref_node(tran, graph, to_replace)


def remove_mirror_top(tran: Transaction, graph: BlockGraph, top: Node) -> None:
    """bdrv_replace_node(mirror_top, its backing), then drop the reference the
    caller took when the exit began (the last one: the filter goes)."""
    edge = top.backing
    assert edge is not None and edge.child is not None
    replace_node(tran, graph, top, edge.child)
    unref_node(tran, graph, top)


def replace_error(to_replace: Node, target: Node) -> str:
    """The message when the pivot is no longer safe."""
    return (
        f"Can no longer replace '{to_replace.node_name}' by '{target.node_name}', "
        "because it can no longer be guaranteed that doing so would not lead to an "
        "abrupt change of visible data"
    )
