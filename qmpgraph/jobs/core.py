"""The job core: ``Job`` (QEMU's job.c): statuses, verbs, completion, events.

How a job type plugs in
=======================

Subclass ``Job`` (or ``qmpgraph.jobs.blockjob.BlockJob`` for a block job),
set ``job_type`` (the QAPI JobType: "stream", "commit", "mirror", ...), and
override what QEMU's JobDriver would provide:

* ``async run()``: the job's coroutine.  Return normally on success; raise
  ``JobFailed(errno, message)`` (or ``BlockIOError``) to fail.  It must call
  ``await self.pause_point()`` (or ``sleep_ns``/``yield_``, which include
  one) regularly, check ``self.is_cancelled()`` after each, and call
  ``await self.io_point()`` right before each piece of real data I/O (see
  "Ordering" below).  Progress: ``progress_set_remaining``/``progress_update``.
* ``prepare()`` (may raise ``JobFailed``), ``commit()``, ``abort()``,
  ``clean()``: synchronous finalization steps, called from the QMP side
  (graph changes go through ``daemon.graph_transaction``).
* ``complete()`` for jobs that go ``ready`` (call ``self.transition_to_ready()``
  from ``run``, then ``await self.yield_()`` until completion is asked for);
  ``cancel(force) -> bool`` to turn a soft cancel into a completion (mirror);
  ``on_pause``/``on_resume``/``on_user_resume`` hooks; ``free()`` when the
  job is dismissed (BlockJob drops its nodes there).
* The event hooks ``event_ready``/``event_pending``/``event_completed``/
  ``event_cancelled`` (BlockJob sends the BLOCK_JOB_* events from them).

The command creates the job (``Job.__init__`` registers it in the daemon's
``JobRunner`` and sends ``created``), sets up its graph state, then calls
``job.start()`` (``running``); the runner runs ``run`` as a trio system task
(started at once inside trio, or when the runner first runs otherwise).

Ordering (why ``io_point`` exists)
==================================

In qemu-storage-daemon a job coroutine entered by a command (``job_start``,
a resume, a speed change, a cancel) runs synchronously until it first waits
for real I/O, and a job that ends that way is finalized before the command's
reply.  The monitor reproduces that: after dispatching a command it awaits
``runner.quiesce()`` (every job that is busy runs until it parks, reaches an
``io_point`` or ends), writes the reply, then calls ``runner.after_reply()``
(jobs held at an io point go on; with a virtual clock the runner then runs
every job until all are idle, one step at a time in creation order).

Where QEMU's coroutine yields, measured against qemu-storage-daemon 7.2:

* a request that reaches the disk (file-posix hands it to the thread pool)
  lets the reply go first.  The data path says so itself: ``FileIO`` and
  the qcow2 hook (for clusters the layer holds, and writes) call
  ``qmpgraph.io.hooks.disk_wait``, which is ``io_point`` for a job's own
  task while a reply is pending; metadata QEMU has cached, an lseek for
  block status, null-co and zero clusters do not wait;
* a request that blkdebug fails yields for one main-loop turn first
  (``turn_wait``), and the reply is sent after that turn: the failure's
  events (BLOCK_JOB_ERROR, a stop's ``paused``) come before the reply,
  a second turn waits for it, and a job that ends after a turn is
  finalized after the reply (QEMU's job_exit is a bottom half);
* a job that ends without yielding is finalized before the reply.

(A thread-pool request can finish before the reply in QEMU too, mostly
when it is short: a script that depends on that order is racy against
qsd itself.)  Jobs also call ``io_point`` themselves where the data path
cannot tell: the first allocation lookup of a stream or commit reads L2
tables in QEMU.  A timer (``sleep_ns``, even of 0 ns) always lets the reply
go first.

What does not live here: the runner (``runner``; ``job_runner``, ``find_job``
and ``JobRunner`` are re-exported here), the state tables (``state``), the
clock (``clock``), block-job specifics (``blockjob``), QMP commands
(``qmpgraph.commands.jobs``).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

import trio

from qmpgraph.errors import GenericError
from qmpgraph.io.hooks import JOB_YIELD
from qmpgraph.io.request import BlockIOError
from qmpgraph.jobs.runner import (
    TASK_AT_IO,
    TASK_BUSY,
    TASK_DONE,
    TASK_PARKED,
    JobRunner,
    find_job,
    job_runner,
)
from qmpgraph.jobs.state import COMPLETED, READY, JobStatus, JobVerb, check_verb
from qmpgraph.jobs.state import transition_allowed as _allowed
from qmpgraph.objects import id_wellformed

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon

S = JobStatus


class JobFailed(Exception):
    """Raised by a job's ``run``/``prepare``: the job fails with ``-errno`` and ``message``."""

    def __init__(self, errno_: int, message: str | None = None) -> None:
        super().__init__(message or os.strerror(errno_))
        self.errno = errno_
        self.message = message or os.strerror(errno_)


class _FinishedElsewhere(Exception):
    """A parked job's task wakes after ``Job.finish_now`` ended the job."""


class JobTxn:
    """A group of jobs that finalize together (job_txn); single jobs get their own."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False


class Job:
    """One job (QEMU's Job): status, verbs, progress, finalization and events.

    Rules: ``status`` changes only through ``_transition`` (which asserts the
    transition table and sends JOB_STATUS_CHANGE for named jobs); the QMP
    verbs check ``VERBS`` before touching anything.
    """

    job_type = "undefined"
    is_block_job = False

    def __init__(
        self,
        daemon: Daemon,
        job_id: str | None,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        txn: JobTxn | None = None,
    ) -> None:
        self.daemon = daemon
        self.runner = job_runner(daemon)
        if job_id is not None:
            if not id_wellformed(job_id):
                raise GenericError(f"Invalid job ID '{job_id}'")
            if self.runner.get(job_id) is not None:
                raise GenericError(f"Job ID '{job_id}' already in use")
        self.id = job_id
        self.status = S.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.pause_count = 1
        self.paused = True
        self.busy = False
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.deferred = False
        self.started = False
        self.ret = 0
        self.err: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        self._task_state = TASK_BUSY
        self._enter: trio.Event | None = None
        self._go: trio.Event | None = None
        self._task: trio.lowlevel.Task | None = None
        self._turns = 0  # main-loop turns taken since the pending command entered the job
        self._deadline: int | None = None
        self._sleeps_cut = 0  # sleeps to skip (``cut_next_sleep``)
        self._forced = False  # a drain runs the job through (JobRunner.run_to_park)
        self._transition(S.CREATED)
        self.runner.add(self)
        self.txn = txn if txn is not None else JobTxn()
        self.txn.jobs.insert(0, self)

    # -- what job types override ---------------------------------------------------

    async def run(self) -> None:
        """The job's work (JobDriver.run)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Before commit/abort of the whole txn; raise ``JobFailed`` to fail it."""

    def commit(self) -> None:
        """The job succeeded (all jobs of its txn did)."""

    def abort(self) -> None:
        """The job failed or was cancelled."""

    def clean(self) -> None:
        """After commit or abort, always."""

    def complete(self) -> None:
        """job-complete on a ready job; jobs without it cannot be completed."""
        raise GenericError(f"The active block job '{self.id}' cannot be completed")

    has_complete = False

    def cancel_hook(self, force: bool) -> bool:
        """JobDriver.cancel: may downgrade a cancel; the default forces it."""
        return True

    def on_pause(self) -> None:
        """Called at a pause point before the job pauses."""

    def on_resume(self) -> None:
        """Called at a pause point after the job resumes (or did not pause)."""

    def on_user_resume(self) -> None:
        """Called when the user resumes (or cancels) a user-paused job."""

    def event_ready(self) -> None:
        """The job went ready (BlockJob: BLOCK_JOB_READY)."""

    def event_pending(self) -> None:
        """The job is pending and needs job-finalize (BlockJob: BLOCK_JOB_PENDING)."""

    def event_completed(self) -> None:
        """The job finished, successfully or not (BlockJob: BLOCK_JOB_COMPLETED)."""

    def event_cancelled(self) -> None:
        """The job was cancelled (BlockJob: BLOCK_JOB_CANCELLED)."""

    # -- status --------------------------------------------------------------------

    def _transition(self, new: JobStatus) -> None:
        old = self.status
        assert _allowed(old, new), f"job {self.id}: {old.value} -> {new.value}"
        self.status = new
        if self.id is not None and new is not old:
            self.daemon.emit_event("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def is_cancelled(self) -> bool:
        """job_is_cancelled: cancelled and forced (a soft cancel is a request only)."""
        return self.cancelled and self.force_cancel

    def cancel_requested(self) -> bool:
        """job_cancel_requested: any cancel was asked for."""
        return self.cancelled

    def is_ready(self) -> bool:
        """Ready or standby."""
        return self.status in READY

    def is_completed(self) -> bool:
        """The run is over (waiting and later)."""
        return self.status in COMPLETED

    def transition_to_ready(self) -> None:
        """job_transition_to_ready: called by ``run`` when the job can be completed."""
        self._transition(S.READY)
        self.event_ready()

    # -- progress ------------------------------------------------------------------

    def progress_update(self, done: int) -> None:
        """``done`` more bytes (or units) of work were done."""
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        """``remaining`` units of work are left."""
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        """``delta`` more units of work appeared."""
        self.progress_total += delta

    # -- the job's side: yielding -----------------------------------------------------

    def _should_pause(self) -> bool:
        return self.pause_count > 0

    async def _park(self, deadline: int | None) -> None:
        """job_do_yield: wait until entered (or until ``deadline`` on the clock)."""
        self.busy = False
        self._deadline = deadline
        self._enter = trio.Event()
        self._set_task_state(TASK_PARKED)
        await self.runner.wait_entered(self)
        self._enter = None
        self._deadline = None
        if self.is_completed():
            # finish_now ended the job while it was parked: nothing is left to run.
            raise _FinishedElsewhere
        self.busy = True
        self._set_task_state(TASK_BUSY)

    async def pause_point(self) -> None:
        """job_pause_point: pause here if a pause was requested (and not cancelled)."""
        await trio.lowlevel.checkpoint()
        if not self._should_pause() or self.is_cancelled():
            return
        self.on_pause()
        if self._should_pause() and not self.is_cancelled():
            status = self.status
            self._transition(S.STANDBY if status is S.READY else S.PAUSED)
            self.paused = True
            await self._park(None)
            self.paused = False
            self._transition(status)
        self.on_resume()

    async def yield_(self) -> None:
        """job_yield: wait until entered (e.g. ready, waiting for job-complete)."""
        if self.is_cancelled():
            return
        if not self._should_pause():
            await self._park(None)
        await self.pause_point()

    async def sleep_ns(self, ns: int) -> None:
        """job_sleep_ns: sleep ``ns`` on the daemon's clock, or until entered."""
        if self.is_cancelled():
            return
        if self._sleeps_cut:
            self._sleeps_cut -= 1
        elif not self._should_pause():
            await self._park(self.daemon.clock.now_ns() + ns)
        await self.pause_point()

    async def io_point(self) -> None:
        """Call before real data I/O: lets the command that entered the job reply first."""
        if self.runner.must_hold(self):
            self._go = trio.Event()
            self._set_task_state(TASK_AT_IO)
            await self._go.wait()
            self._go = None
            self._set_task_state(TASK_BUSY)
        else:
            await trio.lowlevel.checkpoint()

    async def _yield_point(self, disk: bool) -> None:
        # A request of this job's own task yields (``qmpgraph.io.hooks``)
        # while a command's reply is pending.  QEMU sends the reply from the
        # monitor's context after the main context's next turn: a first
        # yield for one turn resumes before it, waiting for the disk or a
        # second turn waits for the reply.  Tasks the job starts inherit the
        # hook but are not the job's coroutine: they go on.
        if (
            not self.runner.holding
            or self._forced
            or trio.lowlevel.current_task() is not self._task
        ):
            return
        if disk or self._turns:
            await self.io_point()
        else:
            self._turns += 1
            await trio.lowlevel.checkpoint()

    def _set_task_state(self, state: str) -> None:
        self._task_state = state
        self.runner.changed()

    # -- the QMP side: entering -------------------------------------------------------

    def enter(self, *, only_if_no_timer: bool = False, only_if_timer: bool = False) -> None:
        """job_enter(_cond): wake the job if it is parked (not if busy or finishing)."""
        if not self.started or self.deferred or self._task_state != TASK_PARKED:
            return
        if only_if_no_timer and self._deadline is not None:
            return
        if only_if_timer and self._deadline is None:
            return
        self.busy = True
        self._task_state = TASK_BUSY
        self.runner.kicked.add(self)
        assert self._enter is not None
        self._enter.set()
        self.runner.changed()

    def is_parked(self) -> bool:
        """Whether the job's task waits to be entered (``enter`` would wake it)."""
        return self._task_state == TASK_PARKED

    def cut_next_sleep(self) -> None:
        """The job's next ``sleep_ns`` returns at once (a drain paused the job
        while it was not parked: QEMU's job_sleep_ns does not sleep while a
        pause is pending, and the drain's poll ran the job up to there)."""
        if self.started and not self.deferred:
            self._sleeps_cut += 1

    def start(self) -> None:
        """job_start: the job runs (its task is started by the runner)."""
        assert not self.started and self.paused
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self._transition(S.RUNNING)
        self.runner.kicked.add(self)
        self.runner.spawn(self)

    async def _main(self) -> None:
        """job_co_entry, then job_exit once the run is over."""
        JOB_YIELD.set(self._yield_point)
        self._task = trio.lowlevel.current_task()
        try:
            await self.pause_point()
            await self.run()
        except _FinishedElsewhere:
            self._set_task_state(TASK_DONE)
            return
        except JobFailed as exc:
            self.ret, self.err = -exc.errno, exc.message
        except (BlockIOError, OSError) as exc:
            code = exc.errno or errno.EIO
            self.ret, self.err = -code, os.strerror(code)
        except Exception as exc:  # a job's bug must not stop the daemon
            traceback.print_exception(exc, file=sys.stderr)
            self.ret, self.err = -errno.EIO, os.strerror(errno.EIO)
        if (
            self.runner.holding
            and self._turns
            and not self._forced
            and trio.lowlevel.current_task() is self._task
        ):
            # job_exit is a bottom half of the next turn: after the reply.
            await self.io_point()
        self.deferred = True
        self.busy = False
        if not self.is_completed():  # finish_now may have ended it meanwhile
            self._completed()
        self._set_task_state(TASK_DONE)

    # -- verbs ----------------------------------------------------------------------

    def user_pause(self) -> None:
        """job_user_pause."""
        check_verb(self.id, self.status, JobVerb.PAUSE)
        if self.user_paused:
            raise GenericError("Job is already paused")
        self.user_paused = True
        self.pause()

    def pause(self) -> None:
        """job_pause: one more pause request; a running job is kicked to its pause point."""
        self.pause_count += 1
        if not self.paused:
            self.enter()

    def resume(self) -> None:
        """job_resume: one pause request fewer; the last one wakes the job."""
        assert self.pause_count > 0
        self.pause_count -= 1
        if self.pause_count:
            return
        self.enter(only_if_no_timer=True)

    def user_resume(self) -> None:
        """job_user_resume."""
        if not self.user_paused or self.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        check_verb(self.id, self.status, JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.resume()

    def user_cancel(self, force: bool) -> None:
        """job_user_cancel."""
        check_verb(self.id, self.status, JobVerb.CANCEL)
        self.cancel(force)

    def cancel(self, force: bool) -> None:
        """job_cancel."""
        if self.status is S.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            self._completed()
        elif self.deferred:
            if self.is_cancelled():
                self._txn_abort()
        else:
            self.enter()

    def _cancel_async(self, force: bool) -> None:
        force = self.cancel_hook(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        # A soft cancel of a job that is already done is ignored.
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    def user_complete(self) -> None:
        """job_complete."""
        check_verb(self.id, self.status, JobVerb.COMPLETE)
        if self.cancel_requested() or not self.has_complete:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        self.complete()

    def user_finalize(self) -> None:
        """job_finalize."""
        check_verb(self.id, self.status, JobVerb.FINALIZE)
        self._do_finalize()

    def user_dismiss(self) -> None:
        """job_dismiss."""
        check_verb(self.id, self.status, JobVerb.DISMISS)
        self._do_dismiss()

    # -- completion (job_completed and its txn logic) ----------------------------------

    def _update_rc(self) -> None:
        if not self.ret and self.is_cancelled():
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.err is None:
                self.err = os.strerror(-self.ret)
            self._transition(S.ABORTING)

    def _completed(self) -> None:
        assert not self.is_completed()
        self._update_rc()
        if self.ret:
            self._txn_abort()
        else:
            self._txn_success()

    def _txn_success(self) -> None:
        self._transition(S.WAITING)
        if any(not j.is_completed() for j in self.txn.jobs):
            return
        for j in list(self.txn.jobs):
            j._transition(S.PENDING)
            if not j.auto_finalize:
                j.event_pending()
        if all(j.auto_finalize for j in self.txn.jobs):
            self._do_finalize()

    def _txn_abort(self) -> None:
        txn = self.txn
        if txn.aborting:
            return
        txn.aborting = True
        for other in txn.jobs:
            if other is not self:
                other._cancel_async(True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.is_completed():
                other.finish_now()
            other._finalize_single()

    def finish_now(self) -> None:
        """job_finish_sync of a cancelled job, done at once: a job parked at
        its pause point leaves it first (``running``, or ``ready`` from
        standby), then it ends as cancelled (``aborting``).  Its task, if it
        is parked, ends quietly when next entered."""
        if self.paused and not self._should_pause():
            if self.status is S.PAUSED:
                self._transition(S.RUNNING)
            elif self.status is S.STANDBY:
                self._transition(S.READY)
            self.paused = False
        self.deferred = True
        self._update_rc()

    def _do_finalize(self) -> None:
        failed: Job | None = None
        for j in list(self.txn.jobs):
            if j.ret == 0:
                try:
                    j.prepare()
                except JobFailed as exc:
                    j.ret, j.err = -exc.errno, exc.message
                j._update_rc()
            if j.ret:
                failed = j
                break
        if failed is not None:
            failed._txn_abort()
        else:
            for j in list(self.txn.jobs):
                j._finalize_single()

    def _finalize_single(self) -> None:
        assert self.is_completed()
        self._update_rc()
        if not self.ret:
            self.commit()
        else:
            self.abort()
        self.clean()
        if self.started:
            if self.is_cancelled():
                self.event_cancelled()
            else:
                self.event_completed()
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)
        self._transition(S.CONCLUDED)
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        self.busy = False
        self.paused = False
        self.deferred = True
        if self in self.txn.jobs:
            self.txn.jobs.remove(self)
        self._transition(S.NULL)
        self.runner.remove(self)
        self.free()

    def free(self) -> None:
        """The job is gone (job_unref's free): release what it still holds."""

    def early_fail(self) -> None:
        """job_early_fail: a job that failed before it started just goes away."""
        assert self.status is S.CREATED
        self._do_dismiss()

    # -- queries --------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """This job's JobInfo (query-jobs)."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.err is not None:
            info["error"] = self.err
        return info


__all__ = ["Job", "JobFailed", "JobRunner", "JobTxn", "find_job", "job_runner"]
