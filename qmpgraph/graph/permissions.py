"""Permission rules that are pure functions of the graph (section 3).

Lives here: cumulative permissions, ``default_perms`` (bdrv_default_perms by
role: FILTERED, then COW, then DATA/METADATA), the writability tests that take
a reopen queue's future flags into account, and the conflict check with QEMU
7.2's exact message.  What does not live here: the refresh loop that writes
edge permissions inside a transaction (``qmpgraph.transactions.refresh``),
and driver-specific child-perm functions (``qmpgraph.drivers``).

A "reopen queue" here is a mapping from node to its future open flags; None
means "no reopen in progress".
"""

from __future__ import annotations

from collections.abc import Mapping

from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import (
    PERM_ALL,
    PERM_PASSTHROUGH,
    PERM_UNCHANGED,
    OpenFlag,
    Perm,
    Role,
    perm_message_names,
)

ReopenQueue = Mapping[Node, int]


def cumulative_perms(node: Node) -> tuple[int, int]:
    """OR of the parents' perms, AND of their shared perms (ALL without parents)."""
    perm, shared = 0, PERM_ALL
    for edge in node.parents:
        perm |= edge.perm
        shared &= edge.shared
    return perm, shared


def future_flags(node: Node, queue: ReopenQueue | None) -> int:
    """The node's flags after the pending reopen (its current flags otherwise)."""
    if queue is not None and node in queue:
        return queue[node]
    return node.open_flags


def is_writable_after_reopen(node: Node, queue: ReopenQueue | None) -> bool:
    """RDWR and not INACTIVE, using the queued flags if the node is queued."""
    flags = future_flags(node, queue)
    return bool(flags & OpenFlag.RDWR) and not flags & OpenFlag.INACTIVE


def filter_default_perms(perm: int, shared: int) -> tuple[int, int]:
    """Pass everything through, as a filter does."""
    return perm & PERM_PASSTHROUGH, (shared & PERM_PASSTHROUGH) | PERM_UNCHANGED


def cow_default_perms(node: Node, perm: int, shared: int) -> tuple[int, int]:
    """A backing edge never writes; it shares write only if everyone above does."""
    nperm = perm & Perm.CONSISTENT_READ
    nshared = (Perm.WRITE | Perm.RESIZE) if shared & Perm.WRITE else 0
    nshared |= Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    if node.open_flags & OpenFlag.INACTIVE:
        nshared |= Perm.WRITE | Perm.RESIZE
    return int(nperm), int(nshared)


def storage_default_perms(
    node: Node, role: int, queue: ReopenQueue | None, perm: int, shared: int
) -> tuple[int, int]:
    """DATA and/or METADATA children of a format node."""
    flags = future_flags(node, queue)
    perm, shared = filter_default_perms(perm, shared)
    if role & Role.METADATA:
        if is_writable_after_reopen(node, queue):
            perm |= Perm.WRITE | Perm.RESIZE
        if not flags & OpenFlag.NO_IO:
            perm |= Perm.CONSISTENT_READ
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & Role.DATA:
        shared &= ~Perm.RESIZE
        if perm & Perm.WRITE_UNCHANGED:
            perm |= Perm.WRITE
        if perm & Perm.WRITE:
            perm |= Perm.RESIZE
    if node.open_flags & OpenFlag.INACTIVE:
        shared |= Perm.WRITE | Perm.RESIZE
    return int(perm), int(shared)


def default_perms(
    node: Node, role: int, queue: ReopenQueue | None, perm: int, shared: int
) -> tuple[int, int]:
    """bdrv_default_perms: dispatch on FILTERED, then COW, then DATA/METADATA."""
    if role & Role.FILTERED:
        return filter_default_perms(perm, shared)
    if role & Role.COW:
        return cow_default_perms(node, perm, shared)
    if role & (Role.DATA | Role.METADATA):
        return storage_default_perms(node, role, queue, perm, shared)
    raise AssertionError(f"default_perms: invalid role {role!r}")


def child_perms(
    node: Node,
    edge: Edge | None,
    role: int,
    queue: ReopenQueue | None,
    child: Node | None = None,
) -> tuple[int, int]:
    """What ``node`` should ask of a child edge (existing or about to be created).

    Uses the driver's child-perm function over ``node``'s cumulative perms,
    then applies the child's force-share.
    """
    perm, shared = cumulative_perms(node)
    assert node.driver is not None
    nperm, nshared = node.driver.child_perm(node, edge, role, perm, shared, queue=queue)
    if edge is not None:
        child = edge.child
    if child is not None and child.force_share:
        nshared = PERM_ALL
    return nperm, nshared


def conflict_error(node: Node) -> GenericError | None:
    """The first parent pair whose perms conflict, as QEMU 7.2 words it."""
    for a in node.parents:
        for b in node.parents:
            if a is b:
                continue
            missing = b.perm & ~a.shared
            if missing:
                n = node.node_name
                return GenericError(
                    f"Permission conflict on node '{n}': permissions "
                    f"'{perm_message_names(missing)}' are both required by "
                    f"{b.parent_description()} (uses node '{n}' as '{b.name}' child) "
                    f"and unshared by {a.parent_description()} "
                    f"(uses node '{n}' as '{a.name}' child)."
                )
    return None
