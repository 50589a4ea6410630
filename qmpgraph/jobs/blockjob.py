"""``BlockJob``: a job that works on block nodes (QEMU's blockjob.c).

A block job holds its main node and every other node it works on through
role-0 job edges (``add_node``; the main node's edge with the permissions
the job type asks for, as QEMU 7.2's block_job_create), each of which blocks
all operations on that node with "block device is in use by block job:
<type>".  Job types that move data make their own BlockBackends.  These
graph changes are made inside the creating command's transaction; they are
dropped when the job goes away (its own transaction then).

Also here: the speed limit (QEMU's RateLimit with 100 ms slices), the
BLOCK_JOB_* events, on-error policy and ``query-block-jobs``' BlockJobInfo.

What does not live here: the job core (``core``), job types (commands).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.errors import GenericError
from qmpgraph.graph.attach import OP_TYPES
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.model import Job as JobParent
from qmpgraph.jobs import policy
from qmpgraph.jobs.core import Job, JobTxn
from qmpgraph.jobs.state import JobVerb, check_verb
from qmpgraph.transactions.actions import add_root_parent, remove_root_parent
from qmpgraph.transactions.composite import detach_child, root_attach
from qmpgraph.transactions.engine import Action, Transaction

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon

SLICE_NS = 100_000_000
"""BLOCK_JOB_SLICE_TIME: the rate limit's accounting slice."""


class RateLimit:
    """QEMU's RateLimit: a quota per slice; going over it delays the next request."""

    def __init__(self) -> None:
        self.quota = 0
        self.slice_ns = SLICE_NS
        self.start = 0
        self.end = 0
        self.dispatched = 0

    def set_speed(self, speed: int) -> None:
        """``speed`` bytes per second; 0 means unlimited."""
        self.quota = 0 if speed == 0 else max(int(speed * self.slice_ns / 1_000_000_000), 1)

    def delay(self, now: int, n: int) -> int:
        """Account ``n`` bytes sent at ``now``; the ns to wait before the next request."""
        if not self.quota:
            return 0
        if self.end < now:
            self.start, self.end, self.dispatched = now, now + self.slice_ns, 0
        self.dispatched += n
        if self.dispatched < self.quota:
            return 0
        self.end = self.start + int(self.dispatched / self.quota * self.slice_ns)
        return self.end - now


@dataclass(frozen=True, slots=True)
class _BlockersUndo(Action):
    """Undo of ``_block_all``/``_unblock``: put the reason lists back as they were."""

    name = "job-blockers"
    node: Node
    saved: dict[str, list[str]]

    def abort(self) -> None:
        self.node.op_blockers.clear()
        self.node.op_blockers.update(self.saved)


def _block_all(tran: Transaction, node: Node, reason: str) -> None:
    """bdrv_op_block_all: ``reason`` heads every operation's blocker list."""
    tran.add(_BlockersUndo(node, {k: list(v) for k, v in node.op_blockers.items()}))
    for op in OP_TYPES:
        node.op_blockers.setdefault(op, []).insert(0, reason)


def _unblock(tran: Transaction, node: Node, reason: str, ops: tuple[str, ...]) -> None:
    """bdrv_op_unblock(_all): remove ``reason`` (by identity) from ``ops``' lists."""
    tran.add(_BlockersUndo(node, {k: list(v) for k, v in node.op_blockers.items()}))
    for op in ops:
        reasons = node.op_blockers.get(op)
        if reasons is None:
            continue
        kept = [r for r in reasons if r is not reason]
        if kept:
            node.op_blockers[op] = kept
        else:
            del node.op_blockers[op]


class BlockJob(Job):
    """A block job: the nodes it holds, speed, BLOCK_JOB_* events.

    ``__init__`` runs block_job_create's steps inside ``tran`` (the creating
    command's transaction): the job itself (ID checks, ``created``), the
    "main node" job edge on ``node`` with ``perm``/``shared``, then the speed
    (a conflict or a negative speed fails the job early: ``null``).
    """

    is_block_job = True

    def __init__(
        self,
        daemon: Daemon,
        job_id: str | None,
        tran: Transaction,
        node: Node,
        *,
        perm: int,
        shared: int,
        speed: int = 0,
        on_error: str = "report",
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        txn: JobTxn | None = None,
    ) -> None:
        graph = daemon.graph
        self._freed = False
        super().__init__(
            daemon, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, txn=txn
        )
        self.parent = JobParent(self.job_type, job_id or "")
        add_root_parent(tran, graph, self.parent)
        self.blocker = f"block device is in use by block job: {self.job_type}"
        self.node_edges: list[Edge] = []
        self.speed = 0
        self.limit = RateLimit()
        self.on_error = on_error
        self.iostatus = "ok"
        try:
            self.add_node(tran, "main node", node, perm, shared)
        except GenericError:
            self.early_fail()
            raise
        # The main node may still be moved to another iothread.
        _unblock(tran, node, self.blocker, ("dataplane",))
        if speed < 0:
            self.early_fail()
            raise GenericError("Parameter 'speed' expects a non-negative value")
        self._apply_speed(speed)

    # -- nodes ----------------------------------------------------------------------

    def add_node(self, tran: Transaction, name: str, node: Node, perm: int, shared: int) -> Edge:
        """block_job_add_bdrv: hold ``node`` through a job edge and block its operations."""
        edge = root_attach(
            tran, self.daemon.graph, self.parent, node, name, role=0, perm=perm, shared=shared
        )
        self.node_edges.append(edge)
        _block_all(tran, node, self.blocker)
        return edge

    def remove_all_nodes(self, tran: Transaction) -> None:
        """block_job_remove_all_bdrv: drop the job edges (and their blockers)."""
        graph = self.daemon.graph
        while self.node_edges:
            edge = self.node_edges.pop()
            if edge.child is not None:
                _unblock(tran, edge.child, self.blocker, OP_TYPES)
            detach_child(tran, graph, edge)

    def early_fail(self) -> None:
        """job_early_fail inside the creating command: its transaction undoes the graph side."""
        self._freed = True
        super().early_fail()

    def free(self) -> None:
        """block_job_free: the job edges and the BlockBackend go away."""
        if self._freed:
            return
        self._freed = True
        with self.daemon.graph_transaction("job-free", {"id": self.id}) as tran:
            self.remove_all_nodes(tran)
            graph = self.daemon.graph
            if self.parent in graph.jobs:
                remove_root_parent(tran, graph, self.parent)

    # -- speed ----------------------------------------------------------------------

    def _apply_speed(self, speed: int) -> None:
        self.speed = speed
        self.limit.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        """block_job_set_speed: change the limit; a faster job is kicked out of its sleep."""
        check_verb(self.id, self.status, JobVerb.SET_SPEED)
        if speed < 0:
            raise GenericError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self._apply_speed(speed)
        if speed and speed <= old:
            return
        self.enter(only_if_timer=True)

    def ratelimit_delay(self, n: int) -> int:
        """block_job_ratelimit_get_delay: account ``n`` bytes; ns to sleep next."""
        return self.limit.delay(self.daemon.clock.now_ns(), n)

    # -- errors ---------------------------------------------------------------------

    def error_action(self, is_read: bool, error: int) -> str:
        """block_job_error_action with the job's one ``on-error`` policy.

        Returns "ignore", "report" or "stop" (on "stop" the job is paused as
        a user pause); the rules live in ``policy.error_action``, which
        mirror and backup call with the policy of the failed direction.
        """
        return policy.error_action(self, self.on_error, is_read, error)

    def on_user_resume(self) -> None:
        """block_job_user_resume: a resumed job's I/O status is fine again."""
        self.iostatus = "ok"

    # -- events ---------------------------------------------------------------------

    def _progress_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    def event_ready(self) -> None:
        """BLOCK_JOB_READY."""
        if self.id is not None:
            self.daemon.emit_event("BLOCK_JOB_READY", self._progress_data())

    def event_pending(self) -> None:
        """BLOCK_JOB_PENDING."""
        if self.id is not None:
            self.daemon.emit_event("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def event_completed(self) -> None:
        """BLOCK_JOB_COMPLETED (with the error message when the job failed)."""
        if self.id is not None:
            data = self._progress_data()
            if self.ret < 0 and self.err is not None:
                data["error"] = self.err
            self.daemon.emit_event("BLOCK_JOB_COMPLETED", data)

    def event_cancelled(self) -> None:
        """BLOCK_JOB_CANCELLED."""
        if self.id is not None:
            self.daemon.emit_event("BLOCK_JOB_CANCELLED", self._progress_data())

    # -- query ----------------------------------------------------------------------

    def query_block(self) -> dict[str, Any]:
        """This job's BlockJobInfo (query-block-jobs)."""
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.is_ready(),
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.err is not None:
            info["error"] = self.err
        return info
