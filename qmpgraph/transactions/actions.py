"""Primitive graph actions: each performs its change at once and registers an undo record.

Every function here takes the ``Transaction`` first, changes the graph
immediately, and adds a frozen slotted undo record (an ``Action``) holding
plain references and old values.  Abort restores exactly the old state;
because ``file``/``backing`` are derived by the attach/detach callbacks
(``qmpgraph.graph.attach``), undoing an edge move restores them for free.

Reference counting is transactional too: ``unref_node`` to zero deletes the
node at once (children edges removed, name unlinked) and the deletion is
undone on abort; only closing the driver waits for commit (``on_commit``).

Primitives: ``ref_node``, ``unref_node``, ``add_node``, ``delete_node``
(via unref), ``create_edge`` (attach child common), ``replace_child``,
``remove_child``, ``set_edge_perm``, ``set_frozen``, ``set_open_flags``,
``set_options``, ``set_runtime``, ``set_inherits_from``,
``set_monitor_owned``, ``add_root_parent``, ``remove_root_parent``.

What does not live here: composites (``composite.py``) and permission
refresh (``refresh.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.errors import GenericError
from qmpgraph.graph import attach as _cb
from qmpgraph.graph.graph import BlockGraph, _Link
from qmpgraph.graph.model import BlockBackend, Edge, Job, Node
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.engine import Action, Transaction

# -- reference counts and node lifetime ---------------------------------------


@dataclass(frozen=True, slots=True)
class RefUndo(Action):
    """Undo of ``ref_node``."""

    name = "ref-node"
    node: Node

    def abort(self) -> None:
        self.node.refcnt -= 1


def ref_node(tran: Transaction, node: Node) -> None:
    """Take a reference on ``node``."""
    node.refcnt += 1
    tran.add(RefUndo(node))


@dataclass(frozen=True, slots=True)
class UnrefUndo(Action):
    """Undo of the decrement part of ``unref_node``."""

    name = "unref-node"
    node: Node

    def abort(self) -> None:
        self.node.refcnt += 1


def unref_node(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    """Drop a reference; at zero the node is deleted (cascading into children)."""
    assert node.refcnt > 0
    node.refcnt -= 1
    tran.add(UnrefUndo(node))
    if node.refcnt == 0:
        _delete_node(tran, graph, node)


@dataclass(frozen=True, slots=True)
class AddNodeUndo(Action):
    """Undo of ``add_node``: unlink the name."""

    name = "add-node"
    graph: BlockGraph
    node: Node

    def abort(self) -> None:
        self.graph._unlink(self.node)


def add_node(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    """Insert a fresh node (refcount 1, the creator's) into the named-node list."""
    graph._link(node)
    tran.add(AddNodeUndo(graph, node))


@dataclass(frozen=True, slots=True)
class DeleteNodeUndo(Action):
    """Undo of the unlink part of a node deletion; commit closes the driver."""

    name = "delete-node"
    graph: BlockGraph
    node: Node
    link: _Link

    def abort(self) -> None:
        self.graph._relink(self.link)

    def commit(self) -> None:
        if self.node.driver is not None:
            self.node.driver.close(self.node)


def _delete_node(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    assert not node.parents, "a node with parents has references"
    # Children go first, newest first, as bdrv_close() drops them.
    for edge in list(node.children):
        old = edge.child
        remove_child(tran, graph, edge)
        if old is not None and old.refcnt > 0:
            _loosen(tran, graph, old)
    link = graph._unlink(node)
    tran.add(DeleteNodeUndo(graph, node, link))


def _loosen(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    """bdrv_detach_child's refresh of a surviving old child: loosening, errors ignored.

    It matters beyond the edge values: file nodes release their image lock bytes.
    """
    from qmpgraph.transactions.refresh import (  # noqa: PLC0415 (refresh imports this module)
        refresh_subtrees,
    )

    mark = tran.mark()
    try:
        refresh_subtrees(tran, graph, [node])
    except GenericError:
        tran.rollback_to(mark)


# -- edges --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MoveEdgeUndo(Action):
    """Undo of moving an edge from ``old_child`` to ``new_child``."""

    name = "replace-child"
    edge: Edge
    old_child: Node | None
    new_child: Node | None
    old_parent_flags: int | None

    def abort(self) -> None:
        _move_edge(self.edge, self.old_child)
        if self.old_parent_flags is not None:
            assert isinstance(self.edge.parent, Node)
            self.edge.parent.open_flags = self.old_parent_flags


def _move_edge(edge: Edge, new_child: Node | None) -> None:
    old = edge.child
    if old is not None:
        _cb.detach(edge)
        old.parents.remove(edge)
    edge.child = new_child
    if new_child is not None:
        new_child.parents.insert(0, edge)
        _cb.attach(edge)


def replace_child(tran: Transaction, graph: BlockGraph, edge: Edge, new_child: Node | None) -> None:
    """Point ``edge`` at ``new_child`` (or nowhere), moving the edge's reference.

    The new child gains a reference before the move; the old one loses the
    edge's reference after it (which may delete it, transactionally).
    """
    old = edge.child
    if new_child is not None:
        ref_node(tran, new_child)
    parent = edge.parent
    old_flags = parent.open_flags if isinstance(parent, Node) else None
    _move_edge(edge, new_child)
    if isinstance(parent, Node) and parent.open_flags == old_flags:
        old_flags = None
    tran.add(MoveEdgeUndo(edge, old, new_child, old_flags))
    if old is not None:
        unref_node(tran, graph, old)


@dataclass(frozen=True, slots=True)
class CreateEdgeUndo(Action):
    """Undo of ``create_edge``: unregister the edge from a BB or job parent."""

    name = "create-edge"
    edge: Edge

    def abort(self) -> None:
        _unregister_edge(self.edge)


def _register_edge(edge: Edge) -> None:
    parent = edge.parent
    if isinstance(parent, BlockBackend):
        assert parent.root is None
        parent.root = edge
    elif isinstance(parent, Job):
        parent.edges.insert(0, edge)


def _unregister_edge(edge: Edge) -> None:
    parent = edge.parent
    if isinstance(parent, BlockBackend):
        parent.root = None
    elif isinstance(parent, Job):
        parent.edges.remove(edge)


def create_edge(
    tran: Transaction,
    graph: BlockGraph,
    parent: Node | BlockBackend | Job,
    child: Node,
    name: str,
    *,
    role: int,
    perm: int,
    shared: int,
) -> Edge:
    """Attach child common: a new edge with its own reference on ``child``."""
    if isinstance(parent, Node):
        assert role & (Role.DATA | Role.METADATA | Role.FILTERED | Role.COW)
    edge = Edge(name, parent, role, perm, shared)
    _register_edge(edge)
    tran.add(CreateEdgeUndo(edge))
    replace_child(tran, graph, edge, child)
    return edge


@dataclass(frozen=True, slots=True)
class RemoveEdgeUndo(Action):
    """Undo of the unregister step of ``remove_child``."""

    name = "remove-child"
    edge: Edge

    def abort(self) -> None:
        _register_edge(self.edge)


def remove_child(tran: Transaction, graph: BlockGraph, edge: Edge) -> None:
    """Detach ``edge`` from its child and forget it (bdrv_remove_child)."""
    if edge.child is not None:
        replace_child(tran, graph, edge, None)
    _unregister_edge(edge)
    tran.add(RemoveEdgeUndo(edge))


@dataclass(frozen=True, slots=True)
class EdgePermUndo(Action):
    """Undo of ``set_edge_perm``."""

    name = "set-edge-perm"
    edge: Edge
    old_perm: int
    old_shared: int

    def abort(self) -> None:
        self.edge.perm = self.old_perm
        self.edge.shared = self.old_shared


def set_edge_perm(tran: Transaction, edge: Edge, perm: int, shared: int) -> None:
    """Write an edge's (perm, shared) pair."""
    if (edge.perm, edge.shared) == (perm, shared):
        return
    tran.add(EdgePermUndo(edge, edge.perm, edge.shared))
    edge.perm = perm
    edge.shared = shared


@dataclass(frozen=True, slots=True)
class FrozenUndo(Action):
    """Undo of ``set_frozen``."""

    name = "set-frozen"
    edge: Edge
    old: bool

    def abort(self) -> None:
        self.edge.frozen = self.old


def set_frozen(tran: Transaction, edge: Edge, frozen: bool) -> None:
    """Freeze or unfreeze an edge."""
    tran.add(FrozenUndo(edge, edge.frozen))
    edge.frozen = frozen


# -- node fields ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenFlagsUndo(Action):
    """Undo of ``set_open_flags``."""

    name = "set-open-flags"
    node: Node
    old_flags: int

    def abort(self) -> None:
        self.node.open_flags = self.old_flags


def set_open_flags(tran: Transaction, node: Node, flags: int) -> None:
    """Set a node's open flags (read-only is derived from RDWR)."""
    tran.add(OpenFlagsUndo(node, node.open_flags))
    node.open_flags = flags


@dataclass(frozen=True, slots=True)
class OptionsUndo(Action):
    """Undo of ``set_options``."""

    name = "set-options"
    node: Node
    old_options: dict[str, Any]
    old_explicit: dict[str, Any]

    def abort(self) -> None:
        self.node.options = self.old_options
        self.node.explicit_options = self.old_explicit


def set_options(
    tran: Transaction, node: Node, options: dict[str, Any], explicit: dict[str, Any]
) -> None:
    """Replace a node's effective and explicit options (new dicts, never mutated)."""
    tran.add(OptionsUndo(node, node.options, node.explicit_options))
    node.options = dict(options)
    node.explicit_options = dict(explicit)


@dataclass(frozen=True, slots=True)
class RuntimeUndo(Action):
    """Undo of ``set_runtime``."""

    name = "set-runtime"
    node: Node
    old_force_share: bool
    old_detect_zeroes: str
    old_implicit: bool
    old_state: Any

    def abort(self) -> None:
        self.node.force_share = self.old_force_share
        self.node.detect_zeroes = self.old_detect_zeroes
        self.node.implicit = self.old_implicit
        self.node.state = self.old_state


def set_runtime(
    tran: Transaction,
    node: Node,
    *,
    force_share: bool | None = None,
    detect_zeroes: str | None = None,
    implicit: bool | None = None,
    state: Any = None,
) -> None:
    """Set the generic runtime fields and driver state (None keeps a field)."""
    tran.add(RuntimeUndo(node, node.force_share, node.detect_zeroes, node.implicit, node.state))
    if force_share is not None:
        node.force_share = force_share
    if detect_zeroes is not None:
        node.detect_zeroes = detect_zeroes
    if implicit is not None:
        node.implicit = implicit
    if state is not None:
        node.state = state


@dataclass(frozen=True, slots=True)
class InheritsFromUndo(Action):
    """Undo of ``set_inherits_from``."""

    name = "set-inherits-from"
    node: Node
    old: Node | None

    def abort(self) -> None:
        self.node.inherits_from = self.old


def set_inherits_from(tran: Transaction, node: Node, new: Node | None) -> None:
    """Set the node this one was opened by (reopen propagates to such children)."""
    if node.inherits_from is new:
        return
    tran.add(InheritsFromUndo(node, node.inherits_from))
    node.inherits_from = new


@dataclass(frozen=True, slots=True)
class MonitorOwnedUndo(Action):
    """Undo of ``set_monitor_owned``."""

    name = "set-monitor-owned"
    node: Node
    old: bool

    def abort(self) -> None:
        self.node.monitor_owned = self.old


def set_monitor_owned(tran: Transaction, node: Node, owned: bool) -> None:
    """Put the node on (or take it off) the monitor-owned list; refs unchanged."""
    tran.add(MonitorOwnedUndo(node, node.monitor_owned))
    node.monitor_owned = owned


# -- BlockBackends and jobs -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RootParentUndo(Action):
    """Undo of ``add_root_parent`` / ``remove_root_parent``."""

    name = "root-parent"
    graph: BlockGraph
    parent: BlockBackend | Job
    added: bool

    def abort(self) -> None:
        table: dict[Any, None] = (
            self.graph.backends if isinstance(self.parent, BlockBackend) else self.graph.jobs
        )
        if self.added:
            del table[self.parent]
        else:
            table[self.parent] = None


def add_root_parent(tran: Transaction, graph: BlockGraph, parent: BlockBackend | Job) -> None:
    """Register a BlockBackend or job with the graph."""
    if isinstance(parent, BlockBackend):
        graph.backends[parent] = None
    else:
        graph.jobs[parent] = None
    tran.add(RootParentUndo(graph, parent, True))


def remove_root_parent(tran: Transaction, graph: BlockGraph, parent: BlockBackend | Job) -> None:
    """Unregister a BlockBackend or job (its edges must be gone already)."""
    if isinstance(parent, BlockBackend):
        del graph.backends[parent]
    else:
        del graph.jobs[parent]
    tran.add(RootParentUndo(graph, parent, False))


@dataclass(frozen=True, slots=True)
class EdgeRoleUndo(Action):
    """Undo of ``set_edge_role``."""

    name = "set-edge-role"
    edge: Edge
    old_role: Role

    def abort(self) -> None:
        self.edge.role = self.old_role


def set_edge_role(tran: Transaction, edge: Edge, role: int) -> None:
    """Change DATA/METADATA bits of an edge (qcow2 with a data file drops DATA).

    Bits that decide ``file``/``backing`` (FILTERED, COW, PRIMARY) must not change.
    """
    fixed = Role.FILTERED | Role.COW | Role.PRIMARY
    assert (edge.role & fixed) == (role & fixed)
    tran.add(EdgeRoleUndo(edge, edge.role))
    edge.role = Role(role)
