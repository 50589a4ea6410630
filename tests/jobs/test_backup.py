"""The backup job at library level: failed commands and aborted transactions
change nothing, the filter while the job runs and after it, the copy, the
point-in-time guarantee against a guest write, drain replays.

Messages and event orders are QEMU's (recorded live from qemu-storage-daemon
7.2; tests/differential/scripts/backup-*.qmp compare the real daemons).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from jobkit import JobClient

from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io.backend import BackendIO
from qmpgraph.transactions.actions import add_root_parent
from qmpgraph.transactions.composite import root_attach

SIZE = 4 << 20  # more than one 1 MiB block-copy task


def _client(tmp_path: Path, virtual: bool = True) -> JobClient:
    c = JobClient(virtual=virtual)
    for name in ("src", "dst", "dst2"):
        path = tmp_path / f"{name}.img"
        path.write_bytes(bytes(range(256)) * (SIZE // 256) if name == "src" else bytes(SIZE))
        c.ok(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": name,
                "file": {"driver": "file", "node-name": f"{name}f", "filename": str(path)},
            },
        )
    return c


def _node(c: JobClient, name: str) -> Node:
    node = c.daemon.graph.lookup(name)
    assert node is not None
    return node


def _guest(c: JobClient, node: Node) -> BackendIO:
    graph = c.daemon.graph
    bb = BlockBackend()
    with c.daemon.graph_transaction("test-guest", {}) as tran:
        add_root_parent(tran, graph, bb)
        root_attach(
            tran, graph, bb, node, "root", role=Role.FILTERED | Role.PRIMARY,
            perm=int(Perm.WRITE | Perm.CONSISTENT_READ), shared=PERM_ALL,
        )  # fmt: skip
    return BackendIO(bb)


def test_failed_backups_change_nothing(tmp_path: Path) -> None:
    c = _client(tmp_path)
    base: dict[str, Any] = {"device": "src", "target": "dst", "sync": "full", "job-id": "b"}
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"target": "src"}, "Source and target cannot be the same"),
        ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"bitmap-mode": "always"}, "Cannot specify bitmap sync mode without a bitmap"),
        ({"x-perf": {"max-chunk": 1000}}, None),
        ({"job-id": "#b"}, "Invalid job ID '#b'"),
        ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
    ]
    for extra, desc in cases:
        if desc is None:
            assert "error" in c.run("blockdev-backup", {**base, **extra})
            continue
        c.fails("blockdev-backup", {**base, **extra}, desc)
    before = graph_digest(c.daemon.graph)
    actions = [
        {"type": "blockdev-backup", "data": {**base, "sync": "none"}},
        {"type": "abort", "data": {}},
    ]
    reply = c.run("transaction", {"actions": actions})
    assert reply["error"]["desc"] == "Transaction aborted using Abort action"
    assert graph_digest(c.daemon.graph) == before
    assert [d["status"] for _, d in c.events("JOB_STATUS_CHANGE")][-4:] == [
        "created",
        "aborting",
        "concluded",
        "null",
    ]
    assert c.ok("query-jobs") == []


async def test_full_backup_is_point_in_time(tmp_path: Path) -> None:
    c = _client(tmp_path, virtual=False)
    guest = _guest(c, _node(c, "src"))
    original = (tmp_path / "src.img").read_bytes()
    with trio.fail_after(10):
        await c.aok(
            "blockdev-backup",
            {
                "job-id": "b",
                "device": "src",
                "target": "dst",
                "sync": "full",
                "speed": 1,
                "filter-node-name": "cbw",
            },
        )
        # The guest device moved onto the filter; its write copies the old data first.
        assert guest.node is _node(c, "cbw")
        await guest.write(SIZE - 70000, b"\xee" * 4096)
        await c.aok("block-job-set-speed", {"device": "b", "speed": 0})
        await c.wait_status("b", None)
    assert guest.node is _node(c, "src")
    assert "cbw" not in c.daemon.graph
    assert (tmp_path / "dst.img").read_bytes() == original
    assert (tmp_path / "src.img").read_bytes()[SIZE - 70000 : SIZE - 65904] == b"\xee" * 4096
    done = c.events("BLOCK_JOB_COMPLETED")
    assert done and done[0][1]["offset"] == SIZE
    assert check_invariants(c.daemon.graph) == []


async def test_grouped_backups_start_paused_then_run(tmp_path: Path) -> None:
    c = _client(tmp_path)
    actions = [
        {
            "type": "blockdev-backup",
            "data": {"device": dev, "target": tgt, "sync": "none", "job-id": tgt},
        }
        for dev, tgt in (("src", "dst"), ("srcf", "dst2"))
    ]
    with trio.fail_after(10):
        await c.aok(
            "transaction", {"actions": actions, "properties": {"completion-mode": "grouped"}}
        )
        statuses = [(d["id"], d["status"]) for _, d in c.events("JOB_STATUS_CHANGE")]
        assert statuses == [
            ("dst", "created"),
            ("dst2", "created"),
            ("dst", "running"),
            ("dst", "paused"),
            ("dst2", "running"),
            ("dst2", "paused"),
            ("dst2", "running"),
            ("dst", "running"),
        ]
        c.clear()
        await c.aok("block-job-cancel", {"device": "dst2"})
        await c.wait_status("dst", None)
    assert [d["device"] for _, d in c.events("BLOCK_JOB_CANCELLED")] == ["dst2", "dst"]
    assert check_invariants(c.daemon.graph) == []
