"""``blockdev-backup`` and ``drive-backup``: the QMP commands and the
transaction actions (QEMU 7.2's blockdev.c).

Both commands are one-action transactions (blockdev_do_action), as in QEMU.
An action's prepare looks up the source and the target, drains the source
(below), runs do_backup_common's checks in QEMU's order and creates the job
(``qmpgraph.jobs.backup``); commit starts it; abort cancels it; with
``completion-mode=grouped`` the backup jobs of one transaction share a job
transaction (one failing cancels the others).

Drains are visible in QEMU only through JOB_STATUS_CHANGE: a job holding a
drained node pauses (a ready one goes to standby) and resumes when the drain
ends.  ``Drain`` replays that: the command's bdrv_drain_all, then each
action's drained source from prepare to the last clean (a new job pauses
right after it starts, since its nodes are drained).  The ``transaction``
command's own drain of everything is not replayed.

What does not live here: the job (``qmpgraph.jobs.backup``), the
transaction machinery (``qmpgraph.commands.transaction``).
"""

from __future__ import annotations

import weakref
from typing import Any

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.transaction import BlkAction, action, lookup_bs, run_actions
from qmpgraph.daemon import Daemon
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Job as JobParent
from qmpgraph.graph.model import Node
from qmpgraph.jobs.backup import BackupJob, BackupParams, start_backup
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import Job, JobTxn, job_runner
from qmpgraph.jobs.state import JobStatus
from qmpgraph.transactions.engine import Transaction

S = JobStatus


# -- drains --------------------------------------------------------------------------


def _ancestors(node: Node) -> set[int]:
    """``node`` and every node above it (what bdrv_drained_begin quiesces)."""
    seen = {node.id}
    todo = [node]
    while todo:
        cur = todo.pop()
        for edge in cur.parents:
            parent = edge.parent
            if isinstance(parent, Node) and parent.id not in seen:
                seen.add(parent.id)
                todo.append(parent)
    return seen


def _holds(job: Job, nodes: set[int] | None) -> bool:
    if not isinstance(job, BlockJob):
        return nodes is None
    if nodes is None:
        return True
    parent: JobParent = job.parent
    return any(e.child is not None and e.child.id in nodes for e in parent.edges)


def _pause_event(job: Job) -> bool:
    """A drained job reaches its pause point: paused (standby when ready)."""
    if not job.started or job.is_completed() or job.pause_count:
        return False
    if job.status is S.RUNNING:
        job._transition(S.PAUSED)
        return True
    if job.status is S.READY:
        job._transition(S.STANDBY)
        return True
    return False


def _resume_event(job: Job) -> None:
    if job.status is S.PAUSED:
        job._transition(S.RUNNING)
    elif job.status is S.STANDBY:
        job._transition(S.READY)


def drain_all_bounce(daemon: Daemon) -> None:
    """bdrv_drain_all: every job holding a node pauses, then resumes."""
    jobs = [j for j in reversed(list(job_runner(daemon))) if _holds(j, None)]
    paused = [j for j in jobs if _pause_event(j)]
    for job in paused:
        _resume_event(job)


class Drain:
    """The drained sources of one QMP transaction's backup actions."""

    def __init__(self) -> None:
        self.open = 0
        self.paused: list[Job] = []
        self.txn: JobTxn | None = None

    def begin(self, daemon: Daemon, node: Node) -> None:
        """bdrv_drained_begin(node): the jobs holding it or a node above pause."""
        self.open += 1
        nodes = _ancestors(node)
        for job in reversed(list(job_runner(daemon))):
            if job not in self.paused and _holds(job, nodes) and _pause_event(job):
                self.paused.append(job)

    def started(self, job: Job) -> None:
        """A job started while its nodes are drained: it pauses at once."""
        if _pause_event(job):
            self.paused.append(job)

    def end(self) -> None:
        """One action is done with its drain; the last one resumes every job."""
        self.open -= 1
        if self.open:
            return
        for job in reversed(self.paused):
            _resume_event(job)
        self.paused.clear()


_DRAINS: weakref.WeakKeyDictionary[Transaction, Drain] = weakref.WeakKeyDictionary()


def _drain_of(tran: Transaction) -> Drain:
    drain = _DRAINS.get(tran)
    if drain is None:
        drain = _DRAINS[tran] = Drain()
    return drain


# -- do_backup_common ------------------------------------------------------------------


def backup_params(data: dict[str, Any], source: Node) -> BackupParams:
    """do_backup_common's checks, in QEMU's order, and the job's parameters."""
    sync = str(data["sync"])
    perf = data.get("x-perf") or {}
    params = BackupParams(
        sync=sync,
        speed=int(data.get("speed", 0)),
        compress=bool(data.get("compress", False)),
        filter_node_name=data.get("filter-node-name"),
        max_workers=int(perf.get("max-workers", 64)),
        max_chunk=int(perf.get("max-chunk", 0)),
        on_source_error=str(data.get("on-source-error", "report")),
        on_target_error=str(data.get("on-target-error", "report")),
        auto_finalize=bool(data.get("auto-finalize", True)),
        auto_dismiss=bool(data.get("auto-dismiss", True)),
    )
    name = data.get("bitmap")
    mode = data.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and name is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        mode = "on-success"
        sync = params.sync = "bitmap"
    if name is not None:
        bitmap = bitmap_registry.find(source, str(name))
        if bitmap is None:
            raise GenericError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        _check_allow_ro(bitmap)
        if sync == "none":
            raise GenericError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(
                f"Bitmap sync mode '{mode}' has no meaningful effect when combined "
                f"with sync mode '{sync}'"
            )
        params.bitmap = bitmap
        params.bitmap_mode = str(mode)
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return params


def _check_allow_ro(bitmap: Any) -> None:
    """bdrv_dirty_bitmap_check(BDRV_BITMAP_ALLOW_RO): busy or inconsistent fail."""
    name = bitmap.name
    if bitmap.busy:
        raise GenericError(f"Bitmap '{name}' is currently in use by another operation")
    if bitmap.inconsistent:
        raise GenericError(
            f"Bitmap '{name}' is inconsistent and cannot be used\n"
            "Try block-dirty-bitmap-remove to delete this bitmap from disk"
        )


# -- the transaction actions -------------------------------------------------------------


class BackupAction(BlkAction):
    """blockdev-backup (and the base of drive-backup) as a transaction action."""

    grouped_ok = True
    job: BackupJob | None = None
    drained = False

    def lookup(self, tran: Transaction) -> tuple[Node, Node]:
        """The source and the target nodes."""
        del tran
        device = str(self.data["device"])
        source = lookup_bs(self.graph, device, device)
        name = str(self.data["target"])
        target = lookup_bs(self.graph, name, name)
        return source, target

    def prepare(self, tran: Transaction) -> None:
        """blockdev_backup_prepare: look up, drain the source, create the job."""
        source, target = self.lookup(tran)
        drain = _drain_of(tran)
        drain.begin(self.daemon, source)
        self.drained = True
        txn: JobTxn | None = None
        if self.mode == "grouped":
            if drain.txn is None:
                drain.txn = JobTxn()
            txn = drain.txn
        params = backup_params(self.data, source)
        self.job = start_backup(
            self.daemon,
            tran,
            self.data.get("job-id"),
            source=source,
            target=target,
            params=params,
            txn=txn,
        )

    def commit(self, tran: Transaction) -> None:
        """Start the job (it pauses at once: its nodes are drained)."""
        job = self.job
        assert job is not None

        def created() -> None:
            job.creating = False

        tran.on_commit(created)
        job.start()
        _drain_of(tran).started(job)

    def abort(self, tran: Transaction) -> None:
        """Cancel a job that was created (job_cancel_sync), then end the drain."""
        if self.job is not None:
            self.job.cancel(True)
        self._end_drain(tran)

    def clean(self, tran: Transaction) -> None:
        """End the drain of the source."""
        self._end_drain(tran)

    def _end_drain(self, tran: Transaction) -> None:
        if self.drained:
            self.drained = False
            _drain_of(tran).end()


action("blockdev-backup")(BackupAction)


@command("blockdev-backup")
def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Start a backup job from ``device`` to the existing node ``target``."""
    daemon = ctx.daemon
    with daemon.graph_transaction("blockdev-backup", args) as tran:
        drain_all_bounce(daemon)
        run_actions(daemon, tran, [{"type": "blockdev-backup", "data": args}])
