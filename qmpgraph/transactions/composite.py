"""Composite graph operations built from primitive actions (section 4.3 and 7.1).

Each function runs inside the caller's transaction: it mutates the graph
without checking permissions ("noperm"), then refreshes the permissions of the
affected subtrees, raising ``GenericError`` (QEMU's exact text) on failure.
The caller aborts the transaction on an exception, which undoes everything.

Reference conventions (simpler than QEMU's "steal"): ``attach_child`` and
``root_attach`` take the edge's own reference and leave the caller's
reference alone; the caller drops its reference (``unref_node``) when it
wants the edge to be the only owner.

What does not live here: the reopen of several nodes (``reopen.py``) and the
blockdev-add open path (``qmpgraph.drivers.open``).
"""

from __future__ import annotations

from collections import deque

from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, filter_or_cow_child, recursive_has_child
from qmpgraph.graph.model import BlockBackend, Edge, Job, Node
from qmpgraph.graph.permissions import child_perms
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.actions import (
    create_edge,
    ref_node,
    remove_child,
    replace_child,
    set_edge_perm,
    set_inherits_from,
    unref_node,
)
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.refresh import refresh_subtrees


def backing_role(node: Node) -> Role:
    """The role of a ``backing`` edge: FILTERED|PRIMARY under a filter, else COW."""
    if node.driver is not None and node.driver.is_filter:
        return Role.FILTERED | Role.PRIMARY
    return Role.COW


def attach_child_noperm(
    tran: Transaction, graph: BlockGraph, parent: Node, child: Node, name: str, *, role: int
) -> Edge:
    """Cycle check, initial perms from the parent's driver, then the edge."""
    if recursive_has_child(child, parent):
        raise GenericError(
            f"Making '{child.node_name}' a {name} child of '{parent.node_name}' "
            "would create a cycle"
        )
    perm, shared = child_perms(parent, None, role, None, child)
    return create_edge(tran, graph, parent, child, name, role=role, perm=perm, shared=shared)


def attach_child(
    tran: Transaction, graph: BlockGraph, parent: Node, child: Node, name: str, *, role: int
) -> Edge:
    """bdrv_attach_child: attach and refresh the parent's subtree."""
    edge = attach_child_noperm(tran, graph, parent, child, name, role=role)
    refresh_subtrees(tran, graph, [parent])
    return edge


def root_attach(
    tran: Transaction,
    graph: BlockGraph,
    parent: BlockBackend | Job,
    child: Node,
    name: str,
    *,
    role: int,
    perm: int,
    shared: int,
) -> Edge:
    """bdrv_root_attach_child: a BB or job edge with caller-chosen perms."""
    edge = create_edge(tran, graph, parent, child, name, role=role, perm=perm, shared=shared)
    refresh_subtrees(tran, graph, [child])
    return edge


def detach_child(tran: Transaction, graph: BlockGraph, edge: Edge) -> None:
    """Remove an edge, then loosen the old child's subtree (errors ignored)."""
    old = edge.child
    keep = old is not None and old.refcnt > 1
    remove_child(tran, graph, edge)
    if keep and old is not None:
        mark = tran.mark()
        try:
            refresh_subtrees(tran, graph, [old])
        except GenericError:
            tran.rollback_to(mark)


def set_edge_perms_checked(
    tran: Transaction, graph: BlockGraph, edge: Edge, perm: int, shared: int
) -> None:
    """bdrv_child_try_set_perm: set a BB/job edge's perms and refresh the child."""
    assert edge.child is not None
    tightening = bool(perm & ~edge.perm) or bool(edge.shared & ~shared)
    mark = tran.mark()
    set_edge_perm(tran, edge, perm, shared)
    try:
        refresh_subtrees(tran, graph, [edge.child])
    except GenericError:
        if tightening:
            raise
        tran.rollback_to(mark)


def _unset_inherits_from(tran: Transaction, root: Node, edge: Edge) -> None:
    child = edge.child
    if child is None:
        return
    if child.inherits_from is root and not any(
        c is not edge and c.child is child for c in root.children
    ):
        set_inherits_from(tran, child, None)
    for c in child.children:
        _unset_inherits_from(tran, root, c)


def _inherits_from_recursive(child: Node, parent: Node) -> bool:
    node: Node | None = child
    while node is not None and node is not parent:
        node = node.inherits_from
    return node is parent


def set_file_or_backing_noperm(
    tran: Transaction, graph: BlockGraph, parent: Node, child: Node | None, is_backing: bool
) -> None:
    """bdrv_set_file_or_backing_noperm: replace ``parent.backing``/``file`` without refresh."""
    drv = parent.driver
    if drv is None:
        raise GenericError("Node corrupted")
    old = parent.backing if is_backing else parent.file
    if old is not None and old.frozen:
        old_name = old.child.node_name if old.child is not None else ""
        raise GenericError(
            f"Cannot change frozen '{old.name}' link from '{parent.node_name}' to '{old_name}'"
        )
    if is_backing and not drv.is_filter and not drv.supports_backing:
        raise GenericError(
            f"Driver '{drv.format_name}' of node '{parent.node_name}' "
            "does not support backing files"
        )
    role: int
    if drv.is_filter:
        role = Role.FILTERED | Role.PRIMARY
    elif is_backing:
        role = Role.COW
    else:
        if parent.file is None:
            raise GenericError("Cannot set file child to format node without file child")
        role = parent.file.role
    if old is not None:
        _unset_inherits_from(tran, parent, old)
        remove_child(tran, graph, old)
    if child is not None:
        attach_child_noperm(
            tran, graph, parent, child, "backing" if is_backing else "file", role=role
        )
        if _inherits_from_recursive(child, parent):
            set_inherits_from(tran, child, parent)


def set_backing(tran: Transaction, graph: BlockGraph, parent: Node, child: Node | None) -> None:
    """bdrv_set_backing_hd: set (or clear) the backing child, then refresh."""
    set_file_or_backing_noperm(tran, graph, parent, child, True)
    refresh_subtrees(tran, graph, [parent])


def _should_update_child(edge: Edge, to: Node) -> bool:
    if edge.stay_at_node:
        return False
    # Moving an edge that lives inside ``to``'s subtree would create a loop.
    seen: set[int] = set()
    queue: deque[Node] = deque([to])
    while queue:
        node = queue.popleft()
        for c in node.children:
            if c is edge:
                return False
            if c.child is not None and c.child.id not in seen:
                seen.add(c.child.id)
                queue.append(c.child)
    return True


def replace_node_noperm(
    tran: Transaction, graph: BlockGraph, from_: Node, to: Node, auto_skip: bool
) -> None:
    """Move every movable parent edge of ``from_`` to ``to``."""
    for edge in list(from_.parents):
        if not _should_update_child(edge, to):
            if auto_skip:
                continue
            raise GenericError(f"Should not change '{edge.name}' link to '{from_.node_name}'")
        if edge.frozen:
            raise GenericError(f"Cannot change '{edge.name}' link to '{from_.node_name}'")
        replace_child(tran, graph, edge, to)


def replace_node(
    tran: Transaction,
    graph: BlockGraph,
    from_: Node,
    to: Node,
    *,
    auto_skip: bool = True,
    detach_subchain: bool = False,
) -> None:
    """bdrv_replace_node_common: parents of ``from_`` move to ``to``; refresh both."""
    cow_parent: Node | None = None
    if detach_subchain:
        assert from_ is not to
        cow_parent = from_
        while True:
            edge = filter_or_cow_child(cow_parent)
            assert edge is not None and edge.child is not None, "to not in from's chain"
            if edge.child is to:
                break
            cow_parent = edge.child
    ref_node(tran, from_)
    replace_node_noperm(tran, graph, from_, to, auto_skip)
    if cow_parent is not None:
        edge = filter_or_cow_child(cow_parent)
        assert edge is not None
        remove_child(tran, graph, edge)
    refresh_subtrees(tran, graph, [to, from_])
    unref_node(tran, graph, from_)


def drop_filter(tran: Transaction, graph: BlockGraph, node: Node) -> None:
    """bdrv_drop_filter: parents of the filter move to its filtered child."""
    edge = filter_or_cow_child(node)
    assert edge is not None and edge.child is not None
    replace_node(tran, graph, node, edge.child, auto_skip=True, detach_subchain=True)


def append(tran: Transaction, graph: BlockGraph, bs_new: Node, bs_top: Node) -> None:
    """bdrv_append: put ``bs_new`` on top of ``bs_top`` (``bs_top`` becomes its backing)."""
    assert bs_new.backing is None
    attach_child_noperm(tran, graph, bs_new, bs_top, "backing", role=backing_role(bs_new))
    replace_node_noperm(tran, graph, bs_top, bs_new, True)
    refresh_subtrees(tran, graph, [bs_new])


def insert_node(tran: Transaction, graph: BlockGraph, bs: Node, new: Node) -> None:
    """The replace half of bdrv_insert_node (opening ``new`` is the caller's job)."""
    try:
        replace_node(tran, graph, bs, new)
    except GenericError as err:
        raise GenericError(f"Could not replace node: {err.desc}") from err


def replace_child_bs(tran: Transaction, graph: BlockGraph, edge: Edge, new_bs: Node) -> None:
    """bdrv_replace_child_bs: one edge to another node; refresh old and new subtrees."""
    old = edge.child
    assert old is not None
    ref_node(tran, old)
    replace_child(tran, graph, edge, new_bs)
    refresh_subtrees(tran, graph, [new_bs, old])
    unref_node(tran, graph, old)
