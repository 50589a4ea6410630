"""Where a job yields against a command's reply (``disk_wait`` / ``turn_wait``).

The orders below are qemu-storage-daemon 7.2's, recorded live with the same
commands (tests/differential/scripts/backup-error-report.qmp and
job-err-*.qmp compare them against qsd on every run): a backup whose source
read blkdebug fails sends BLOCK_JOB_ERROR one main-loop turn in, before the
reply, and ends after it; with ``immediately`` the job ends before the
reply; a source read that reaches the disk lets the reply go first.  Here
the library runs them as the monitor does (``jobkit``), with the real clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from jobkit import JobClient

from qmpgraph.jobs.core import Job

SIZE = 1 << 20


def _client(tmp_path: Path, rule: dict[str, Any] | None) -> JobClient:
    c = JobClient()
    src = tmp_path / "src.img"
    src.write_bytes(b"\x11" * SIZE)  # all data: block-copy makes one task
    (tmp_path / "dst.img").write_bytes(bytes(SIZE))
    image = {"driver": "file", "filename": str(src)}
    if rule is not None:
        file: dict[str, Any] = {"driver": "blkdebug", "inject-error": [rule], "image": image}
    else:
        file = image
    c.ok("blockdev-add", {"driver": "raw", "node-name": "src", "file": file})
    c.ok(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "dst",
            "file": {"driver": "file", "filename": str(tmp_path / "dst.img")},
        },
    )
    return c


def _order(c: JobClient) -> list[str]:
    """The transcript as reply / event names / job statuses."""
    out = []
    for m in c.transcript:
        if "return" in m or "error" in m:
            out.append("reply")
        elif m["event"] == "JOB_STATUS_CHANGE":
            out.append(m["data"]["status"])
        else:
            out.append(m["event"])
    return out


async def _backup(c: JobClient, **extra: Any) -> None:
    args = {"job-id": "j", "device": "src", "target": "dst", "sync": "full", **extra}
    with trio.fail_after(10):
        await c.aok("blockdev-backup", args)
        await c.wait_status("j", None)


async def test_injected_error_comes_one_turn_in(tmp_path: Path) -> None:
    c = _client(tmp_path, {"event": "none", "iotype": "read", "errno": 5})
    await _backup(c)
    assert _order(c) == [
        "created", "running", "paused", "running", "BLOCK_JOB_ERROR", "reply",
        "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip


async def test_immediate_error_ends_the_job_before_the_reply(tmp_path: Path) -> None:
    rule = {"event": "none", "iotype": "read", "errno": 5, "immediately": True}
    c = _client(tmp_path, rule)
    await _backup(c)
    assert _order(c) == [
        "created", "running", "paused", "running", "BLOCK_JOB_ERROR",
        "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null", "reply",
    ]  # fmt: skip


async def test_stop_then_cancel_ends_after_the_reply_of_cancel(tmp_path: Path) -> None:
    # The cancelled new call's task fails one turn in: the job ends after it.
    c = _client(tmp_path, {"event": "none", "iotype": "read", "errno": 5})
    with trio.fail_after(10):
        await c.aok(
            "blockdev-backup",
            {"job-id": "j", "device": "src", "target": "dst", "sync": "full",
             "on-source-error": "stop"},
        )  # fmt: skip
        assert _order(c)[-3:] == ["BLOCK_JOB_ERROR", "paused", "reply"]
        c.clear()
        await c.aok("job-cancel", {"id": "j"})
        await c.wait_status("j", None)
    assert _order(c) == [
        "running", "reply", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null",
    ]  # fmt: skip


async def test_disk_read_lets_the_reply_go_first(tmp_path: Path) -> None:
    c = _client(tmp_path, None)
    await _backup(c)
    assert _order(c) == [
        "created", "running", "paused", "running", "reply",
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null",
    ]  # fmt: skip


async def test_yield_points_hold_only_the_jobs_own_task(tmp_path: Path) -> None:
    # Mechanism: a second turn holds the job, a task the job started does not.
    c = _client(tmp_path, None)
    job_box: list[Job] = []
    seen: list[str] = []

    class TurnJob(Job):
        job_type = "stream"

        async def run(self) -> None:
            await self._yield_point(False)
            seen.append("turn 1")

            async def helper() -> None:
                await self._yield_point(True)
                seen.append("helper")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(helper)
            await self._yield_point(False)
            seen.append("turn 2")

    with trio.fail_after(10):
        job = TurnJob(c.daemon, "t")
        job_box.append(job)
        job.start()
        await c.daemon.before_reply()
        seen.append("reply")
        await c.daemon.after_reply()
        await c.wait_status("t", None)
    assert seen == ["turn 1", "helper", "reply", "turn 2"]
