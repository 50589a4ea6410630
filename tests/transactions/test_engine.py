"""The generic transaction engine: ordering, hooks, states, fault injection, log."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass, field

import graphkit
import pytest

from qmpgraph.graph.graph import BlockGraph
from qmpgraph.transactions.engine import Action, InjectedFault, Transaction, TxnState


@dataclass(frozen=True, slots=True)
class Rec(Action):
    name = "rec"
    tag: str
    out: list[str] = field(compare=False)

    def commit(self) -> None:
        self.out.append(f"commit {self.tag}")

    def abort(self) -> None:
        self.out.append(f"abort {self.tag}")

    def clean(self) -> None:
        self.out.append(f"clean {self.tag}")


def test_commit_is_lifo_then_clean_then_hooks() -> None:
    out: list[str] = []
    tran = Transaction()
    tran.add(Rec("a", out))
    tran.on_commit(lambda: out.append("hook"))
    tran.add(Rec("b", out))
    tran.commit()
    assert out == ["commit b", "commit a", "clean b", "clean a", "hook"]
    assert tran.state is TxnState.COMMITTED


def test_abort_is_lifo_and_drops_hooks() -> None:
    out: list[str] = []
    tran = Transaction()
    tran.add(Rec("a", out))
    tran.add(Rec("b", out))
    tran.on_commit(lambda: out.append("hook"))
    tran.abort()
    assert out == ["abort b", "abort a", "clean b", "clean a"]


def test_finished_transaction_rejects_everything() -> None:
    tran = Transaction()
    tran.commit()
    with pytest.raises(RuntimeError):
        tran.commit()
    with pytest.raises(RuntimeError):
        tran.abort()
    with pytest.raises(RuntimeError):
        tran.add(Rec("x", []))
    with pytest.raises(RuntimeError):
        tran.on_commit(lambda: None)


def test_context_manager_aborts_on_exception() -> None:
    out: list[str] = []
    with pytest.raises(ValueError), Transaction() as tran:
        tran.add(Rec("a", out))
        raise ValueError
    assert out == ["abort a", "clean a"]
    assert tran.state is TxnState.ABORTED


def test_fault_injection_raises_after_registering() -> None:
    out: list[str] = []
    with pytest.raises(InjectedFault), Transaction(fail_at=1) as tran:
        tran.add(Rec("a", out))
        tran.add(Rec("b", out))
        tran.add(Rec("c", out))
    assert out == ["abort b", "abort a", "clean b", "clean a"]


def test_rollback_to_mark() -> None:
    out: list[str] = []
    tran = Transaction()
    tran.add(Rec("a", out))
    mark = tran.mark()
    tran.add(Rec("b", out))
    tran.rollback_to(mark)
    tran.commit()
    assert out == ["abort b", "clean b", "commit a", "clean a"]


def test_undo_records_are_frozen_and_slotted() -> None:
    rec = Rec("a", [])
    with pytest.raises(FrozenInstanceError):
        rec.tag = "b"  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")


def test_log_is_json_with_names_not_objects() -> None:
    graph = BlockGraph(name_seed=0)
    with Transaction() as tran:
        f = graphkit.protocol(graph, "f")
        graphkit.fmt_on(tran, graph, "q", f)
        log = tran.log()
    text = json.dumps(log)
    assert '"create-edge"' in text and '"replace-child"' in text
    moves = [a for a in log if a["action"] == "replace-child"]
    assert moves[0]["undo"]["new_child"] == "f"
    assert moves[0]["undo"]["edge"]["parent"] == "node:q"
