"""QEMU 7.2's ``child_of_bds`` attach and detach callbacks.

This module is the ONLY place that assigns a node's ``file`` and ``backing``
(the ``_file``/``_backing`` slots).  They are derived from the edge's role and
the parent driver's ``filtered_child_is_backing`` flag, never from the edge's
name, so undoing an attach or a detach restores them for free.  A test greps
the package to prove nothing else assigns them.

The callbacks are called only by the replace-child action in
``qmpgraph.transactions.actions``; they are not actions themselves.  Also here:
the side effects of attaching a COW child (the "used as backing hd" op
blockers, section 2.3 of the reference).
"""

from __future__ import annotations

from qmpgraph.graph.model import Edge, Node, ParentKind
from qmpgraph.graph.perms import OpenFlag, Role

# BlockOpType names, in QAPI order.
OP_TYPES = (
    "backup-source",
    "backup-target",
    "change",
    "commit-source",
    "commit-target",
    "dataplane",
    "drive-del",
    "eject",
    "external-snapshot",
    "internal-snapshot",
    "internal-snapshot-delete",
    "mirror-source",
    "mirror-target",
    "resize",
    "stream",
    "replace",
)
# A backing node may still be used by these operations.
_BACKING_ALLOWED_OPS = frozenset({"commit-target", "stream", "backup-source", "backup-target"})


def _device_or_node_name(node: Node) -> str:
    for edge in node.parents:
        if edge.kind is ParentKind.BLOCK_BACKEND:
            name = getattr(edge.parent, "name", "")
            if name:
                return str(name)
    return node.node_name


def attach(edge: Edge) -> None:
    """Called when ``edge.child`` became non-None: update the parent's view."""
    parent = edge.parent
    if not isinstance(parent, Node):
        return
    parent.children.insert(0, edge)
    drv = parent.driver
    is_filter = drv is not None and drv.is_filter
    role = edge.role
    if is_filter or role & Role.FILTERED:
        assert not role & Role.COW
        if role & Role.PRIMARY:
            assert role & Role.FILTERED
            assert parent._file is None and parent._backing is None
            if drv is not None and drv.filtered_child_is_backing:
                parent._backing = edge
            else:
                parent._file = edge
        else:
            assert not role & Role.FILTERED
    elif role & Role.COW:
        assert not role & Role.PRIMARY and parent._backing is None
        parent._backing = edge
        _backing_attached(parent, edge)
    elif role & Role.PRIMARY:
        assert parent._file is None
        parent._file = edge


def detach(edge: Edge) -> None:
    """Called just before ``edge.child`` becomes None: undo ``attach``."""
    parent = edge.parent
    if not isinstance(parent, Node):
        return
    if edge.role & Role.COW:
        _backing_detached(parent, edge)
    parent.children.remove(edge)
    if edge is parent._backing:
        parent._backing = None
    elif edge is parent._file:
        parent._file = None


def _backing_attached(parent: Node, edge: Edge) -> None:
    assert edge.child is not None
    reason = f"node is used as backing hd of '{_device_or_node_name(parent)}'"
    parent.backing_blocker = reason
    parent.open_flags &= ~OpenFlag.NO_BACKING
    for op in OP_TYPES:
        if op not in _BACKING_ALLOWED_OPS:
            edge.child.op_blockers.setdefault(op, []).insert(0, reason)


def _backing_detached(parent: Node, edge: Edge) -> None:
    reason = parent.backing_blocker
    if edge.child is not None and reason is not None:
        for op, reasons in list(edge.child.op_blockers.items()):
            # Remove by identity: the same text may come from another overlay.
            kept = [r for r in reasons if r is not reason]
            if kept:
                edge.child.op_blockers[op] = kept
            else:
                del edge.child.op_blockers[op]
    parent.backing_blocker = None
