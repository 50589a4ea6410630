"""The mirror job (QEMU 7.2's block/mirror.c): ``MirrorJob``.

Set up by ``start_mirror`` inside the command's transaction, in
mirror_start_job's order: the ``mirror_top`` filter appended above the
source, the job (its main node is the filter: CONSISTENT_READ, sharing
CONSISTENT_READ, WRITE and WRITE_UNCHANGED), the chain check, the target's
BlockBackend (WRITE), then the job edges "source" and "target".

The copy loop (``run``) follows mirror_run: the sizes must match ("Source
and target image have different sizes"), the dirty map starts full
(``sync=full``), with what the top image allocates above its backing
(``top``) or empty (``none``); then dirty runs of chunks (at most
``buf-size`` bytes each) are cleared, read through the filter's ``backing``
and written (or zeroed, where the source reads as zeros) to the target,
until nothing is dirty (operations cut as mirror_iteration cuts them: whole
chunks, data runs up to max(buf-size/16, 1 MiB), zero/discard for whole
target clusters; a failed operation is dirty again and on-source-error or
on-target-error decides, ``qmpgraph.jobs.policy``): the job goes ``ready``
and keeps copying what guest
writes dirty (``qmpgraph.io.mirror_hook``) until it is completed or
cancelled.  A soft cancel of a ready job ends it successfully without the
pivot (``cancel_hook``).

The end (``prepare`` on success, ``abort`` otherwise) is mirror_exit_common
(``qmpgraph.jobs.mirror_graph``): on a completed job the target replaces the
source (or the ``replaces`` node) under every parent, then the filter goes.

What does not live here: argument checks and the commands
(``qmpgraph.commands.mirror``), the filter's data path
(``qmpgraph.io.mirror_hook``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.commands.snapshot import reopen_read_only
from qmpgraph.drivers.base import node_size
from qmpgraph.drivers.open import TreeOpenContext
from qmpgraph.drivers.open import _open_backing as open_backing
from qmpgraph.errors import GenericError
from qmpgraph.graph.attach import OP_TYPES
from qmpgraph.graph.graph import filter_or_cow_child, skip_filters
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.names import is_well_formed
from qmpgraph.graph.perms import PERM_ALL, OpenFlag, Perm
from qmpgraph.io import mirror_hook as _mirror_hook  # noqa: F401  (registers "mirror_top")
from qmpgraph.io.blkdebug_io import IO_BITS
from qmpgraph.io.blkdebug_io import runtime as blkdebug_runtime
from qmpgraph.io.depth import own_status
from qmpgraph.io.hooks import (
    RawIO,
    child_block_status,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    flush_node,
)
from qmpgraph.io.mirror_hook import DirtyMap, MirrorTopState
from qmpgraph.io.request import ALLOCATED, DATA, REQ_MAY_UNMAP, ZERO, BlockIOError
from qmpgraph.jobs.blockjob import BlockJob, _block_all, _unblock
from qmpgraph.jobs.core import JobFailed, JobTxn, find_job
from qmpgraph.jobs.mirror_graph import (
    attach_target_backend,
    backing_chain_next,
    can_replace,
    chain_contains,
    detach_target_backend,
    insert_mirror_top,
    pivot,
    remove_mirror_top,
    replace_error,
    set_stop,
)
from qmpgraph.jobs.policy import error_action, io_errno
from qmpgraph.transactions.actions import ref_node, unref_node
from qmpgraph.transactions.composite import set_backing
from qmpgraph.transactions.engine import Transaction

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon

# Targets a mirror wrote to since it last flushed them (QEMU's write_gen !=
# flushed_gen), so that the flush before ready waits for I/O only then.
# Keyed by node id (nodes take no weak references); a stale id only costs
# one extra flush.
_UNFLUSHED: dict[int, bool] = {}

DEFAULT_BUF_SIZE = 16 << 20  # DEFAULT_MIRROR_BUF_SIZE: MAX_IN_FLIGHT * MAX_IO_BYTES
MAX_IO_BYTES = 1 << 20
MAX_IN_FLIGHT = 16


@dataclass(slots=True)
class MirrorParams:
    """What the command decided (QEMU's mirror_start_job arguments)."""

    sync: str = "full"  # full | top | none
    backing_mode: str = "leave"  # leave | source | open
    zero_target: bool = True
    speed: int = 0
    granularity: int = 0
    buf_size: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    unmap: bool = True
    filter_node_name: str | None = None
    copy_mode: str = "background"
    replaces: str | None = None
    auto_finalize: bool = True
    auto_dismiss: bool = True


def default_granularity(target: Node) -> int:
    """bdrv_get_default_bitmap_granularity: the target's cluster size (as
    bdrv_get_info finds it, through filters and raw) clamped to 4 KiB..64 KiB,
    else 64 KiB."""
    size = _target_cluster(target)
    return min(65536, max(4096, size)) if size else 65536


def check_job_id(daemon: Daemon, job_id: str | None, node: Node) -> str:
    """block_job_create + job_create's ID checks: without an ID the job is
    named after the node's BlockBackend (none in the storage daemon: "")."""
    if job_id is None:
        job_id = next(
            (
                e.parent.name
                for e in node.parents
                if isinstance(e.parent, BlockBackend) and e.parent.name
            ),
            "",
        )
    if not is_well_formed(job_id):
        raise GenericError(f"Invalid job ID '{job_id}'")
    if find_job(daemon, job_id) is not None:
        raise GenericError(f"Job ID '{job_id}' already in use")
    return job_id


def start_mirror(
    daemon: Daemon,
    tran: Transaction,
    job_id: str | None,
    *,
    source: Node,
    target: Node,
    params: MirrorParams,
) -> MirrorJob:
    """mirror_start_job from the buf-size check on, inside ``tran``; returns the
    job, created but not started.  On an error after the job exists, the job
    has already failed early (``null``) when this raises."""
    if params.granularity == 0:
        params.granularity = default_granularity(target)
    if params.buf_size < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if params.buf_size == 0:
        params.buf_size = DEFAULT_BUF_SIZE
    # Whole chunks: mirror_start_job rounds the buffer up to the granularity.
    params.buf_size = -(-params.buf_size // params.granularity) * params.granularity
    if skip_filters(source) is skip_filters(target):
        raise GenericError("Can't mirror node into itself")
    graph = daemon.graph
    target_is_backing = chain_contains(source, target)
    top = insert_mirror_top(tran, graph, source, params.filter_node_name)
    job_id = check_job_id(daemon, job_id, top)
    job = MirrorJob(daemon, job_id, tran, top=top, source=source, target=target, params=params)
    # The job's edge holds the filter now.
    unref_node(tran, graph, top)
    try:
        job.setup(tran, target_is_backing)
    except GenericError:
        job.early_fail()
        raise
    job.creating = False
    return job


class MirrorJob(BlockJob):
    """A blockdev-mirror/drive-mirror job."""

    job_type = "mirror"
    has_complete = True

    def __init__(
        self,
        daemon: Daemon,
        job_id: str | None,
        tran: Transaction,
        *,
        top: Node,
        source: Node,
        target: Node,
        params: MirrorParams,
        txn: JobTxn | None = None,
    ) -> None:
        # While the creating command's transaction is open, a failed job's
        # graph state goes with that transaction's abort (see ``free``).
        self.creating = True
        super().__init__(
            daemon,
            job_id,
            tran,
            top,
            perm=int(Perm.CONSISTENT_READ),
            shared=int(Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE),
            speed=params.speed,
            auto_finalize=params.auto_finalize,
            auto_dismiss=params.auto_dismiss,
            txn=txn,
        )
        self.top = top
        self.source = source
        self.target = target
        self.params = params
        self.base: Node | None = backing_chain_next(source) if params.sync == "top" else None
        self.target_edge: Edge | None = None
        self.should_complete = False
        self.synced = False
        self.exited = False
        self.bitmap: DirtyBitmap | None = None
        self.to_replace: Node | None = None
        self.replace_blocker: str | None = None
        self.active_error: int | None = None
        # The run ended and the source is drained until the exit.
        self.end_drained = False
        state = top.state
        assert isinstance(state, MirrorTopState)
        self.top_state = state

    def setup(self, tran: Transaction, target_is_backing: bool) -> None:
        """The rest of mirror_start_job: chain check, target BB, dirty map, job edges."""
        target = self.target
        if not target_is_backing and chain_contains(self.source, skip_filters(target) or target):
            raise GenericError(
                "Cannot mirror to a filter on top of a node in the source's backing chain"
            )
        self.target_edge = attach_target_backend(
            tran, self.daemon.graph, target, target_is_backing=target_is_backing
        )
        length = node_size(self.source)
        # The map exists (and records guest writes) from now on, as QEMU's
        # bitmap does; the job uses it once it runs.  It is QEMU's job
        # bitmap: an anonymous bitmap of the source, which
        # query-named-block-nodes lists with what is still to copy; in
        # write-blocking mode it is disabled (guest writes go to the target
        # instead of marking it).
        self.bitmap = DirtyBitmap(None, length, self.params.granularity)
        self.bitmap.disabled = self.params.copy_mode == "write-blocking"
        bitmap_registry.add(tran, self.daemon.graph, self.source, self.bitmap)
        dirty = DirtyMap(length, self.params.granularity, self.bitmap)
        dirty.on_dirty = lambda: self.enter(only_if_no_timer=True)
        self.top_state.dirty = dirty
        self.add_node(
            tran,
            "source",
            self.source,
            0,
            int(Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.CONSISTENT_READ),
        )
        self.add_node(tran, "target", target, 0, PERM_ALL)

    # -- the copy loop --------------------------------------------------------------

    async def run(self) -> None:
        """mirror_run; whatever its end, the source stays drained until the
        exit (QEMU's need_drain / final drain), so queries show the job
        paused while it waits or is pending."""
        try:
            await self._run()
        finally:
            self.end_drained = True

    def query_block(self) -> dict[str, Any]:
        """BlockJobInfo: the drain of the run's end counts as a pause."""
        info = super().query_block()
        if self.end_drained:
            info["paused"] = True
        return info

    async def _run(self) -> None:
        """mirror_run's body."""
        if self.is_cancelled():
            return
        dirty = self.top_state.dirty
        assert dirty is not None and self.target_edge is not None
        length = node_size(self.source)
        if length != node_size(self.target):
            await self.io_point()  # QEMU drains the source on the way out
            raise JobFailed(errno.EINVAL, "Source and target image have different sizes")
        if length == 0:
            self.transition_to_ready()
            self.synced = True
            while not self.cancel_requested() and not self.should_complete:
                await self.yield_()
            await self.io_point()
            return
        if self.params.sync != "none":
            await self._dirty_init(dirty, length)
            if self.is_cancelled():
                return
        if self.params.copy_mode == "write-blocking":
            self.top_state.active_target = self.target_edge
            self.top_state.on_target_error = self._active_write_failed
            self.top_state.add_remaining = self.progress_increase_remaining
            self.top_state.add_done = self.progress_update
        cursor = 0
        while True:
            if self.active_error is not None:
                # mirror_run's s->ret check: an active write's error reported.
                await self.io_point()
                raise JobFailed(self.active_error)
            await self.pause_point()
            if self.is_cancelled():
                # QEMU drains the source on the way out: the command that
                # cancelled gets its reply before the job finishes.
                await self.io_point()
                return
            cnt = dirty.dirty_bytes()
            # Whole chunks, the last one too (QEMU does not clip the count).
            self.progress_set_remaining(cnt)
            if cnt:
                cursor = await self._iteration(dirty, cursor, length)
                delay = self.ratelimit_delay(0)
                if delay:
                    await self.sleep_ns(delay)
                continue
            if not self.is_ready():
                # mirror_flush: the target is flushed before the job is ready;
                # QEMU skips the flush (no I/O, no yield) when nothing was
                # written to it since the last one.
                if _UNFLUSHED.pop(self.target.id, False):
                    await self.io_point()
                    await flush_node(self.target)
                if dirty.dirty_bytes():
                    continue
                self.transition_to_ready()
                self.synced = True
            if self.should_complete or self.cancel_requested():
                # The final drain: guest writes under way finish (and mark what
                # they changed) before the job ends and the target replaces
                # the source; no await lies between this check and the end.
                await self.io_point()
                await self.top_state.drained()
                if dirty.dirty_bytes():
                    continue
                return
            # Idle and ready: wait for a guest write (``on_dirty``) or a verb.
            await self.yield_()

    async def _dirty_init(self, dirty: DirtyMap, length: int) -> None:
        """mirror_dirty_init: what must be copied at first."""
        target_edge = self.target_edge
        assert target_edge is not None
        target = self.target
        if self.params.zero_target:
            unmappable = bool(target.open_flags & OpenFlag.UNMAP)
            if not unmappable:
                dirty.mark(0, length)
                return
            # A target that can zero cheaply is zeroed first; only what the
            # source allocates is copied then (no progress is counted for it).
            await self.io_point()
            await child_write_zeroes(target_edge, 0, length, REQ_MAY_UNMAP, backend=True)
        chain = self._chain_above_base()
        offset = 0
        while offset < length:
            await self.pause_point()
            if self.is_cancelled():
                return
            allocated, count = await _allocated_above(chain, offset, length - offset)
            if allocated:
                dirty.mark(offset, count)
            offset += count

    def _chain_above_base(self) -> list[Node]:
        """The nodes from the source down to (not including) ``base``."""
        chain: list[Node] = []
        cur: Node | None = self.source
        while cur is not None and cur is not self.base:
            chain.append(cur)
            edge = filter_or_cow_child(cur)
            cur = edge.child if edge is not None else None
        return chain

    async def _iteration(self, dirty: DirtyMap, cursor: int, length: int) -> int:
        """mirror_iteration: copy one run of dirty chunks; returns the next cursor."""
        gran = dirty.granularity
        run = dirty.next_run(cursor, max(1, self.params.buf_size // gran))
        if run is None:
            return 0
        first, end = run
        dirty.clear_chunks(first, end)
        start, stop = first * gran, min(end * gran, length)
        backing = self.top.backing
        target_edge = self.target_edge
        assert backing is not None and target_edge is not None
        pos = start
        failed = False
        report: int | None = None
        max_io = max(self.params.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        async with self.top_state.lock:
            while pos < stop:
                n, method = await self._operation(backing, pos, stop, gran, max_io)
                n = min(n, length - pos)  # mirror_clip_bytes
                if method != "copy" or not _fails_at_once(backing.child, pos, n):
                    await self.io_point()
                _UNFLUSHED[self.target.id] = True
                is_read = False
                try:
                    if method == "zero":
                        zflags = REQ_MAY_UNMAP if self.params.unmap else 0
                        await child_write_zeroes(target_edge, pos, n, zflags, backend=True)
                    elif method == "discard":
                        await child_discard(target_edge, pos, n)
                    else:
                        is_read = True
                        data = await child_read(backing, pos, n)
                        is_read = False
                        await child_write(target_edge, pos, data)
                except (BlockIOError, OSError) as exc:
                    # The operation's range is dirty again and the side that
                    # failed chooses (mirror_error_action); QEMU's other
                    # operations of this iteration were started already and
                    # go on, a report fails the job at the loop's next turn.
                    dirty.mark(pos, n)
                    code = io_errno(exc)
                    policy = self.params.on_source_error if is_read else self.params.on_target_error
                    failed = True
                    if error_action(self, policy, is_read, code) == "report" and report is None:
                        report = code
                else:
                    self.progress_update(n)
                    self.ratelimit_delay(n)
                pos += n
        if report is not None:
            # mirror_run sees s->ret at its loop's next turn, after the
            # iteration's job_sleep_ns: a timer, so a pending reply goes first.
            await self.sleep_ns(0)
            raise JobFailed(report)
        if failed:
            return 0
        return end if end < dirty.chunks else 0

    async def _operation(
        self, backing: Edge, pos: int, stop: int, gran: int, max_io: int
    ) -> tuple[int, str]:
        """One operation of mirror_iteration: its length (whole chunks; one
        chunk at least) and method ("copy", "zero" or "discard") from the
        source's block status; zeroing or discarding only whole target
        clusters."""
        try:
            flags, pnum = await child_block_status(backing, pos, stop - pos)
        except (BlockIOError, OSError):
            return max(gran, min(stop - pos, max_io) // gran * gran), "copy"
        n = min(pnum, max_io) if flags & DATA else pnum
        n -= n % gran
        if n < gran:
            return gran, "copy"
        if flags & DATA:
            return n, "copy"
        cluster = _target_cluster(self.target)
        if cluster and (pos % cluster or (pos + n) % cluster):
            return n, "copy"
        return n, "zero" if flags & ZERO else "discard"

    def _active_write_failed(self, code: int) -> None:
        """do_sync_target_write's error: the target policy decides; a report
        fails the job at its loop's next turn (the range is dirty again)."""
        action = error_action(self, self.params.on_target_error, False, code)
        if action == "report" and self.active_error is None:
            self.active_error = code
            self.enter()

    # -- verbs ------------------------------------------------------------------------

    def complete(self) -> None:
        """mirror_complete: block the node to replace, then let the loop finish."""
        if not self.synced:
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        replaces = self.params.replaces
        if replaces is not None:
            node = self.daemon.graph.lookup(replaces)
            if node is None:
                raise GenericError(f"Node name '{replaces}' not found")
            self.to_replace = node
            self.replace_blocker = "block device is in use by block-job-complete"
            with self.daemon.graph_transaction("block-job-complete", {"id": self.id}) as tran:
                _block_all(tran, node, self.replace_blocker)
        self.should_complete = True
        if not self.paused:
            self.enter()

    def free(self) -> None:
        """block_job_free, unless the creating transaction is still open: its
        abort already takes back every edge the job made."""
        if not self.creating:
            super().free()

    def cancel_hook(self, force: bool) -> bool:
        """mirror_cancel: before ready every cancel is forced."""
        return force or not self.is_ready()

    def on_resume(self) -> None:
        """Nothing to do: the loop re-reads its state after every pause point."""

    # -- the end --------------------------------------------------------------------

    def prepare(self) -> None:
        """mirror_prepare: the exit with the pivot (if completed)."""
        self._exit(abort=False)

    def abort(self) -> None:
        """mirror_abort: the exit without the pivot."""
        self._exit(abort=True)

    def _exit(self, *, abort: bool) -> None:
        """mirror_exit_common (see ``mirror_graph``)."""
        if self.exited:
            return
        self.exited = True
        self.end_drained = False
        st = self.top_state
        st.detached = True
        st.active_target = None
        graph = self.daemon.graph
        failure: str | None = None
        with self.daemon.graph_transaction("mirror-exit", {"id": self.id}) as tran:
            # Dropping the job's edges must not free the filter yet.
            ref_node(tran, self.top)
            if self.target_edge is not None:
                detach_target_backend(tran, graph, self.target_edge)
                self.target_edge = None
            set_stop(tran, graph, self.top)
            if not abort:
                failure = self._finish_backing(tran)
            if self.should_complete and not abort:
                to_replace = self.to_replace or self.source
                if to_replace.read_only != self.target.read_only:
                    _set_read_only(tran, graph, self.target, to_replace.read_only)
                if can_replace(self.source, to_replace):
                    try:
                        pivot(tran, graph, to_replace, self.target)
                    except GenericError as err:
                        failure = err.desc
                else:
                    failure = replace_error(to_replace, self.target)
            if self.to_replace is not None and self.replace_blocker is not None:
                _unblock(tran, self.to_replace, self.replace_blocker, OP_TYPES)
            if self.bitmap is not None:
                bitmap_registry.remove(tran, self.source, self.bitmap)
            self.remove_all_nodes(tran)
            remove_mirror_top(tran, graph, self.top)
        st.dirty = None
        if failure is not None and not abort:
            raise JobFailed(errno.EPERM)

    def _finish_backing(self, tran: Transaction) -> str | None:
        """drive-mirror's backing modes: give the target its backing chain."""
        mode = self.params.backing_mode
        if mode == "open":
            # bdrv_open_backing_file: the image's own backing file, from its
            # header (a failure is only reported by QEMU, not a job error).
            unfiltered = skip_filters(self.target) or self.target
            if unfiltered.backing is not None:
                return None
            mark = tran.mark()
            try:
                open_backing(TreeOpenContext(self.daemon.graph, tran), unfiltered, {})
            except GenericError:
                tran.rollback_to(mark)
            return None
        if mode != "source":
            return None
        backing = self.source if self.params.sync == "none" else self.base
        unfiltered = skip_filters(self.target) or self.target
        current = unfiltered.backing.child if unfiltered.backing is not None else None
        if current is backing:
            return None
        mark = tran.mark()
        try:
            set_backing(tran, self.daemon.graph, unfiltered, backing)
        except GenericError as err:
            tran.rollback_to(mark)
            return err.desc
        return None


def _target_cluster(target: Node) -> int:
    """bdrv_get_info's cluster size of the target (following filters and raw);
    0 when it has none."""
    node: Node | None = target
    while node is not None:
        state = node.state
        for holder in (state, getattr(state, "header", None)):
            size = getattr(holder, "cluster_size", None)
            if isinstance(size, int) and size:
                return size
        if node.format_name not in ("raw", "copy-on-read", "throttle", "blkdebug"):
            return 0
        edge = node.file
        node = edge.child if edge is not None else None
    return 0


def _fails_at_once(node: Node | None, offset: int, length: int) -> bool:
    """Whether a read fails at a blkdebug rule before any real I/O (through
    raw windows and filters): QEMU then fails it within the command that
    started the job, before its reply."""
    while node is not None:
        rt = blkdebug_runtime(node)
        if rt is not None:
            for rule in rt.active:
                hit = rule.offset == -1 or (length and offset <= rule.offset < offset + length)
                if hit and rule.iotype_mask & IO_BITS["read"]:
                    return bool(rule.error)
            return False
        if node.format_name == "raw":
            offset += RawIO._base(node)
        elif node.format_name not in ("copy-on-read", "throttle", "blkdebug"):
            return False
        edge = node.file
        node = edge.child if edge is not None else None
    return False


async def _allocated_above(chain: list[Node], offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated_above over ``chain`` (top first): (allocated, bytes)."""
    count = length
    for node in chain:
        flags, pnum = await own_status(node, offset, count)
        if not pnum:  # past a shorter layer's end: nothing allocated there
            continue
        if flags & ALLOCATED:
            return True, pnum
        count = min(count, pnum)
    return False, count


def _set_read_only(tran: Transaction, graph: Any, node: Node, read_only: bool) -> None:
    """bdrv_reopen_set_read_only for the target (errors ignored, as QEMU does):
    the node and the children that inherit from it (its file node too)."""
    mark = tran.mark()
    try:
        reopen_read_only(tran, graph, node, read_only)
    except GenericError:
        tran.rollback_to(mark)
