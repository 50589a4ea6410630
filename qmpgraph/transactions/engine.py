"""The generic transaction engine (QEMU's util/transactions.c, plus hooks).

Rules:

* An action's prepare step has *already* changed the graph when it is added;
  the action (an undo record) only knows how to finish (``commit``) or undo
  (``abort``) that change, and what to release afterwards (``clean``).
* Actions are finalized newest first (LIFO) for both commit and abort; every
  ``clean`` runs after all of them, also newest first.
* Irreversible effects (events, closing files) are queued with
  ``on_commit`` and run, in registration order, only after a commit.
* States: OPEN -> COMMITTED | ABORTED, by the table ``_TRANSITIONS``; a
  finished transaction rejects everything.
* Fault injection for tests: ``Transaction(fail_at=n)`` raises
  ``InjectedFault`` right after the n-th action (0-based) is registered, so the
  abort path is exercised at every position.

What does not live here: the graph actions (``actions.py``) and composites.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, ClassVar

from qmpgraph.graph.model import BlockBackend, Edge, Job, Node

_epoch = 0


def mutation_epoch() -> int:
    """A process-wide counter that moves whenever any graph change is registered.

    Every change to a graph is registered with ``Transaction.add``, so a value
    computed from a graph (a cached query reply) is still valid while this
    counter has not moved.
    """
    return _epoch


class InjectedFault(Exception):
    """Raised by a transaction's fault-injection hook (tests only)."""


class TxnState(enum.Enum):
    """Life cycle of a transaction."""

    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"


_TRANSITIONS = {
    (TxnState.OPEN, "commit"): TxnState.COMMITTED,
    (TxnState.OPEN, "abort"): TxnState.ABORTED,
}


def _describe_value(value: Any) -> Any:
    """A JSON-able stand-in for an undo record field."""
    if isinstance(value, Node):
        return value.node_name
    if isinstance(value, Edge):
        return {"edge": value.id, "name": value.name, "parent": value.parent.label()}
    if isinstance(value, BlockBackend | Job):
        return value.label()
    if isinstance(value, dict):
        return {str(k): _describe_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_describe_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@dataclass(frozen=True, slots=True)
class Action:
    """An undo record: plain references and old values, finished by the engine.

    Subclasses are frozen slotted dataclasses; they override the hooks they need.
    """

    name: ClassVar[str] = "action"

    def commit(self) -> None:
        """Finish the change (e.g. drop a reference kept alive until now)."""

    def abort(self) -> None:
        """Undo the change made when this record was created."""

    def clean(self) -> None:
        """Release what both outcomes no longer need."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description: the action name and its undo fields."""
        return {
            "action": self.name,
            "undo": {f.name: _describe_value(getattr(self, f.name)) for f in fields(self)},
        }


class Transaction:
    """A list of actions finalized newest first; also a context manager.

    ``with Transaction() as tran:`` commits when the block succeeds and aborts
    (re-raising) when it raises.
    """

    def __init__(self, *, fail_at: int | None = None) -> None:
        self._actions: list[Action] = []
        self._on_commit: list[Callable[[], None]] = []
        self.state = TxnState.OPEN
        self.fail_at = fail_at
        self.added = 0

    def _move(self, event: str) -> None:
        nxt = _TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise RuntimeError(f"cannot {event} a transaction that is {self.state.value}")
        self.state = nxt

    def add(self, action: Action) -> None:
        """Register an undo record for a change already made."""
        if self.state is not TxnState.OPEN:
            raise RuntimeError(f"transaction is {self.state.value}")
        global _epoch  # noqa: PLW0603 (one process-wide counter, read via mutation_epoch)
        _epoch += 1
        self._actions.append(action)
        index = self.added
        self.added += 1
        if self.fail_at is not None and index == self.fail_at:
            raise InjectedFault(f"injected fault after action {index} ({action.name})")

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after a successful commit only (events, file removal)."""
        if self.state is not TxnState.OPEN:
            raise RuntimeError(f"transaction is {self.state.value}")
        self._on_commit.append(callback)

    def mark(self) -> int:
        """A savepoint: the number of actions registered so far."""
        return len(self._actions)

    def rollback_to(self, mark: int) -> None:
        """Abort and clean (newest first) the actions registered after ``mark``.

        Used where QEMU runs a nested transaction whose failure is ignored
        (the loosening refresh after a detach).
        """
        tail = self._actions[mark:]
        del self._actions[mark:]
        for action in reversed(tail):
            action.abort()
        for action in reversed(tail):
            action.clean()

    def log(self) -> list[dict[str, Any]]:
        """Descriptions of the registered actions, oldest first."""
        return [a.describe() for a in self._actions]

    def commit(self) -> None:
        """Commit every action newest first, clean them, then run on-commit hooks."""
        self._move("commit")
        actions, self._actions = self._actions, []
        for action in reversed(actions):
            action.commit()
        for action in reversed(actions):
            action.clean()
        hooks, self._on_commit = self._on_commit, []
        for hook in hooks:
            hook()

    def abort(self) -> None:
        """Abort every action newest first, then clean them; drop on-commit hooks."""
        self._move("abort")
        actions, self._actions = self._actions, []
        for action in reversed(actions):
            action.abort()
        for action in reversed(actions):
            action.clean()
        self._on_commit = []

    def finalize(self, ok: bool) -> None:
        """Commit if ``ok``, else abort (QEMU's tran_finalize)."""
        if ok:
            self.commit()
        else:
            self.abort()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not TxnState.OPEN:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()
