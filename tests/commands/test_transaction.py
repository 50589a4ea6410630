"""QMP ``transaction``: QEMU 7.2's phase order, completion-mode rules, and all-or-nothing.

Phase order is observed with recording actions registered for the test only:
prepares in list order, commits FIFO, aborts in reverse, cleans FIFO (only
after success; on failure the engine abort restores the graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cmdkit import Client

from qmpgraph.commands import transaction as txn
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.transactions.actions import ref_node, unref_node
from qmpgraph.transactions.engine import Transaction

EVENTS: list[str] = []


class _Recorder(txn.BlkAction):
    """Records its phases; the bitmap ``name`` is the id, "boom" fails its prepare."""

    def prepare(self, tran: Transaction) -> None:
        ident = self.data.get("name", "?")
        EVENTS.append(f"prepare {ident}")
        node = self.graph.lookup("n")
        assert node is not None
        ref_node(tran, node)  # a real graph change, released in clean
        if ident == "boom":
            raise GenericError("boom")

    def commit(self, tran: Transaction) -> None:
        EVENTS.append(f"commit {self.data.get('name')}")

    def abort(self, tran: Transaction) -> None:
        EVENTS.append(f"abort {self.data.get('name')}")

    def clean(self, tran: Transaction) -> None:
        EVENTS.append(f"clean {self.data.get('name')}")
        node = self.graph.lookup("n")
        assert node is not None
        unref_node(tran, self.graph, node)


@pytest.fixture
def recorder() -> Iterator[None]:
    # block-dirty-bitmap-add's schema ({node, name}) carries the test's ids.
    saved = txn.ACTIONS["block-dirty-bitmap-add"]
    txn.ACTIONS["block-dirty-bitmap-add"] = _Recorder
    EVENTS.clear()
    yield
    txn.ACTIONS["block-dirty-bitmap-add"] = saved


def rec(name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": name}}


def client() -> Client:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n"})
    return c


@pytest.mark.usefixtures("recorder")
def test_success_commits_fifo_then_cleans_fifo() -> None:
    c = client()
    c.ok("transaction", {"actions": [rec("1"), rec("2"), rec("3")]})
    assert EVENTS == ["prepare 1", "prepare 2", "prepare 3",
                      "commit 1", "commit 2", "commit 3",
                      "clean 1", "clean 2", "clean 3"]  # fmt: skip


@pytest.mark.usefixtures("recorder")
def test_failure_aborts_prepared_actions_in_reverse() -> None:
    c = client()
    before = graph_digest(c.daemon.graph)
    c.fails("transaction", {"actions": [rec("1"), rec("2"), rec("boom"), rec("4")]}, "boom")
    assert EVENTS == ["prepare 1", "prepare 2", "prepare boom",
                      "abort boom", "abort 2", "abort 1"]  # fmt: skip
    assert graph_digest(c.daemon.graph) == before


@pytest.mark.usefixtures("recorder")
def test_grouped_refusal_comes_after_earlier_prepares() -> None:
    c = client()
    sync = {"node-name": "n", "snapshot-file": "/nonexistent/x"}
    actions = [rec("1"), {"type": "blockdev-snapshot-sync", "data": sync}]
    c.fails("transaction", {"actions": actions, "properties": {"completion-mode": "grouped"}},
            "Action 'blockdev-snapshot-sync' does not support Transaction property "
            "completion-mode = grouped")  # fmt: skip
    assert EVENTS == ["prepare 1", "abort 1"]


def test_empty_and_abort() -> None:
    c = client()
    assert c.ok("transaction", {"actions": []}) == {}
    c.fails("transaction", {"actions": [{"type": "abort", "data": {}}]},
            "Transaction aborted using Abort action")  # fmt: skip
    records = [r for r in c.records if r.get("command") == "transaction"]
    assert len(records) == 2  # one engine transaction per QMP command


def test_unsupported_actions_say_so_after_qemus_checks() -> None:
    c = client()
    c.fails("transaction",
            {"actions": [{"type": "blockdev-backup",
                          "data": {"device": "nope", "target": "n", "sync": "full"}}]},
            "Cannot find device='nope' nor node-name='nope'")  # fmt: skip
    # (The bitmap actions are implemented: tests/bitmaps.)
