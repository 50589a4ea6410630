"""A job whose nodes move to another AioContext: paused before the reply,
resumed after it (what qsd 7.2 shows in most runs: the resume is scheduled
in the job's new context, and races the reply there)."""

from __future__ import annotations

from typing import Any

import trio
from jobkit import JobClient


def _status_changes(transcript: list[dict[str, Any]]) -> list[str]:
    out = []
    for msg in transcript:
        if msg.get("event") == "JOB_STATUS_CHANGE":
            out.append(msg["data"]["status"])
        elif "return" in msg or "error" in msg:
            out.append("reply")
    return out


async def test_moving_a_ready_mirror_resumes_it_after_the_reply() -> None:
    c = JobClient()
    c.ok("object-add", {"qom-type": "iothread", "id": "io0"})
    for name in ("src", "dst"):
        c.ok("blockdev-add", {"driver": "null-co", "node-name": name, "size": 1 << 20})
    with trio.fail_after(10):
        await c.aok(
            "blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst", "sync": "full"}
        )
        await c.wait_status("j", "ready")
        c.transcript.clear()
        args = {"node-name": "src", "iothread": "io0", "force": True}
        await c.aok("x-blockdev-set-iothread", args)
        # Moving it again to where it is already drains nothing.
        await c.aok("x-blockdev-set-iothread", args)
    assert _status_changes(c.transcript) == ["standby", "reply", "ready", "reply"]
    assert c.ok("query-jobs")[0]["status"] == "ready"
    await c.aok("job-cancel", {"id": "j"})
