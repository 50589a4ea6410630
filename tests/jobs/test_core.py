"""The job core with a test job type: statuses, verbs, events, progress, virtual clock.

The expected event orders are QEMU's, recorded live from qemu-storage-daemon
7.2 with block-stream (tests/differential/scripts/job-*.qmp compare the real
commands); here a minimal job type isolates the core from any data path.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from jobkit import JobClient

from qmpgraph.errors import GenericError
from qmpgraph.graph.perms import PERM_ALL, Perm
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.state import TRANSITIONS, VERBS, JobStatus, JobVerb, check_verb

CHUNK = 65536


class StepJob(BlockJob):
    """Copies nothing: ``steps`` chunks of progress, rate-limited, cancellable."""

    job_type = "stream"

    def __init__(self, *args: Any, steps: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps

    async def run(self) -> None:
        self.progress_set_remaining(self.steps * CHUNK)
        delay = 0
        for _ in range(self.steps):
            await self.sleep_ns(delay)
            if self.is_cancelled():
                return
            await self.io_point()
            self.progress_update(CHUNK)
            delay = self.ratelimit_delay(CHUNK)


def start_job(c: JobClient, job_id: str = "j", **kwargs: Any) -> StepJob:
    """What a job command does: one transaction creating the job, then start."""
    with c.daemon.graph_transaction("test-job", {}) as tran:
        node = c.daemon.graph.lookup("n")
        assert node is not None
        job = StepJob(
            c.daemon, job_id, tran, node, perm=int(Perm.CONSISTENT_READ), shared=PERM_ALL,
            **kwargs,
        )  # fmt: skip
    job.start()
    return job


def make_client(virtual: bool = False) -> JobClient:
    c = JobClient(virtual=virtual)
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 4 * CHUNK})
    return c


def statuses(c: JobClient) -> list[str]:
    return [d["status"] for _, d in c.events("JOB_STATUS_CHANGE")]


def test_tables_match_qemu() -> None:
    assert TRANSITIONS[JobStatus.CONCLUDED] == {JobStatus.NULL}
    assert VERBS[JobVerb.COMPLETE] == {JobStatus.READY, JobStatus.STANDBY}
    with pytest.raises(GenericError) as exc:
        check_verb("x", JobStatus.CONCLUDED, JobVerb.PAUSE)
    assert exc.value.desc == "Job 'x' in state 'concluded' cannot accept command verb 'pause'"


async def test_manual_finalize_and_dismiss() -> None:
    c = make_client()
    start_job(c, auto_finalize=False, auto_dismiss=False)
    await c.aok("query-jobs")
    await c.wait_status("j", "pending")
    assert statuses(c) == ["created", "running", "waiting", "pending"]
    assert c.events("BLOCK_JOB_PENDING") == [("BLOCK_JOB_PENDING", {"type": "stream", "id": "j"})]
    assert await c.aok("query-jobs") == [
        {"id": "j", "type": "stream", "status": "pending",
         "current-progress": 4 * CHUNK, "total-progress": 4 * CHUNK},
    ]  # fmt: skip
    for verb in ("pause", "complete", "dismiss"):
        reply = await c.arun(f"job-{verb}", {"id": "j"})
        assert reply["error"]["desc"] == (
            f"Job 'j' in state 'pending' cannot accept command verb '{verb}'"
        )
    c.clear()
    await c.aok("job-finalize", {"id": "j"})
    assert [m.get("event", "return") for m in c.transcript] == [
        "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE", "return",
    ]  # fmt: skip
    job_info = (await c.aok("query-block-jobs"))[0]
    assert job_info["status"] == "concluded" and job_info["busy"] is False
    # The job still holds its node until it is dismissed.
    node = c.daemon.graph.lookup("n")
    assert node is not None and node.op_blockers
    await c.aok("job-dismiss", {"id": "j"})
    assert statuses(c)[-1] == "null"
    assert await c.aok("query-jobs") == []
    assert not node.op_blockers and not c.daemon.graph.jobs and not c.daemon.graph.backends


async def test_pause_resume_cancel_with_speed() -> None:
    c = make_client()
    start_job(c, speed=1)
    with trio.fail_after(10):
        while (info := (await c.aok("query-block-jobs"))[0])["offset"] < CHUNK:  # noqa: ASYNC110 (polls the job's progress, no event to wait on)
            await trio.sleep(0.001)
    await c.idle()
    # The first chunk went through, then the speed limit holds the job.
    assert (info["offset"], info["status"], info["speed"]) == (CHUNK, "running", 1)
    assert (await c.arun("job-resume", {"id": "j"}))["error"]["desc"] == (
        "Can't resume a job that was not paused"
    )
    c.clear()
    await c.aok("job-pause", {"id": "j"})
    # The pause shows before the reply, as in QEMU.
    assert [m.get("event", "return") for m in c.transcript] == ["JOB_STATUS_CHANGE", "return"]
    assert (await c.arun("job-pause", {"id": "j"}))["error"]["desc"] == "Job is already paused"
    assert (await c.arun("block-job-cancel", {"device": "j"}))["error"]["desc"] == (
        "The block job for device 'j' is currently paused"
    )
    assert (await c.arun("block-job-set-speed", {"device": "j", "speed": -1}))["error"][
        "desc"
    ] == "Parameter 'speed' expects a non-negative value"
    c.clear()
    await c.aok("job-cancel", {"id": "j"})
    await c.wait_status("j", None)
    assert statuses(c) == ["running", "aborting", "concluded", "null"]
    assert [e for e, _ in c.events()][-3] == "BLOCK_JOB_CANCELLED"


async def test_not_found_errors() -> None:
    c = make_client()
    assert (await c.arun("job-pause", {"id": "x"}))["error"] == {
        "class": "GenericError", "desc": "Job not found",
    }  # fmt: skip
    assert (await c.arun("block-job-pause", {"device": "x"}))["error"] == {
        "class": "DeviceNotActive", "desc": "Block job 'x' not found",
    }  # fmt: skip


async def test_virtual_clock_is_deterministic() -> None:
    async def one_run() -> list[dict[str, Any]]:
        c = make_client(virtual=True)
        start_job(c, speed=CHUNK * 10)  # one chunk per 100 ms slice
        await c.aok("query-jobs")
        return c.transcript

    with trio.fail_after(10):
        first = await one_run()
        second = await one_run()
    assert first == second
    stamps = [m["timestamp"] for m in first if "event" in m]
    assert stamps[0] == {"seconds": 0, "microseconds": 0}
    # The speed limit held in virtual time: 3 sleeps of one 100 ms slice each.
    last = stamps[-1]
    assert last["seconds"] * 10**6 + last["microseconds"] >= 300_000
