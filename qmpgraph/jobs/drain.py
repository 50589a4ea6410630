"""Drains as QEMU's jobs see them: JOB_STATUS_CHANGE pairs (QEMU 7.2).

A drained node pauses every job holding it or a node above it: the job
wakes from its sleep, reaches its pause point (``paused``, or ``standby``
when ready) and, when the drain ends, goes on (``running``/``ready``) and
runs its loop again.  qmpgraph changes the graph synchronously, so only the
visible part is replayed: the two events, then a wake-up.

* ``drain_all_bounce``: bdrv_drain_all at the start of every QMP
  ``transaction`` (and of the commands that are one-action transactions):
  nodes in creation order, so a job pauses at the first node it holds and
  goes on at the last;
* ``drain_node_bounce``: drained sections of one node (and what is above
  it), as deleting an export (twice) or attaching an existing node as a
  new child (twice) makes them;
* ``drain_nodes_bounce``: one drained section over a set of nodes (an
  AioContext change), the resume coming after the reply;
* ``DrainsOnAbort``: an undo record draining a node when its transaction
  aborts (a failed export add unrefs the BlockBackend it attached);
* ``file_attach_drains``: blockdev-add naming an existing node as a
  ``file`` child drains that node twice (even when the attach then fails
  on permissions);
* ``SubtreeDrains``: blockdev-reopen's drained subtrees, one section from
  the first listed node to the end of the command;
* ``Drain``: the drained sections of one transaction's actions (backups,
  external snapshots), each from its prepare to its clean (oldest first);
  a job started meanwhile pauses at once, and goes on when no open section
  holds it; ``transaction_drain`` gives a transaction's one ``Drain``;
* ``drain_reaches``: whether a drained node quiesces a job.

Where one drain reaches several jobs, the walk up through the parents
meets the nearest first (and among equals the newest).

A drain's poll runs the jobs it reaches up to their next pause point.  A job
parked in a sleep just wakes (the pause cuts its sleep); one that is not
parked skips its next sleep (``Job.cut_next_sleep``); and when a drained
section of one node (``drain_node_bounce``, ``Drain.begin``) finds a job
that an earlier section of the same command woke, the section and the
command's later events are deferred until that job ran (``JobRunner.defer``),
since in QEMU it runs, I/O and all, inside the command: a rate-limited
mirror can go ready between two drains.  (``drain_all_bounce``,
``SubtreeDrains`` and ``drain_nodes_bounce`` do not defer yet.)

Synchronous (it only emits events and enters parked jobs).  What does not
live here: the job core (``core``), the commands.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qmpgraph.daemon import Daemon
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Job as JobParent
from qmpgraph.graph.model import Node
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import Job, JobTxn, job_runner
from qmpgraph.jobs.state import JobStatus
from qmpgraph.transactions.engine import Action, Transaction

S = JobStatus


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


def _depths(node: Node) -> dict[int, int]:
    """How many edges up from ``node`` each of its ancestors is."""
    depths = {node.id: 0}
    todo = [node]
    for cur in todo:
        for edge in cur.parents:
            parent = edge.parent
            if isinstance(parent, Node) and parent.id not in depths:
                depths[parent.id] = depths[cur.id] + 1
                todo.append(parent)
    return depths


def _job_depth(job: Job, depths: dict[int, int]) -> int:
    if not isinstance(job, BlockJob):
        return 0
    held = [
        depths[e.child.id] for e in job.parent.edges if e.child is not None and e.child.id in depths
    ]
    return min(held, default=len(depths))


def drain_reaches(job: Job, node: Node) -> bool:
    """Whether a drained section of ``node`` quiesces ``job`` (it holds the
    node or a node above it)."""
    return _holds(job, _ancestors(node))


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
    """The drain ended: the job goes on from its pause point.

    A job that was sleeping (a speed limit) or waiting was woken by the
    pause, so it runs its loop again instead of going back to sleep.  A job
    that was not parked (entered by an earlier drain of the same command,
    or in the middle of its I/O) would in QEMU have been run by the drain's
    poll up to its next sleep, which the pending pause skips: it skips that
    sleep here (``Job.cut_next_sleep``)."""
    if job.status is S.PAUSED:
        job._transition(S.RUNNING)
    elif job.status is S.STANDBY:
        job._transition(S.READY)
    if job.is_parked():
        job.enter()
    else:
        job.cut_next_sleep()


def _held_ids(job: Job) -> list[int]:
    if not isinstance(job, BlockJob):
        return []
    return [e.child.id for e in job.parent.edges if e.child is not None]


def drain_all_bounce(daemon: Daemon) -> None:
    """bdrv_drain_all: every job holding a node pauses, then resumes.

    QEMU drains each node's non-node parents, nodes in creation order, both
    to begin and to end: a job pauses at the first node it holds and goes
    on at the last (its pause count is back to zero there)."""
    jobs = [j for j in reversed(list(job_runner(daemon))) if _holds(j, None)]
    far = 1 << 62  # jobs holding no node (blockdev-create) come last
    first = sorted(jobs, key=lambda j: min(_held_ids(j), default=far))
    paused = [j for j in first if _pause_event(j)]
    for job in sorted(paused, key=lambda j: max(_held_ids(j), default=far)):
        _resume_event(job)


def drain_node_bounce(daemon: Daemon, node: Node, times: int = 1) -> None:
    """``times`` drained sections of ``node``: every job holding it or a node
    above it pauses, then resumes, each time.

    A section that finds such a job entered earlier in this command (an
    earlier section's end woke it) is deferred, with the command's later
    events, until that job ran (``JobRunner.defer``): in QEMU its poll runs
    the job, I/O and all, up to its next pause point first."""
    runner = job_runner(daemon)
    for _ in range(times):
        nodes = _ancestors(node)
        jobs = _holding(runner, nodes)
        # The nodes reached are the ones above it now: the command goes on
        # changing the graph before the deferred section plays.
        if (runner.deferring() or any(_entered(runner, j) for j in jobs)) and runner.defer(
            lambda nodes=nodes: _nodes_bounce_async(daemon, nodes)  # type: ignore[misc]
        ):
            continue
        _bounce(jobs)


def _holding(runner: Any, nodes: set[int]) -> list[Job]:
    """The jobs holding any of the nodes with these ids, oldest first."""
    return [j for j in reversed(list(runner)) if _holds(j, nodes)]


def _bounce(jobs: list[Job]) -> None:
    """One drained section: ``jobs`` pause, then the paused ones resume."""
    paused = [j for j in jobs if _pause_event(j)]
    for job in paused:
        _resume_event(job)


def _entered(runner: Any, job: Job) -> bool:
    """Whether ``job`` was woken in this command and has not run yet."""
    return job in runner.kicked and job.started and not job.is_parked() and not job.is_completed()


async def _nodes_bounce_async(daemon: Daemon, nodes: set[int]) -> None:
    """A deferred drained section of the nodes with these ids: the jobs it
    reaches first run to their next park (or end), then pause and resume."""
    runner = job_runner(daemon)
    jobs = _holding(runner, nodes)
    for job in jobs:
        if not job.pause_count and not job.is_completed():
            await runner.run_to_park(job)
    _bounce(jobs)


@dataclass(frozen=True, slots=True)
class DrainsOnAbort(Action):
    """An undo record: if the transaction aborts, ``node`` is drained
    ``times`` times (a BlockBackend attached to it is unreferenced on the
    command's failure path, as blk_exp_add's)."""

    name = "drains-on-abort"
    daemon: Daemon
    node: Node
    times: int = 2

    def abort(self) -> None:
        """The drains happen."""
        drain_node_bounce(self.daemon, self.node, self.times)

    def describe(self) -> dict[str, Any]:
        """The record's name and node."""
        return {"action": self.name, "node": self.node.node_name, "times": self.times}


def drain_nodes_bounce(daemon: Daemon, nodes: set[int]) -> None:
    """One drained section over the nodes with these ids (an AioContext
    change drains every node it moves): the jobs holding any of them pause
    before the reply and resume after it.

    The job moved with the nodes, and the drain's end schedules its
    coroutine in its new context instead of entering it, so in qsd 7.2 the
    resume (``running``/``ready``) races the reply; mostly it comes after
    it, which is what is replayed here."""
    runner = job_runner(daemon)
    paused = [j for j in _holding(runner, nodes) if _pause_event(j)]
    if paused:
        runner.call_after_reply(lambda: _resume_all(paused))


def _resume_all(jobs: list[Job]) -> None:
    for job in jobs:
        if not job.is_completed():
            _resume_event(job)


def _file_refs(options: Any) -> list[str]:
    """The node names a blockdev-add tree gives as ``file`` references."""
    refs: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            if key == "file" and isinstance(value, str):
                refs.append(value)
            elif isinstance(value, dict | list):
                refs.extend(_file_refs(value))
    elif isinstance(options, list):
        for item in options:
            refs.extend(_file_refs(item))
    return refs


@contextmanager
def file_attach_drains(daemon: Daemon, options: dict[str, Any]) -> Iterator[None]:
    """Around blockdev-add: each existing node given as a ``file`` child is
    drained twice when it is attached (QEMU 7.2 attaches it, checks the
    permissions, and a conflict undoes the attach: the drains happened)."""
    nodes = [n for n in (daemon.graph.lookup(r) for r in _file_refs(options)) if n is not None]
    try:
        yield
    except GenericError as err:
        if err.desc.startswith("Permission conflict"):
            for node in nodes:
                drain_node_bounce(daemon, node, times=2)
        raise
    for node in nodes:
        drain_node_bounce(daemon, node, times=2)


def _descendants(node: Node) -> list[Node]:
    seen = {node.id}
    out = [node]
    for cur in out:
        for edge in cur.children:
            child = edge.child
            if child is not None and child.id not in seen:
                seen.add(child.id)
                out.append(child)
    return out


class SubtreeDrains:
    """bdrv_subtree_drained_begin on each node as it is named, all ended
    together: a job holding any node of those subtrees, or a node above
    one, pauses once and resumes at the end."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.paused: list[Job] = []

    def add(self, node: Node) -> None:
        """Drain ``node``'s subtree (the jobs it quiesces pause now)."""
        nodes: set[int] = set()
        for sub in _descendants(node):
            nodes |= _ancestors(sub)
        for job in reversed(list(job_runner(self.daemon))):
            if job not in self.paused and _holds(job, nodes) and _pause_event(job):
                self.paused.append(job)

    def end(self) -> None:
        """The drains end: the paused jobs go on."""
        for job in reversed(self.paused):
            _resume_event(job)
        self.paused.clear()


@contextmanager
def subtree_drains(daemon: Daemon) -> Iterator[SubtreeDrains]:
    """A ``SubtreeDrains`` ended when the block exits (error or not)."""
    drains = SubtreeDrains(daemon)
    try:
        yield drains
    finally:
        drains.end()


class Drain:
    """The drained nodes of one QMP transaction's actions (a backup's source,
    an external snapshot's old node).

    Each action's section drains its source from its prepare to its clean;
    the cleans run in list order, so the oldest section ends first, and a
    job resumes once no open section holds it any more (its quiesce
    counter is back to zero)."""

    def __init__(self) -> None:
        self.sections: list[Node] = []
        self.paused: list[Job] = []
        self.txn: JobTxn | None = None
        self.runner: Any = None

    def _held(self, job: Job) -> bool:
        return any(_holds(job, _ancestors(node)) for node in self.sections)

    def _defer(self, step: Callable[[], Awaitable[None]]) -> bool:
        return self.runner is not None and self.runner.deferring() and self.runner.defer(step)

    def begin(self, daemon: Daemon, node: Node) -> None:
        """bdrv_drained_begin(node): the jobs holding it or a node above pause,
        nearest to it first (and among equals the newest), as the walk up
        through the parents reaches them.  Deferred (``drain_node_bounce``)
        when a job it reaches was woken earlier in this command."""
        runner = self.runner = job_runner(daemon)
        self.sections.append(node)
        depths = _depths(node)
        reached = [j for j in runner if j not in self.paused and _holds(j, set(depths))]
        deferred = any(_entered(runner, j) for j in reached) or runner.deferring()
        if deferred and runner.defer(lambda: self._begin_async(depths)):
            return
        self._begin_now(depths)

    async def _begin_async(self, depths: dict[int, int]) -> None:
        for job in list(self.runner):
            if job not in self.paused and _holds(job, set(depths)) and not job.pause_count:
                await self.runner.run_to_park(job)
        self._begin_now(depths)

    def _begin_now(self, depths: dict[int, int]) -> None:
        nodes = set(depths)
        jobs = list(self.runner)  # newest first
        held = [j for j in jobs if j not in self.paused and _holds(j, nodes)]
        held.sort(key=lambda j: (_job_depth(j, depths), jobs.index(j)))
        for job in held:
            if _pause_event(job):
                self.paused.append(job)

    def started(self, job: Job) -> None:
        """A job started while its nodes are drained: it pauses at once."""
        if self._defer(lambda: _call(lambda: self._started_now(job))):
            return
        self._started_now(job)

    def _started_now(self, job: Job) -> None:
        if _pause_event(job):
            self.paused.append(job)

    def end(self) -> None:
        """The oldest section ends: the jobs no open section holds go on."""
        if not self.sections:
            return
        node = self.sections.pop(0)
        depths = _depths(node)
        if self._defer(lambda: _call(lambda: self._end_now(depths))):
            return
        self._end_now(depths)

    def _end_now(self, depths: dict[int, int]) -> None:
        resumed = [j for j in self.paused if not self._held(j)]
        # drained_end walks up from the node, newest parent first: the jobs
        # nearest to it resume first, and among equals the newest.
        order = {job: i for i, job in enumerate(self.paused)}
        resumed.sort(key=lambda j: (_job_depth(j, depths), -order[j]))
        for job in resumed:
            self.paused.remove(job)
            _resume_event(job)


async def _call(fn: Callable[[], None]) -> None:
    fn()


_DRAINS: weakref.WeakKeyDictionary[Transaction, Drain] = weakref.WeakKeyDictionary()


def transaction_drain(tran: Transaction) -> Drain:
    """The ``Drain`` of the QMP transaction run as ``tran``: every action that
    drains a node until its clean opens a section of it here, so that the
    sections of different action types end in the actions' order."""
    drain = _DRAINS.get(tran)
    if drain is None:
        drain = _DRAINS[tran] = Drain()
    return drain
