"""AioContexts: which iothread (or the main loop) each node runs in.

QEMU 7.2 keeps every connected part of the block graph (nodes, the
BlockBackends above them and the jobs holding them) in one AioContext, and
moves a whole part at once (``bdrv_try_change_aio_context``): nothing moves
if any parent refuses.  The only refusal a storage daemon can meet is a
BlockBackend that does not allow the change, i.e. an export added with
``fixed-iothread: true`` ("Cannot change iothread of active block
backend"); a move to the context the node already has succeeds at once.

Contexts are named by the iothread's QOM path, ``None`` for the main loop, and kept
here by ``Node.id`` (a new node, even under an old name, starts in the main
loop, as a new BlockDriverState does); pinned BlockBackends by ``id`` with
a reference held, so that the id is not reused while pinned.  A context
change is not undone when the command that made it fails later (QEMU's
``block-export-add`` keeps the node in the export's iothread even if the
export is then refused), so the state changes directly, not through a
transaction.

Not modelled: contexts carried along when nodes are attached across
contexts (qemu-storage-daemon 7.2 aborts on that, e.g. a ``blockdev-add``
over a node in an iothread), and ``object-del`` of an iothread in use (it
aborts too).  What does not live here: the commands
(``qmpgraph.commands.iothread``, ``block-export-add``).
"""

from __future__ import annotations

from qmpgraph.errors import GenericError
from qmpgraph.graph.model import BlockBackend, Job, Node

_contexts: dict[int, str] = {}
_pinned: dict[int, tuple[BlockBackend, str | None]] = {}


def context_of(node: Node) -> str | None:
    """The iothread ``node`` runs in (``None``: the main loop)."""
    return _contexts.get(node.id)


def pin(backend: BlockBackend, context: str | None) -> None:
    """``backend`` stays in ``context`` (an export with ``fixed-iothread``)."""
    _pinned[id(backend)] = (backend, context)


def unpin(backend: BlockBackend) -> None:
    """``backend`` went away (its export was deleted)."""
    _pinned.pop(id(backend), None)


def connected_nodes(node: Node) -> list[Node]:
    """Every node linked to ``node`` through edges, BlockBackends or jobs."""
    seen = {node.id}
    out = [node]
    todo = [node]
    while todo:
        cur = todo.pop()
        linked: list[Node] = []
        for edge in cur.children:
            if edge.child is not None:
                linked.append(edge.child)
        for edge in cur.parents:
            parent = edge.parent
            if isinstance(parent, Node):
                linked.append(parent)
            elif isinstance(parent, Job):
                linked.extend(e.child for e in parent.edges if e.child is not None)
        for other in linked:
            if other.id not in seen:
                seen.add(other.id)
                out.append(other)
                todo.append(other)
    return out


def change_context(node: Node, context: str | None) -> list[Node]:
    """Move ``node``'s part of the graph to ``context``; the nodes moved
    (none if it is there already).  Raises GenericError, moving nothing,
    when a pinned BlockBackend in the part is in another context."""
    if context_of(node) == context:
        return []
    nodes = connected_nodes(node)
    for cur in nodes:
        for edge in cur.parents:
            held = _pinned.get(id(edge.parent))
            if held is not None and held[0] is edge.parent and held[1] != context:
                raise GenericError("Cannot change iothread of active block backend")
    for cur in nodes:
        if context is None:
            _contexts.pop(cur.id, None)
        else:
            _contexts[cur.id] = context
    return nodes
