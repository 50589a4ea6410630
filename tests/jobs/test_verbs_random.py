"""Random verb sequences on a job: the state machine's rules always hold.

Whatever verbs arrive in whatever order, every status change is an edge of
QEMU's transition table, every refusal is one of QEMU's messages, the
transcript is reproducible under the virtual clock, and once the job is gone
it holds nothing in the graph.
"""

from __future__ import annotations

import re
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from jobkit import JobClient
from test_core import make_client, start_job

from qmpgraph.jobs.state import TRANSITIONS, JobStatus

VERBS: list[tuple[str, dict[str, Any] | None]] = [
    ("job-pause", {"id": "j"}),
    ("job-resume", {"id": "j"}),
    ("job-cancel", {"id": "j"}),
    ("block-job-cancel", {"device": "j"}),
    ("job-complete", {"id": "j"}),
    ("job-finalize", {"id": "j"}),
    ("job-dismiss", {"id": "j"}),
    ("block-job-set-speed", {"device": "j", "speed": 0}),
    ("block-job-set-speed", {"device": "j", "speed": 1}),
    ("query-jobs", None),
]

ERRORS = re.compile(
    r"Job 'j' in state '[a-z]+' cannot accept command verb '[a-z-]+'"
    r"|Job not found|Block job 'j' not found|Job is already paused"
    r"|Can't resume a job that was not paused"
    r"|The block job for device 'j' is currently paused"
    r"|The active block job 'j' cannot be completed"
)


async def run_sequence(
    steps: list[int], manual: tuple[bool, bool], virtual: bool
) -> list[dict[str, Any]]:
    """Run the verbs; the transcript (without timestamps on the wall clock)."""
    c: JobClient = make_client(virtual=virtual)
    # On the wall clock the job stays running (1 byte/s) until a verb moves it;
    # on the virtual clock it runs to its end after each reply.
    speed = 65536 * 2 if virtual else 1
    start_job(c, speed=speed, auto_finalize=not manual[0], auto_dismiss=not manual[1])
    await c.aok("query-jobs")
    for i in steps:
        name, args = VERBS[i]
        reply = await c.arun(name, args)
        if "error" in reply:
            assert ERRORS.fullmatch(reply["error"]["desc"]), reply
    # Clean up whatever state the job is in; then nothing may be left.
    await c.arun("job-cancel", {"id": "j"})
    await c.idle()  # on the wall clock a busy job sees the cancel a moment later
    await c.arun("job-dismiss", {"id": "j"})
    assert await c.aok("query-jobs") == []
    node = c.daemon.graph.lookup("n")
    assert node is not None and not node.op_blockers
    assert not c.daemon.graph.jobs
    status = JobStatus.UNDEFINED
    for msg in c.transcript:
        if msg.get("event") == "JOB_STATUS_CHANGE":
            new = JobStatus(msg["data"]["status"])
            assert new in TRANSITIONS[status], (status, new)
            status = new
    assert status is JobStatus.NULL
    if not virtual:
        for msg in c.transcript:
            msg.pop("timestamp", None)
    return c.transcript


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, len(VERBS) - 1), max_size=12),
    st.tuples(st.booleans(), st.booleans()),
    st.booleans(),
)
def test_random_verbs_follow_the_tables(
    steps: list[int], manual: tuple[bool, bool], virtual: bool
) -> None:
    async def both() -> None:
        with trio.fail_after(20):
            first = await run_sequence(steps, manual, virtual)
            second = await run_sequence(steps, manual, virtual)
        assert first == second

    trio.run(both)
