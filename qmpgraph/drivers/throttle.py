"""The ``throttle`` filter driver: a ``file`` child and a throttle-group member.

QEMU 7.2 (block/throttle.c): ``file`` (FILTERED|PRIMARY) is opened first,
then ``throttle-group`` must name an existing ``throttle-group`` object
("Throttle group '%s' does not exist"); the node then holds a reference on
the group, so ``object-del`` refuses it ("object '%s' is in use, can not be
deleted") until the node is closed.  Permissions: the default filter rule.
blockdev-reopen may name another (existing) group; the node's reference
moves to it when the reopen commits.

What does not live here: the group object (``qmpgraph.objects``) and the
I/O timing (``qmpgraph.io.throttle_io``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import OpenContext
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.objects import tree_for
from qmpgraph.objects.qom import ref_object
from qmpgraph.objects.throttle_group import ThrottleGroup

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph
    from qmpgraph.transactions.engine import Transaction


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Per-node state: the group the node belongs to."""

    group: ThrottleGroup


def lookup_group(graph: BlockGraph, name: str) -> ThrottleGroup:
    """``throttle_group_exists``: a completed throttle-group object called ``name``."""
    obj = tree_for(graph).lookup(name)
    if not isinstance(obj, ThrottleGroup) or not obj.initialized:
        raise GenericError(f"Throttle group '{name}' does not exist")
    return obj


def find_group(ctx: OpenContext, name: str) -> ThrottleGroup:
    """The group called ``name`` in the graph being opened into."""
    return lookup_group(ctx.graph, name)


class Throttle(FilterDriver):
    """throttle: I/O limits by group; the default filter rule."""

    format_name = "throttle"
    options = frozenset({"throttle-group"})
    mutable_options = options

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file``, then join the named group (taking a reference)."""
        super().open(ctx, node, options)
        name = options.get("throttle-group")
        if name is None:
            raise GenericError("Please specify a throttle group")
        group = find_group(ctx, str(name))
        ref_object(ctx.tran, group)
        node.state = ThrottleState(group)

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """throttle_reopen_prepare: the (required) group must exist.

        A different group becomes the node's state on commit
        (``reopen_commit`` then moves the membership).
        """
        name = options.pop("throttle-group", None)
        if name is None:
            return None
        group = lookup_group(graph, str(name))
        state = node.state
        if isinstance(state, ThrottleState) and state.group is group:
            return None
        return ThrottleState(group)

    def reopen_commit(self, tran: Transaction, node: Node, old_state: Any) -> None:
        """throttle_reopen_commit: leave the old group, join the new one."""
        new = node.state
        if not isinstance(new, ThrottleState) or not isinstance(old_state, ThrottleState):
            return
        if new.group is not old_state.group:
            ref_object(tran, old_state.group, -1)
            ref_object(tran, new.group)

    def close(self, node: Node) -> None:
        """Leave the group: drop the node's reference."""
        state = node.state
        if isinstance(state, ThrottleState):
            state.group.refcnt -= 1


DRIVERS = (Throttle(),)
