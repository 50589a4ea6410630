"""A frozen bitmap's successor, abdication and the shared checks, in-process.

What QEMU shows was taken from qemu-storage-daemon 7.2 by the differential
scripts bitmap-x-busy and bitmap-x-txn (a sync bitmap is busy and recording
through its successor; after the job the successor carries the name, in its
own place in the list); here the registry's side is checked: the records
undo every step, so the graph digest comes back after an abort.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.bitmaps import registry
from qmpgraph.bitmaps.checks import ALLOW_RO, DEFAULT, check
from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.transactions.engine import Transaction


def _setup() -> tuple[Client, DirtyBitmap]:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20})
    c.ok("block-dirty-bitmap-add", {"node": "n", "name": "sync", "granularity": 4096})
    c.ok("block-dirty-bitmap-add", {"node": "n", "name": "later"})
    node = c.daemon.graph.lookup("n")
    assert node is not None
    registry.mark_dirty(node, 0, 4096)
    bm = registry.find(node, "sync")
    assert bm is not None
    return c, bm


def _freeze(tran: Transaction, c: Client, bm: DirtyBitmap) -> DirtyBitmap:
    """What a backup job does at its start."""
    node = c.daemon.graph.lookup("n")
    assert node is not None
    successor = DirtyBitmap(None, bm.size, bm.granularity)
    registry.add(tran, c.daemon.graph, node, successor)
    registry.change_flags(tran, bm, disabled=True, busy=True)
    registry.set_successor(tran, bm, successor)
    return successor


def test_a_frozen_bitmap_records_through_its_successor() -> None:
    c, bm = _setup()
    tran = Transaction()
    successor = _freeze(tran, c, bm)
    assert bm.disabled and bm.recording
    successor.disabled = True
    assert not bm.recording
    with pytest.raises(GenericError, match="in use by another operation and cannot be used"):
        check(bm, ALLOW_RO)


def test_abdicate_gives_the_name_and_place_and_aborts_back() -> None:
    c, bm = _setup()
    node = c.daemon.graph.lookup("n")
    assert node is not None
    with c.daemon.graph_transaction("freeze", {}) as tran:
        successor = _freeze(tran, c, bm)
    bm.persistent = True
    before = graph_digest(c.daemon.graph)
    tran = Transaction()
    got = registry.abdicate(tran, node, bm)
    assert got is successor
    assert successor.name == "sync" and successor.persistent
    assert [b.name for b in registry.bitmaps_of(node)] == ["sync", "later"]
    assert successor.count() == 0  # only what was written while frozen
    tran.abort()
    assert graph_digest(c.daemon.graph) == before
    assert [b.name for b in registry.bitmaps_of(node)] == [None, "later", "sync"]
    assert bm.successor is successor and bm.busy and bm.persistent


def test_checks_in_qemus_order() -> None:
    bm = DirtyBitmap("b", 1 << 20, 65536)
    bm.readonly = bm.inconsistent = True
    check(bm, 0)  # no flags: nothing is checked
    with pytest.raises(GenericError, match=r"^Bitmap 'b' is readonly and cannot be modified$"):
        check(bm, DEFAULT)
    with pytest.raises(GenericError, match=r"^Bitmap 'b' is inconsistent and cannot be used$"):
        check(bm, ALLOW_RO)
