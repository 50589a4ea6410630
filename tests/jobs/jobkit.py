"""Helpers for job tests: a cmdkit ``Client`` driven inside trio as the monitor does.

``JobClient.run`` dispatches one command, then lets the jobs it entered run
(``Daemon.before_reply``), records the reply, then ``after_reply`` (with a
virtual clock every job runs until idle).  ``transcript`` is every event and
reply in the order a QMP client would have received them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))
from cmdkit import Client, plain  # tests/commands helper, put on sys.path above

from qmpgraph.jobs.clock import VirtualClock


class JobClient(Client):
    """A library-level client whose commands run the daemon's jobs as the monitor does."""

    def __init__(self, *, virtual: bool = False, seed: int = 1) -> None:
        super().__init__(seed=seed)
        if virtual:
            self.daemon.clock = VirtualClock()
        self.transcript: list[dict[str, Any]] = []
        self.daemon.subscribe(lambda ev: self.transcript.append(plain(ev)))

    async def arun(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Dispatch ``command`` inside trio; the reply (also appended to ``transcript``)."""
        reply = self.run(command, arguments)
        await self.daemon.before_reply()
        self.transcript.append(plain(reply))
        await self.daemon.after_reply()
        return reply

    async def aok(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """``arun`` for a command that must succeed; its return value."""
        reply = await self.arun(command, arguments)
        assert "return" in reply, reply
        return plain(reply["return"])

    async def idle(self) -> None:
        """Wait (bounded) until every job is parked or done."""
        runner = self.daemon.job_runner
        if runner is not None:
            with trio.fail_after(10):
                await runner.wait_idle()

    async def wait_status(self, job_id: str, status: str | None) -> None:
        """Wait (bounded) until query-jobs shows ``job_id`` in ``status`` (None: gone)."""
        with trio.fail_after(10):
            while True:
                jobs = {j["id"]: j["status"] for j in self.ok("query-jobs")}
                if jobs.get(job_id) == status:
                    return
                await trio.sleep(0.001)

    def events(self, *names: str) -> list[tuple[str, Any]]:
        """(event, data) of the transcript's events, only ``names`` if given."""
        return [
            (m["event"], m.get("data"))
            for m in self.transcript
            if "event" in m and (not names or m["event"] in names)
        ]

    def clear(self) -> None:
        """Forget the transcript so far."""
        self.transcript.clear()
