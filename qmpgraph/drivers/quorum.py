"""The ``quorum`` driver: N data children voting on reads (control plane only).

Quorum is not a filter and has no PRIMARY child, so ``file`` and ``backing``
stay empty; its children are the DATA edges ``children.0`` ...
``children.N-1``.  Open checks run in quorum_open's order with its messages
(child count, vote threshold, read pattern, blkverify mode, rewrite-corrupted),
then the children open in index order.  The size is the first child's length,
read once at open (quorum has no variable length); children of different
lengths fail the open as QEMU's length refresh does.

``QuorumState.next_index`` is the index the next ``x-blockdev-change`` add
uses; the add/remove rules themselves live in ``qmpgraph.commands.quorum``.
What does not live here: voting, the data path (``qmpgraph.io.quorum_io``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue
from qmpgraph.graph.perms import PERM_PASSTHROUGH, PERM_UNCHANGED, Perm, Role

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph

CHILD_PREFIX = "children."


@dataclass(frozen=True, slots=True)
class QuorumState:
    """Per-node state of a quorum node."""

    threshold: int
    blkverify: bool
    rewrite_corrupted: bool
    read_pattern: str
    next_index: int
    size: int
    # The graph the node lives in: its daemon receives the node's I/O events.
    graph: BlockGraph | None = field(default=None, compare=False, repr=False)


def quorum_children(node: Node) -> list[Edge]:
    """The ``children.N`` edges in QEMU's array order (oldest attached first)."""
    return [e for e in reversed(node.children) if e.name.startswith(CHILD_PREFIX)]


class Quorum(Driver):
    """quorum: reads are voted on by the children; writes go to all of them."""

    format_name = "quorum"
    options = frozenset({"vote-threshold", "blkverify", "rewrite-corrupted", "read-pattern"})
    # ``children`` is the user's list; the edges are named ``children.N``.
    children = (ChildSpec("children", Role.DATA),)
    # quorum_strong_runtime_opts
    strong_runtime_options = ("vote-threshold", "blkverify", "rewrite-corrupted", "read-pattern")

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """quorum_open: option checks, then ``children.0`` .. ``children.N-1``."""
        self.reject_unknown(options)
        kids = options.get("children")
        if kids is not None and not isinstance(kids, list):
            raise GenericError("Option children is not a valid array")
        count = len(kids or [])
        if count < 1:
            raise GenericError("Number of provided children must be 1 or more")
        threshold = int(options.get("vote-threshold", 0))
        if threshold < 1:
            raise GenericError("Parameter 'vote-threshold' expects a value >= 1")
        if threshold > count:
            raise GenericError("threshold may not exceed children count")
        pattern = str(options.get("read-pattern", "quorum"))
        if pattern not in ("quorum", "fifo"):
            raise GenericError("Please set read-pattern as fifo or quorum")
        blkverify = rewrite = False
        if pattern == "quorum":
            blkverify = bool(options.get("blkverify", False))
            if blkverify and (count != 2 or threshold != 2):
                raise GenericError(
                    "blkverify=on can only be set if there are exactly two files "
                    "and vote-threshold is 2"
                )
            rewrite = bool(options.get("rewrite-corrupted", False))
            if rewrite and blkverify:
                raise GenericError("rewrite-corrupted=on cannot be used with blkverify=on")
        # The state must exist before the children attach: child_perm reads it.
        node.state = QuorumState(threshold, blkverify, rewrite, pattern, count, 0)
        assert kids is not None
        sizes = []
        for index, value in enumerate(kids):
            name = f"{CHILD_PREFIX}{index}"
            edge = ctx.open_child(node, {name: value}, name, Role.DATA)
            assert edge is not None and edge.child is not None
            child = edge.child
            sizes.append(child.driver.size(child) if child.driver is not None else 0)
        # quorum_co_getlength: every child must report the first one's length.
        if any(s != sizes[0] for s in sizes):
            raise GenericError("Could not refresh total sector count: Input/output error")
        node.state = QuorumState(
            threshold, blkverify, rewrite, pattern, count, sizes[0], graph=ctx.graph
        )

    def child_perm(
        self,
        node: Node,
        edge: Edge | None,
        role: int,
        perm: int,
        shared: int,
        *,
        queue: ReopenQueue | None,
    ) -> tuple[int, int]:
        """Pass perms through (+WRITE to rewrite); never share WRITE or RESIZE."""
        del edge, role, queue
        nperm = perm & PERM_PASSTHROUGH
        state = node.state
        if isinstance(state, QuorumState) and state.rewrite_corrupted:
            nperm |= Perm.WRITE
        nshared = (shared & (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)) | PERM_UNCHANGED
        return int(nperm), int(nshared)

    def size(self, node: Node) -> int:
        """The length read at open."""
        state = node.state
        return state.size if isinstance(state, QuorumState) else 0

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Probes read the first child (the vote is a data-path matter)."""
        kids = quorum_children(node)
        child = kids[0].child if kids else None
        if child is not None and child.driver is not None:
            return child.driver.read(child, offset, length)
        return bytes(length)

    def filename(self, node: Node) -> str:
        """Quorum has no filename of its own."""
        del node
        return ""

    def gather_child_options(
        self, node: Node, full_options: Callable[[Node], dict[str, Any]]
    ) -> dict[str, Any]:
        """quorum_gather_child_options: one gap-less ``children`` list."""
        return {
            "children": [
                full_options(e.child) for e in quorum_children(node) if e.child is not None
            ]
        }


DRIVERS = (Quorum(),)
