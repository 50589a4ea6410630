"""The graph part of reopening several nodes at once (bdrv_reopen_multiple).

Lives here: ``ReopenRequest`` (one queue entry, already merged: the node, its
new flags and options, and the ``backing``/``file`` values as given, a node
name string, None, or ``UNCHANGED``) and ``reopen_multiple``, which parses the
child switches in queue order (backing, then file), refreshes permissions over
the queued nodes plus their old children with the queue's *future* flags, and
finally installs the new flags and options, all in the caller's transaction.

What does not live here: option merging and inheritance across the queue,
and the per-option checks of blockdev-reopen; a later ``blockdev-reopen``
command builds the requests and calls this.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, recursive_has_child, skip_implicit_filters
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.transactions.actions import set_open_flags, set_options
from qmpgraph.transactions.composite import set_file_or_backing_noperm
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.refresh import refresh_subtrees


class _Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED
ChildValue = str | None | _Unchanged


@dataclass(slots=True)
class ReopenRequest:
    """One merged reopen-queue entry."""

    node: Node
    flags: int
    options: dict[str, Any] | None = None
    explicit_options: dict[str, Any] | None = None
    backing: ChildValue = UNCHANGED
    file: ChildValue = UNCHANGED
    old_backing: Node | None = field(default=None, init=False)
    old_file: Node | None = field(default=None, init=False)


def _parse_child(
    tran: Transaction, graph: BlockGraph, req: ReopenRequest, is_backing: bool
) -> None:
    node = req.node
    value = req.backing if is_backing else req.file
    if value is UNCHANGED:
        return
    child_name = "backing" if is_backing else "file"
    edge = node.backing if is_backing else node.file
    old = edge.child if edge is not None else None
    new: Node | None
    if value is None:
        assert is_backing, "the schema gives 'file' no null"
        new = None
    else:
        assert isinstance(value, str)
        new = graph.lookup(value)
        if new is None:
            raise GenericError(f"Cannot find device='' nor node-name='{value}'")
        if recursive_has_child(new, node):
            raise GenericError(
                f"Making '{value}' a {child_name} child of '{node.node_name}' would create a cycle"
            )
    if old is new:
        return
    if old is not None:
        if skip_implicit_filters(old) is new:
            return
        if old.implicit:
            raise GenericError(f"Cannot replace implicit {child_name} child of {node.node_name}")
    drv = node.driver
    assert drv is not None
    if drv.is_filter and old is None:
        raise GenericError(
            f"'{node.node_name}' is a {drv.format_name} filter node that does not "
            f"support a {child_name} child"
        )
    if is_backing:
        req.old_backing = old
    else:
        req.old_file = old
    set_file_or_backing_noperm(tran, graph, node, new, is_backing)


def reopen_multiple(tran: Transaction, graph: BlockGraph, requests: list[ReopenRequest]) -> None:
    """Switch children, refresh perms with future flags, then install flags/options."""
    starts: list[Node | None] = []
    for req in requests:
        _parse_child(tran, graph, req, True)
        _parse_child(tran, graph, req, False)
        starts += [req.node, req.old_backing, req.old_file]
    queue: dict[Node, int] = {}
    for req in requests:
        flags = req.flags
        if flags & OpenFlag.RDWR:
            flags |= OpenFlag.ALLOW_RDWR
        queue[req.node] = flags
    refresh_subtrees(tran, graph, starts, queue)
    # Children commit before parents in QEMU (reverse queue order).
    for req in reversed(requests):
        set_open_flags(tran, req.node, queue[req.node])
        if req.options is not None:
            explicit = req.explicit_options if req.explicit_options is not None else req.options
            set_options(tran, req.node, req.options, explicit)
