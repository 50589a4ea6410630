"""Bitmap commands and transaction actions in-process: rollback and state.

Expected messages and outcomes were taken from qemu-storage-daemon 7.2 (the
differential scripts tests/differential/scripts/bitmap-*.qmp hold them); here
the engine side is checked: a failing transaction leaves the graph digest
(which includes every bitmap's flags and bits) unchanged, at every position
of the failure, and the bits written by the data path survive a rollback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.bitmaps import registry
from qmpgraph.graph.digest import graph_digest, graph_state


def _client() -> Client:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "m", "size": 1 << 20})
    c.ok("block-dirty-bitmap-add", {"node": "n", "name": "b0"})
    c.ok("block-dirty-bitmap-add", {"node": "n", "name": "b1", "granularity": 4096})
    c.ok("block-dirty-bitmap-add", {"node": "m", "name": "b0", "disabled": True})
    node = c.daemon.graph.lookup("n")
    assert node is not None
    registry.mark_dirty(node, 70000, 5000)  # what a finished write does
    return c


def _bitmaps(c: Client, node: str) -> list[dict[str, Any]]:
    for info in c.ok("query-named-block-nodes"):
        if info["node-name"] == node:
            return list(info.get("dirty-bitmaps", []))
    raise AssertionError(node)


ACTIONS: list[dict[str, Any]] = [
    {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "new", "granularity": 512}},
    {"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "b1"}},
    {"type": "block-dirty-bitmap-disable", "data": {"node": "n", "name": "b0"}},
    {"type": "block-dirty-bitmap-enable", "data": {"node": "m", "name": "b0"}},
    {"type": "block-dirty-bitmap-merge",
     "data": {"node": "m", "target": "b0", "bitmaps": [{"node": "n", "name": "b1"}]}},
    {"type": "block-dirty-bitmap-remove", "data": {"node": "n", "name": "b0"}},
]  # fmt: skip


@pytest.mark.parametrize("fail_at", range(len(ACTIONS) + 1))
def test_a_failing_transaction_restores_every_bitmap(fail_at: int) -> None:
    c = _client()
    before = graph_digest(c.daemon.graph)
    assert "bitmaps" in graph_state(c.daemon.graph)
    actions = [*ACTIONS[:fail_at], {"type": "abort", "data": {}}, *ACTIONS[fail_at:]]
    c.fails("transaction", {"actions": actions}, "Transaction aborted using Abort action")
    assert graph_digest(c.daemon.graph) == before


def test_the_whole_set_commits() -> None:
    c = _client()
    c.ok("transaction", {"actions": ACTIONS})
    assert [(b["name"], b["count"], b["recording"]) for b in _bitmaps(c, "n")] == [
        ("new", 0, True),
        ("b1", 0, True),
    ]
    # Prepares run in list order: b1 was cleared before it was merged into m's b0.
    assert [(b["name"], b["count"], b["recording"]) for b in _bitmaps(c, "m")] == [("b0", 0, True)]


def test_merge_counts_in_the_target_granularity() -> None:
    c = _client()
    c.ok("block-dirty-bitmap-merge",
         {"node": "m", "target": "b0", "bitmaps": [{"node": "n", "name": "b1"}]})  # fmt: skip
    # 70000..75000 touches 4 KiB granules 17 and 18, both inside 64 KiB granule 1.
    assert _bitmaps(c, "n")[0]["count"] == 2 * 4096
    assert _bitmaps(c, "m")[0]["count"] == 65536


def test_enable_abort_disables_a_bitmap_that_was_busy() -> None:
    """7.2: [remove b0, enable b0] fails and leaves b0 disabled (checked on qsd)."""
    c = _client()
    reply = c.run("transaction", {"actions": [
        {"type": "block-dirty-bitmap-remove", "data": {"node": "n", "name": "b0"}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "n", "name": "b0"}},
    ]})  # fmt: skip
    assert reply["error"]["desc"] == (
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    )
    b0 = next(b for b in _bitmaps(c, "n") if b["name"] == "b0")
    assert (b0["recording"], b0["busy"]) == (False, False)


def test_deleted_nodes_take_their_bitmaps() -> None:
    c = _client()
    c.ok("blockdev-del", {"node-name": "m"})
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "m", "size": 1 << 20})
    c.fails("x-debug-block-dirty-bitmap-sha256", {"node": "m", "name": "b0"},
            "Dirty bitmap 'b0' not found")  # fmt: skip
    c.ok("block-dirty-bitmap-add", {"node": "m", "name": "b0"})
    assert [b["name"] for b in _bitmaps(c, "m")] == ["b0"]
