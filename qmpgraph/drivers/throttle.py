"""The ``throttle`` filter driver: a ``file`` child and a throttle-group member.

QEMU 7.2 (block/throttle.c): ``file`` (FILTERED|PRIMARY) is opened first,
then ``throttle-group`` must name an existing ``throttle-group`` object
("Throttle group '%s' does not exist"); the node then holds a reference on
the group, so ``object-del`` refuses it ("object '%s' is in use, can not be
deleted") until the node is closed.  Permissions: the default filter rule.

The constants and the reopen rule stay in ``filters.Throttle``; this
subclass, registered after it, adds the group.  What does not live here:
the group object (``qmpgraph.objects``) and any
I/O timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers import filters
from qmpgraph.drivers.base import OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role
from qmpgraph.objects import tree_for
from qmpgraph.objects.qom import ref_object
from qmpgraph.objects.throttle_group import ThrottleGroup

_FILTERED = Role.FILTERED | Role.PRIMARY


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """Per-node state: the group the node belongs to."""

    group: ThrottleGroup


def find_group(ctx: OpenContext, name: str) -> ThrottleGroup:
    """``throttle_group_exists``: a completed throttle-group object called ``name``."""
    obj = tree_for(ctx.graph).lookup(name)
    if not isinstance(obj, ThrottleGroup) or not obj.initialized:
        raise GenericError(f"Throttle group '{name}' does not exist")
    return obj


class Throttle(filters.Throttle):
    """throttle: the filter's constants (and reopen rule) plus the group membership."""

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file``, then join the named group (taking a reference)."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "file", _FILTERED)
        name = options.get("throttle-group")
        if name is None:
            raise GenericError("Please specify a throttle group")
        group = find_group(ctx, str(name))
        ref_object(ctx.tran, group)
        node.state = ThrottleState(group)

    def close(self, node: Node) -> None:
        """Leave the group: drop the node's reference."""
        state = node.state
        if isinstance(state, ThrottleState):
            state.group.refcnt -= 1


DRIVERS = (Throttle(),)
