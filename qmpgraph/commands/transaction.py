"""QMP ``transaction``: QEMU 7.2's own action table and completion rules (section 4.4).

Lives here: ``BlkAction`` (QEMU's BlkActionState: one action of a QMP
transaction with ``prepare``/``commit``/``abort``/``clean``), the action
registry (``@action(kind)``), ``run_actions`` (the 7.2 algorithm), the
``transaction`` command, and the actions that are not snapshots (``abort``
and the not-yet-supported backup actions).

Rules (QEMU 7.2, not 8.1):

* prepares run in list order and stop at the first error; then every
  prepared action commits in list order (FIFO), or, on failure, every
  prepared action including the failing one aborts in reverse order; then
  every action cleans in list order;
* the completion-mode check is made inside each action's prepare ("Action
  '%s' does not support Transaction property completion-mode = %s", capital
  T), so the actions before it were prepared and are aborted;
* the whole QMP command is ONE engine transaction: an action's prepare,
  commit and clean change the graph through engine actions.  On failure the
  engine abort restores the graph exactly, which is what QEMU's per-action
  aborts re-derive; so ``BlkAction.abort`` only undoes effects outside the
  graph (none so far: image files created by a prepare stay, as in QEMU),
  and ``clean`` is skipped on failure for the same reason.

What does not live here: the snapshot actions and commands (``snapshot.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.daemon import Daemon
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Node
from qmpgraph.jobs.drain import drain_all_bounce
from qmpgraph.transactions.engine import Transaction


class BlkAction:
    """One action of a QMP transaction (QEMU's BlkActionState plus its ops)."""

    # Whether the action accepts completion-mode = grouped (only the backups).
    grouped_ok: ClassVar[bool] = False

    def __init__(self, daemon: Daemon, kind: str, data: dict[str, Any], mode: str) -> None:
        self.daemon = daemon
        self.kind = kind
        self.data = data
        self.mode = mode

    @property
    def graph(self) -> BlockGraph:
        """The daemon's block graph."""
        return self.daemon.graph

    def check_completion_mode(self) -> None:
        """action_check_completion_mode: refuse a non-individual mode if unsupported."""
        if self.mode != "individual" and not self.grouped_ok:
            raise GenericError(
                f"Action '{self.kind}' does not support Transaction property "
                f"completion-mode = {self.mode}"
            )

    def prepare(self, tran: Transaction) -> None:
        """Do the work (QEMU's prepare); raise ``GenericError`` to fail the transaction."""
        raise NotImplementedError

    def commit(self, tran: Transaction) -> None:
        """Finish the work once every action prepared."""

    def abort(self, tran: Transaction) -> None:
        """Undo effects outside the graph (the engine abort restores the graph)."""

    def clean(self, tran: Transaction) -> None:
        """Release what the action held (successful transactions only, see the module)."""


ActionFactory = Callable[[Daemon, str, dict[str, Any], str], BlkAction]
ACTIONS: dict[str, ActionFactory] = {}


def action(kind: str) -> Callable[[type[BlkAction]], type[BlkAction]]:
    """Register a ``BlkAction`` subclass for the transaction action type ``kind``."""

    def register(cls: type[BlkAction]) -> type[BlkAction]:
        ACTIONS[kind] = cls
        return cls

    return register


def lookup_bs(graph: BlockGraph, device: str | None, node_name: str | None) -> Node:
    """bdrv_lookup_bs: a BlockBackend called ``device``, else a node called ``node_name``."""
    if device:
        bb = graph.backend_by_name(device)
        if bb is not None:
            if bb.root is None or bb.root.child is None:
                raise GenericError(f"Device '{device}' has no medium")
            return bb.root.child
    if node_name:
        node = graph.lookup(node_name)
        if node is not None:
            return node
    raise GenericError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def run_actions(
    daemon: Daemon, tran: Transaction, actions: list[dict[str, Any]], mode: str = "individual"
) -> None:
    """QEMU 7.2's qmp_transaction body, inside the caller's engine transaction."""
    drain_all_bounce(daemon)  # bdrv_drain_all: running jobs pause and resume
    states: list[BlkAction] = []
    try:
        for entry in actions:
            kind = str(entry["type"])
            state = ACTIONS[kind](daemon, kind, dict(entry["data"]), mode)
            states.append(state)
            state.prepare(tran)
    except GenericError:
        for state in reversed(states):
            state.abort(tran)
        raise
    for state in states:
        state.commit(tran)
    for state in states:
        state.clean(tran)


@command("transaction")
def transaction(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Run a list of actions all-or-nothing, as one engine transaction."""
    props = args.get("properties") or {}
    mode = str(props.get("completion-mode", "individual"))
    daemon = ctx.daemon
    with daemon.graph_transaction("transaction", args) as tran:
        run_actions(daemon, tran, list(args["actions"]), mode)


def single_action(ctx: CommandContext, kind: str, args: dict[str, Any]) -> None:
    """blockdev_do_action: a one-action transaction without properties."""
    daemon = ctx.daemon
    with daemon.graph_transaction(kind, args) as tran:
        run_actions(daemon, tran, [{"type": kind, "data": args}])


# -- actions other than external snapshots --------------------------------------


@action("abort")
class AbortAction(BlkAction):
    """The ``abort`` action: its prepare always fails (it ignores the completion mode)."""

    def prepare(self, tran: Transaction) -> None:
        """Fail the transaction."""
        raise GenericError("Transaction aborted using Abort action")


class _NotYet(BlkAction):
    """An action qmpgraph cannot perform yet: QEMU's first checks, then a clear error."""

    def lookups(self) -> None:
        """The checks QEMU makes before the work itself (messages must match)."""

    def prepare(self, tran: Transaction) -> None:
        """Check the completion mode and the lookups, then refuse."""
        self.check_completion_mode()
        self.lookups()
        raise GenericError(f"Transaction action '{self.kind}' is not supported by qmpgraph yet")


# The backup actions are registered by qmpgraph.commands.backup.
# The bitmap actions live in qmpgraph.commands.bitmaps, the internal
# snapshot action in qmpgraph.commands.snapshot_internal.
