"""``JobRunner``: a daemon's jobs and the trio tasks that run them.

Each started job runs ``Job._main`` as a trio system task.  The runner
decides when a job's task may go on, so that the order of replies and job
events is QEMU's (see ``qmpgraph.jobs.core``, "Ordering"):

* ``quiesce`` (before a reply): the jobs the command entered run until they
  park, reach an ``io_point`` or end; meanwhile ``holding`` keeps any job
  that reaches an io point (or whose timer fires) waiting, and the data
  path's yield points (``Job._yield_point``) count main-loop turns from
  this command on;
* drains a command cannot replay synchronously: a drain that finds a job
  entered earlier in the same command (by an earlier drain's end) would in
  QEMU poll until that job reaches its next pause point, its I/O done.
  ``defer`` queues such a drain, and every event the command sends after
  it, into a script that ``quiesce`` plays once the entered jobs ran:
  the drain's async part runs the job on to its next park (``run_to_park``,
  its I/O not held), then the queued events follow in order;
* ``after_reply``: what a command left for after its reply runs first
  (``call_after_reply``: jobs resuming in another context), then held
  jobs go on; with a virtual clock, ``settle`` then
  runs every job until none can go on without a command, one step at a
  time in creation order, moving the clock straight to the earliest timer
  when all wait for one.

What does not live here: the job itself (``core``), the clock (``clock``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon
    from qmpgraph.jobs.core import Job

# Where a job's task is, as the runner sees it.
TASK_BUSY = "busy"  # running Python code (or not started yet)
TASK_PARKED = "parked"  # waiting to be entered (or for its timer)
TASK_AT_IO = "at_io"  # held before real I/O until the command's reply is out
TASK_DONE = "done"  # run() returned and the job was handed to completion


class JobRunner:
    """A daemon's jobs and the trio tasks that run them (see the module docstring)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.jobs: list[Job] = []  # newest first, as QEMU's job list
        self.holding = False
        self.kicked: set[Job] = set()
        self._unspawned: list[Job] = []
        self._changed = trio.Event()
        self._last: Job | None = None
        self._post_reply: list[Callable[[], None]] = []
        # Steps queued since a drain had to wait for a job: an async drain
        # step, or an event (name, data) the command sent after it.
        self._script: list[Callable[[], Awaitable[None]] | tuple[str, Any]] | None = None

    # -- the table ------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Register a new job (``Job.__init__`` does it)."""
        self.jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        """Forget a dismissed job."""
        if job in self.jobs:
            self.jobs.remove(job)
        if job in self._unspawned:
            self._unspawned.remove(job)

    def get(self, job_id: str) -> Job | None:
        """job_get: the job called ``job_id``."""
        for job in self.jobs:
            if job.id == job_id:
                return job
        return None

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self.jobs))

    # -- tasks ----------------------------------------------------------------------

    def spawn(self, job: Job) -> None:
        """Run ``job._main`` as a trio system task (later, if not inside trio)."""
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._unspawned.append(job)
            return
        trio.lowlevel.spawn_system_task(job._main, name=f"job {job.id}")

    def _spawn_pending(self) -> None:
        pending, self._unspawned = self._unspawned, []
        for job in pending:
            trio.lowlevel.spawn_system_task(job._main, name=f"job {job.id}")

    def changed(self) -> None:
        """A job's task changed state: wake whoever waits on the runner."""
        self._changed.set()
        self._changed = trio.Event()

    def must_hold(self, job: Job) -> bool:
        """Whether ``job`` stops at an io point (a reply is pending, or the clock is
        virtual), unless a drain runs it through (``run_to_park``)."""
        return (self.holding or self.daemon.clock.virtual) and not job._forced

    async def wait_entered(self, job: Job) -> None:
        """Park ``job`` until entered, or until its deadline passes."""
        assert job._enter is not None
        deadline = job._deadline
        if deadline is None or self.daemon.clock.virtual:
            # Virtual timers are fired by ``settle`` (it enters the job).
            await job._enter.wait()
            return
        seconds = max(0, deadline - self.daemon.clock.now_ns()) / 1e9
        with trio.move_on_after(seconds):
            await job._enter.wait()
        if not job._enter.is_set():
            # The timer fired.  A timer is a main-loop turn of its own in
            # QEMU: it never runs ahead of a reply already on its way.
            while self.holding and not job._enter.is_set():
                await self._changed.wait()  # after_reply and enter() signal it
            if not job._enter.is_set():
                job._task_state = TASK_BUSY

    def _busy(self, jobs: Iterable[Job]) -> bool:
        return any(j.started and j._task_state == TASK_BUSY for j in jobs)

    async def _until_idle(self, jobs: Iterable[Job] | None = None) -> None:
        while self._busy(self.jobs if jobs is None else list(jobs)):
            await self._changed.wait()

    async def wait_idle(self) -> None:
        """Wait until no job's task is busy (every job parked, held or done)."""
        self._spawn_pending()
        await self._until_idle()

    async def quiesce(self) -> None:
        """Before a reply: jobs the command entered run until they park, reach I/O or end;
        then the deferred script plays (see the module docstring)."""
        if not self.kicked and not self._unspawned and self._script is None:
            return
        for job in self.jobs:
            job._turns = 0  # QEMU's main loop turns count from this command on
        self.holding = True
        self._spawn_pending()
        await self._until_idle(self.kicked)
        self.kicked.clear()
        await self._play()

    async def _play(self) -> None:
        while self._script is not None:
            script, self._script = self._script, None
            for i, step in enumerate(script):
                if self._script is not None:
                    # A step deferred again: what is left follows it.
                    self._script.extend(script[i:])
                    break
                if isinstance(step, tuple):
                    self.daemon.emit_event(*step)
                else:
                    await step()
                    await self._until_idle(self.kicked)
                    self.kicked.clear()

    def deferring(self) -> bool:
        """Whether the pending command's drains and events are being queued."""
        return self._script is not None

    def defer(self, step: Callable[[], Awaitable[None]]) -> bool:
        """Queue an async drain step; later events queue behind it.  False
        (nothing queued) outside trio: the caller drains synchronously."""
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return False
        if self._script is None:
            self._script = []
            if not self.holding:
                trio.lowlevel.spawn_system_task(self._play_soon, name="deferred drains")
        self._script.append(step)
        return True

    async def _play_soon(self) -> None:
        # Deferred outside a command's quiesce: a command being dispatched
        # has its quiesce play the script (it holds the jobs by then);
        # otherwise (an NBD client's or a job's task) it plays now.
        await trio.lowlevel.checkpoint()
        if not self.holding:
            await self._play()

    def defer_event(self, name: str, data: dict[str, Any] | None) -> bool:
        """Queue an event behind a deferred drain (True), or let it go now (False)."""
        if self._script is None:
            return False
        self._script.append((name, data))
        return True

    async def run_to_park(self, job: Job) -> None:
        """A drain's poll: ``job`` runs, its I/O not held, until it parks or ends."""
        if job._task_state not in (TASK_BUSY, TASK_AT_IO) or not job.started:
            return
        job._forced = True
        try:
            while job._task_state in (TASK_BUSY, TASK_AT_IO):
                if job._task_state == TASK_AT_IO and job._go is not None:
                    job._task_state = TASK_BUSY
                    job._go.set()
                await self._changed.wait()
        finally:
            job._forced = False

    def call_after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` right after the pending command's reply (its events follow it)."""
        self._post_reply.append(fn)

    async def after_reply(self) -> None:
        """After a reply: held jobs go on; with a virtual clock, run everything to idle."""
        calls, self._post_reply = self._post_reply, []
        for fn in calls:
            fn()
        if not self.holding and not self.daemon.clock.virtual:
            return
        self.holding = False
        self.changed()
        if self.daemon.clock.virtual:
            await self.settle()
            return
        for job in self.jobs:
            if job._task_state == TASK_AT_IO and job._go is not None:
                job._task_state = TASK_BUSY
                job._go.set()

    def _runnable(self, job: Job, now: int) -> bool:
        state = job._task_state
        if state == TASK_AT_IO:
            return True
        return state == TASK_PARKED and job._deadline is not None and job._deadline <= now

    async def settle(self) -> None:
        """Run every job until none can go on without a command (virtual clock).

        One job at a time, in creation order, round robin; when all wait and
        some wait for a timer, the clock jumps to the earliest timer.
        """
        self._spawn_pending()
        await self._until_idle()
        clock = self.daemon.clock
        while True:
            order = list(reversed(self.jobs))  # oldest first
            if self._last in order:
                i = order.index(self._last) + 1
                order = order[i:] + order[:i]
            now = clock.now_ns()
            job = next((j for j in order if self._runnable(j, now)), None)
            if job is None:
                timers = [
                    j._deadline
                    for j in self.jobs
                    if j._task_state == TASK_PARKED and j._deadline is not None
                ]
                if not timers:
                    return
                advance = getattr(clock, "advance_to", None)
                assert advance is not None
                advance(min(timers))
                continue
            self._last = job
            job._task_state = TASK_BUSY
            if job._go is not None and not job._go.is_set():
                job._go.set()
            else:
                job.busy = True
                assert job._enter is not None
                job._enter.set()
            await self._until_idle()


def job_runner(daemon: Daemon) -> JobRunner:
    """The daemon's job runner (created on first use; the daemon's monitor calls it)."""
    runner = daemon.job_runner
    if runner is None:
        runner = daemon.job_runner = JobRunner(daemon)
    assert isinstance(runner, JobRunner)
    return runner


def find_job(daemon: Daemon, job_id: str) -> Job | None:
    """The job called ``job_id``, if any."""
    runner = daemon.job_runner
    return runner.get(job_id) if isinstance(runner, JobRunner) else None
