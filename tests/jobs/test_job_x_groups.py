"""Grouped backups on separate chains, driven as a management stack does.

The drained sources of a transaction's backup actions end one by one, in
list order, so each job goes on when its own source's drain ends; a group
whose member is cancelled while another member is user-paused finishes that
one after the cancelled job's events: it leaves its pause point (running),
then aborts.  Event orders were recorded live from qemu-storage-daemon 7.2
(tests/differential/scripts/job-x-txn-backup.qmp compares the daemons).
"""

from __future__ import annotations

from pathlib import Path

import trio
from jobkit import JobClient

from qmpgraph.graph.invariants import check_invariants

SIZE = 4 << 20  # more than one 1 MiB block-copy task: the rate limit bites


def _client(tmp_path: Path) -> JobClient:
    c = JobClient(virtual=False)
    for name in ("a", "b", "ta", "tb"):
        path = tmp_path / f"{name}.img"
        path.write_bytes(b"\x01" * SIZE if name in ("a", "b") else bytes(SIZE))
        c.ok(
            "blockdev-add",
            {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}},
        )
    return c


def _backups(mode: str) -> dict[str, object]:
    actions = [
        {
            "type": "blockdev-backup",
            "data": {
                "job-id": job,
                "device": dev,
                "target": tgt,
                "sync": "full",
                "speed": 1,
                "auto-dismiss": False,
            },
        }
        for job, dev, tgt in (("j", "a", "ta"), ("k", "b", "tb"))
    ]
    return {"actions": actions, "properties": {"completion-mode": mode}}


def _statuses(c: JobClient) -> list[tuple[str, str]]:
    return [(d["id"], d["status"]) for _, d in c.events("JOB_STATUS_CHANGE")]


async def test_each_source_drain_ends_in_list_order(tmp_path: Path) -> None:
    c = _client(tmp_path)
    with trio.fail_after(10):
        await c.aok("transaction", _backups("grouped"))
    assert _statuses(c) == [
        ("j", "created"),
        ("k", "created"),
        ("j", "running"),
        ("j", "paused"),
        ("k", "running"),
        ("k", "paused"),
        ("j", "running"),
        ("k", "running"),
    ]


async def test_cancel_in_group_finishes_a_paused_peer_after(tmp_path: Path) -> None:
    c = _client(tmp_path)
    with trio.fail_after(10):
        await c.aok("transaction", _backups("grouped"))
        await c.idle()  # both asleep on their rate limit
        await c.aok("job-pause", {"id": "j"})
        await c.idle()
        c.clear()
        await c.aok("job-cancel", {"id": "k"})
        await c.idle()
        events = [
            (name, data.get("status") or data["device"], data.get("id", ""))
            for name, data in c.events("JOB_STATUS_CHANGE", "BLOCK_JOB_CANCELLED")
        ]
        assert events == [
            ("JOB_STATUS_CHANGE", "aborting", "k"),
            ("BLOCK_JOB_CANCELLED", "k", ""),
            ("JOB_STATUS_CHANGE", "concluded", "k"),
            ("JOB_STATUS_CHANGE", "running", "j"),
            ("JOB_STATUS_CHANGE", "aborting", "j"),
            ("BLOCK_JOB_CANCELLED", "j", ""),
            ("JOB_STATUS_CHANGE", "concluded", "j"),
        ]
        jobs = {j["id"]: (j["status"], j.get("error")) for j in await c.aok("query-jobs")}
        assert jobs == {
            "j": ("concluded", "Operation canceled"),
            "k": ("concluded", "Operation canceled"),
        }
        for job in ("j", "k"):
            await c.aok("job-dismiss", {"id": job})
        await c.idle()
    assert await c.aok("query-jobs") == []
    assert check_invariants(c.daemon.graph) == []


async def test_individual_cancel_leaves_the_other_running(tmp_path: Path) -> None:
    c = _client(tmp_path)
    with trio.fail_after(10):
        await c.aok("transaction", _backups("individual"))
        await c.idle()
        c.clear()
        await c.aok("job-cancel", {"id": "k"})
        await c.idle()
        jobs = {j["id"]: j["status"] for j in await c.aok("query-jobs")}
        assert jobs == {"j": "running", "k": "concluded"}
        await c.aok("job-cancel", {"id": "j"})
        await c.idle()
    assert [d["device"] for _, d in c.events("BLOCK_JOB_CANCELLED")] == ["k", "j"]


async def test_drain_all_pauses_by_first_node_resumes_by_last(tmp_path: Path) -> None:
    # As job-x-txn-drive shows live: bdrv_drain_all walks the nodes in
    # creation order, so the job whose oldest node comes first pauses first,
    # and the job whose newest node comes first goes on first.
    c = _client(tmp_path)
    actions = [
        {
            "type": "blockdev-backup",
            "data": {"job-id": job, "device": dev, "target": tgt, "sync": "full", "speed": 1},
        }
        for job, dev, tgt in (("j", "a", "tb"), ("k", "b", "ta"))
    ]
    with trio.fail_after(10):
        await c.aok("transaction", {"actions": actions})
        await c.idle()
        c.clear()
        reply = await c.arun("transaction", {"actions": [{"type": "abort", "data": {}}]})
        assert reply["error"]["desc"] == "Transaction aborted using Abort action"
        assert _statuses(c) == [
            ("k", "paused"),
            ("j", "paused"),
            ("j", "running"),
            ("k", "running"),
        ]
        for job in ("j", "k"):
            await c.aok("job-cancel", {"id": job})
        await c.idle()
