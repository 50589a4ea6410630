"""``x-blockdev-set-iothread``: move a node's part of the graph to an iothread.

QEMU 7.2's checks, in its order: the node by node name only; unless
``force``, no BlockBackend directly above the node (an export's, a job's);
the iothread (``null`` means the main loop; a ``main-loop`` object is not
an iothread).  Then the whole connected part moves
(``qmpgraph.graph.aio_context``), or nothing does if a fixed-iothread
export refuses.  A move drains the nodes it moves, so the jobs holding them
pause and resume (their JOB_STATUS_CHANGE pairs); a move to the context the
node is in already does nothing.

The change shows nowhere in the query output; it decides later refusals
(``fixed-iothread`` exports).  ``export_iothread`` is the part of
``block-export-add`` (``exports.py``) that moves the node and pins a fixed
export's BlockBackend.  What does not live here: the context model
(``qmpgraph.graph.aio_context``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.errors import GenericError, QMPError
from qmpgraph.graph.aio_context import change_context, context_of, pin
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.jobs.drain import drain_nodes_bounce
from qmpgraph.objects import tree_for
from qmpgraph.objects.misc import IOThread
from qmpgraph.objects.qom import ObjectTree

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon
    from qmpgraph.transactions.engine import Transaction


def iothread_by_id(tree: ObjectTree, name: str) -> IOThread | None:
    """iothread_by_id: an IOThread object by id (or QOM path), else None."""
    if "/" not in name:
        obj = tree.lookup(name)
    else:
        try:
            obj = tree.resolve(name)
        except QMPError:
            return None
    return obj if isinstance(obj, IOThread) else None


@command("x-blockdev-set-iothread")
def x_blockdev_set_iothread(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Move ``node-name`` (and all linked to it) to ``iothread``, or back to main."""
    daemon = ctx.daemon
    graph = daemon.graph
    node_name = str(args["node-name"])
    node = graph.lookup(node_name)
    if node is None:
        raise GenericError(f"Failed to find node with node-name='{node_name}'")
    if not args.get("force", False) and any(
        isinstance(edge.parent, BlockBackend) for edge in node.parents
    ):
        raise GenericError(
            f"Node {node_name} is associated with a BlockBackend and could be in use "
            "(use force=true to override this check)"
        )
    target = args["iothread"]
    context: str | None = None
    if target is not None:
        name = str(target)
        iothread = iothread_by_id(tree_for(graph), name)
        if iothread is None:
            raise GenericError(f"Cannot find iothread {name}")
        context = iothread.path()
    moved = change_context(node, context)
    if moved:
        drain_nodes_bounce(daemon, {n.id for n in moved})


def export_iothread(
    tran: Transaction, daemon: Daemon, node: Node, iothread: IOThread | None, fixed: bool
) -> Callable[[BlockBackend], None]:
    """blk_exp_add's ``iothread``: move ``node``'s part there (a refusal is
    the command's error only with ``fixed``, and a move stays even if the
    export then fails); returns what to call with the export's
    BlockBackend, which with ``fixed`` refuses later moves once the export
    exists."""
    if iothread is not None:
        try:
            moved = change_context(node, iothread.path())
        except GenericError:
            if fixed:
                raise
            moved = []
        if moved:
            drain_nodes_bounce(daemon, {n.id for n in moved})

    def attached(bb: BlockBackend) -> None:
        if fixed:
            context = context_of(node)
            tran.on_commit(lambda: pin(bb, context))

    return attached
