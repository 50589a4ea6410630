"""``x-blockdev-change``: add a child to, or remove one from, a quorum node.

The checks run in qmp_x_blockdev_change's order with its messages: the parent
lookup, ``child`` and ``node`` exclusive, then for a removal the edge lookup
by name before the driver's support, and for an addition the node lookup,
the driver's support, and "no parents at all".  Quorum's own rules
(``qmpgraph.drivers.quorum`` keeps the state): a new edge is
``children.<next_index>`` with role DATA, attached by the normal node attach
(cycle check, permission refresh); a failed attach gives the index back; a
removal may not go below the vote threshold, and removing the newest index
lets the next addition reuse it.  One command is one graph transaction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qmpgraph.commands.block import device_or_node_name
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.drivers.quorum import CHILD_PREFIX, QuorumState
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.actions import set_runtime
from qmpgraph.transactions.composite import attach_child, detach_child
from qmpgraph.transactions.engine import Transaction


def _lookup_parent(graph: BlockGraph, name: str) -> Node:
    node = graph.lookup(name)
    if node is None:
        bb = graph.backend_by_name(name)
        node = bb.root.child if bb is not None and bb.root is not None else None
    if node is None:
        raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _del_child(
    tran: Transaction, graph: BlockGraph, parent: Node, parent_arg: str, child_name: str
) -> None:
    edge = next((e for e in parent.children if e.name == child_name), None)
    if edge is None:
        raise GenericError(f"Node '{parent_arg}' does not have child '{child_name}'")
    state = parent.state
    if not isinstance(state, QuorumState):
        raise GenericError(
            f"The node {device_or_node_name(parent)} does not support removing a child"
        )
    count = sum(1 for e in parent.children if e.name.startswith(CHILD_PREFIX))
    if count <= state.threshold:
        raise GenericError(
            f"The number of children cannot be lower than the vote threshold {state.threshold}"
        )
    if edge.name == f"{CHILD_PREFIX}{state.next_index - 1}":
        set_runtime(tran, parent, state=replace(state, next_index=state.next_index - 1))
    detach_child(tran, graph, edge)


def _add_child(tran: Transaction, graph: BlockGraph, parent: Node, node_name: str) -> None:
    child = graph.lookup(node_name)
    if child is None:
        raise GenericError(f"Node '{node_name}' not found")
    state = parent.state
    if not isinstance(state, QuorumState):
        raise GenericError(
            f"The node {device_or_node_name(parent)} does not support adding a child"
        )
    if child.parents:
        raise GenericError(f"The node {child.node_name} already has a parent")
    if state.blkverify:
        raise GenericError("Cannot add a child to a quorum in blkverify mode")
    name = f"{CHILD_PREFIX}{state.next_index}"
    # A failed attach aborts the transaction, which gives the index back too.
    set_runtime(tran, parent, state=replace(state, next_index=state.next_index + 1))
    attach_child(tran, graph, parent, child, name, role=Role.DATA)


@command("x-blockdev-change")
def x_blockdev_change(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Remove edge ``child`` from ``parent``, or attach node ``node`` to it."""
    daemon = ctx.daemon
    child = args.get("child")
    node = args.get("node")
    with daemon.graph_transaction("x-blockdev-change", args) as tran:
        graph = daemon.graph
        parent_arg = str(args["parent"])
        parent = _lookup_parent(graph, parent_arg)
        if (child is None) == (node is None):
            if child is not None:
                raise GenericError("The parameters child and node are in conflict")
            raise GenericError("Either child or node must be specified")
        if child is not None:
            _del_child(tran, graph, parent, parent_arg, str(child))
        else:
            _add_child(tran, graph, parent, str(node))
