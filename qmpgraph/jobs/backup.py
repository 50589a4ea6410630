"""The backup job (QEMU 7.2's block/backup.c over block-copy): ``BackupJob``.

``backup_job_create``'s checks and steps run in QEMU's order inside the
creating command's transaction: source and target differ, compression
support, the backup-source and backup-target op blockers, ``x-perf``, the
sync bitmap, equal sizes, then a ``copy-before-write`` filter opened with
the source as ``file`` and the target as ``target`` and inserted above the
source (every parent of the source moves onto it; "Could not create node:"
and "Could not replace node:" prefixes), ``max-chunk`` against the cluster
size, the job (main node: the filter, perm 0, sharing everything) and its
"target" job edge.

The copy (``run``) shares the filter's cluster bitmaps
(``qmpgraph.io.cbw_hook``): a cluster copied because a guest wrote over it
is not copied again, and one the job copied is not copied again before a
guest write.  ``sync=full`` copies every cluster, ``top`` first drops the
clusters the top image does not allocate, ``bitmap`` starts from the sync
bitmap, ``none`` copies nothing itself and runs until cancelled (the filter
alone keeps the target a point-in-time copy: old-style fleecing).  Clusters
go in tasks of up to 1 MiB cut to the source's block status extents under
the speed limit, as block-copy's READ_WRITE method does; zero extents are
written as zeroes; with ``compress`` each cluster is a task of its own,
written compressed into the qcow2 target.  A failed task leaves its
clusters to copy; when the call's started tasks are done, on-source-error
(a failed read) or on-target-error (a failed write) decides: report fails
the job, stop pauses it and ignore retries (a new call from the start).

When the job ends (``clean``) the filter is dropped: its parents move back
onto the source.

What does not live here: argument checks of the QMP commands and the
transaction actions (``qmpgraph.commands.backup``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.bitmaps.checks import DEFAULT, check
from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.bitmaps.registry import mark_dirty
from qmpgraph.drivers.base import node_size
from qmpgraph.drivers.open import TreeOpenContext, open_one
from qmpgraph.drivers.qcow2_compress import CompressedWriteError, write_compressed
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.perms import PERM_ALL, Perm
from qmpgraph.io.cbw_hook import CBW_IO
from qmpgraph.io.depth import own_status
from qmpgraph.io.hooks import (
    child_block_status,
    child_read,
    child_write,
    child_write_zeroes,
)
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import ALLOCATED, DATA, ZERO, BlockIOError, eperm
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import JobFailed, JobTxn
from qmpgraph.jobs.drain import drain_node_bounce, drain_reaches
from qmpgraph.jobs.policy import error_action, io_errno
from qmpgraph.transactions.actions import ref_node, unref_node
from qmpgraph.transactions.composite import drop_filter, insert_node
from qmpgraph.transactions.engine import Transaction

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon

INT_MAX = (1 << 31) - 1
COPY_CHUNK = 1 << 20  # BLOCK_COPY_MAX_BUFFER: block-copy's read/write chunk


@dataclass(slots=True)
class BackupParams:
    """What do_backup_common decided."""

    sync: str = "full"  # full | top | none | bitmap
    bitmap: DirtyBitmap | None = None
    bitmap_mode: str | None = None
    speed: int = 0
    compress: bool = False
    filter_node_name: str | None = None
    max_workers: int = 64
    max_chunk: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    auto_finalize: bool = True
    auto_dismiss: bool = True


def _blocked(node: Node, op: str) -> None:
    """bdrv_op_is_blocked: "Node '%s' is busy: <first reason>"."""
    reasons = node.op_blockers.get(op)
    if reasons:
        name = _device_name(node) or node.node_name
        raise GenericError(f"Node '{name}' is busy: {reasons[0]}")


def _device_name(node: Node) -> str:
    """bdrv_get_device_name: the name of a named BlockBackend on ``node``, else ""."""
    for edge in node.parents:
        if isinstance(edge.parent, BlockBackend) and edge.parent.name:
            return edge.parent.name
    return ""


def insert_cbw(
    tran: Transaction, daemon: Daemon, source: Node, target: Node, filter_node_name: str | None
) -> Node:
    """bdrv_cbw_append: open the filter over ``source``/``target`` and insert it."""
    graph = daemon.graph
    options: dict[str, Any] = {
        "driver": "copy-before-write",
        "file": source.node_name,
        "target": target.node_name,
    }
    if filter_node_name is not None:
        options["node-name"] = filter_node_name
    try:
        cbw = open_one(TreeOpenContext(graph, tran), options, None)
    except GenericError as err:
        raise GenericError(f"Could not create node: {err.desc}") from err
    insert_node(tran, graph, source, cbw)
    return cbw


def start_backup(
    daemon: Daemon,
    tran: Transaction,
    job_id: str | None,
    *,
    source: Node,
    target: Node,
    params: BackupParams,
    txn: JobTxn | None = None,
) -> BackupJob:
    """backup_job_create inside ``tran``: the job, created but not started."""
    if source is target:
        raise GenericError("Source and target cannot be the same")
    if params.compress and target.format_name != "qcow2":
        # block_driver_can_compress: of qmpgraph's drivers only qcow2 writes
        # compressed clusters.
        raise GenericError(f"Compression is not supported for this drive {_device_name(target)}")
    _blocked(source, "backup-source")
    _blocked(target, "backup-target")
    if params.max_workers < 1 or params.max_workers > INT_MAX:
        raise GenericError(f"max-workers must be between 1 and {INT_MAX}")
    if params.max_chunk < 0:
        raise GenericError("max-chunk must be zero (which means no limit) or positive")
    if params.bitmap is not None and params.bitmap_mode != "never":
        check_bitmap_usable(params.bitmap)
    # Before the filter: its block-copy bitmap is newer and listed first.
    successor = _create_successor(tran, daemon.graph, source, params.bitmap)
    if node_size(source) != node_size(target):
        raise GenericError("Source and target image have different sizes")
    cbw = insert_cbw(tran, daemon, source, target, params.filter_node_name)
    cluster = _cluster_size(target)
    if params.max_chunk and params.max_chunk < cluster:
        raise GenericError(
            f"Required max-chunk ({params.max_chunk}) is less than backup cluster size ({cluster})"
        )
    if job_id is None:
        job_id = _device_name(cbw)
    job = BackupJob(
        daemon, job_id, tran, cbw=cbw, source=source, target=target, params=params, txn=txn
    )
    job.cluster = cluster
    # The job's edge holds the filter now.
    unref_node(tran, daemon.graph, cbw)
    job.add_node(tran, "target", target, 0, PERM_ALL)
    job.successor = successor
    return job


def _create_successor(
    tran: Transaction, graph: BlockGraph, source: Node, bitmap: DirtyBitmap | None
) -> DirtyBitmap | None:
    """bdrv_dirty_bitmap_create_successor: the sync bitmap is frozen (busy, not
    recording itself) and an anonymous successor records writes meanwhile."""
    if bitmap is None:
        return None
    successor = DirtyBitmap(None, bitmap.size, bitmap.granularity)
    successor.disabled = bitmap.disabled
    bitmap_registry.add(tran, graph, source, successor)
    bitmap_registry.change_flags(tran, bitmap, disabled=True, busy=True)
    bitmap_registry.set_successor(tran, bitmap, successor)
    return successor


def _cluster_size(target: Node) -> int:
    """block_copy_calculate_cluster_size: at least 64 KiB, else the target's cluster."""
    state = target.state
    for holder in (state, getattr(state, "header", None)):
        size = getattr(holder, "cluster_size", None)
        if isinstance(size, int) and size:
            return max(65536, size)
    return 65536


def check_bitmap_usable(bitmap: DirtyBitmap) -> None:
    """bdrv_dirty_bitmap_check(BDRV_BITMAP_DEFAULT) for a bitmap the job will write."""
    check(bitmap, DEFAULT)


class BackupJob(BlockJob):
    """A blockdev-backup/drive-backup job."""

    job_type = "backup"

    def __init__(
        self,
        daemon: Daemon,
        job_id: str | None,
        tran: Transaction,
        *,
        cbw: Node,
        source: Node,
        target: Node,
        params: BackupParams,
        txn: JobTxn | None = None,
    ) -> None:
        # While the creating command's transaction is open, its abort takes
        # back every graph change the job made (see ``free`` and ``clean``).
        self.creating = True
        self.dropped = False
        super().__init__(
            daemon,
            job_id,
            tran,
            cbw,
            perm=0,
            shared=PERM_ALL,
            speed=params.speed,
            on_error=params.on_source_error,
            auto_finalize=params.auto_finalize,
            auto_dismiss=params.auto_dismiss,
            txn=txn,
        )
        self.cbw = cbw
        self.source = source
        self.target = target
        self.params = params
        self.cluster = 65536
        self.length = node_size(source)
        self.successor: DirtyBitmap | None = None

    # -- progress -------------------------------------------------------------------

    @property
    def progress_current(self) -> int:
        """Bytes copied to the target, by the job or by the filter before a guest
        write: block-copy counts both on the job's progress meter."""
        cbw = getattr(self, "cbw", None)
        if cbw is None or self.creating or self.dropped:
            return self._progress
        st = CBW_IO.state(cbw)
        return max(self._progress, min(sum(st.done) * st.cluster, self.length))

    @progress_current.setter
    def progress_current(self, value: int) -> None:
        self._progress = value

    def progress_update(self, done: int) -> None:
        """The job's own copies (the getter above adds the filter's)."""
        self._progress += done

    # -- the copy ---------------------------------------------------------------------

    async def run(self) -> None:
        """backup_run, then the drain before backup_clean drops the filter."""
        try:
            await self._backup_run()
        finally:
            # Guest requests under way through the filter end first (QEMU
            # drains it in bdrv_cbw_drop); clean follows without a checkpoint.
            await CBW_IO.drained(self.cbw)

    async def _backup_run(self) -> None:
        """backup_run."""
        st = CBW_IO.state(self.cbw)
        if self.params.sync == "bitmap" and self.params.bitmap is not None:
            _init_from_bitmap(st.to_copy, st.cluster, self.params.bitmap, self.length)
        self.progress_set_remaining(sum(st.to_copy) * st.cluster)
        if self.params.sync == "top":
            await self._reset_unallocated(st.to_copy, st.cluster)
            if self.is_cancelled():
                return
        if self.params.sync == "none":
            while not self.is_cancelled():
                await self.yield_()
            return
        await self._copy_all(st)

    async def _reset_unallocated(self, to_copy: bytearray, cluster: int) -> None:
        """block_copy_reset_unallocated over the whole source, cluster by cluster."""
        for c in range(len(to_copy)):
            await self.pause_point()
            if self.is_cancelled():
                return
            if not to_copy[c]:
                continue
            pos = c * cluster
            n = min(cluster, self.length - pos)
            await self.io_point()  # block status is I/O: the command replies first
            flags, pnum = await own_status(self.source, pos, n)
            if not flags & ALLOCATED and pnum >= n:
                to_copy[c] = 0
                self.progress_set_remaining(sum(to_copy) * cluster)

    async def _copy_all(self, st: Any) -> None:
        """block_copy over every dirty cluster: tasks of up to 1 MiB of dirty
        clusters (``max-chunk`` if smaller), cut to the source's block status
        extent (at least one cluster), zero extents written as zeroes, the
        speed limit checked before each task."""
        cbw = self.cbw
        source_edge = _child_edge(cbw, "file")
        target_edge = _child_edge(cbw, "target")
        cluster = st.cluster
        n = len(st.to_copy)
        chunk = max(cluster, COPY_CHUNK)
        if self.params.max_chunk:
            chunk = min(chunk, self.params.max_chunk)
        # Compressed writes go one block-copy cluster at a time.
        max_clusters = 1 if self.params.compress else max(1, chunk // cluster)
        c = 0
        # The first failure of this block-copy call and the tasks started
        # after it: QEMU's tasks run in a pool of max-workers, so the ones
        # already started when a task fails still run.
        call_failed: tuple[bool, int] | None = None
        after_fail = 0
        # A cancel that enters a job stopped on an error meets a new call
        # whose tasks have all started: they run to their end (failures
        # dropped), then the call ends cancelled and so does the job.
        cancelled_call = False
        while True:
            await self.pause_point()
            if self.is_cancelled() and not cancelled_call:
                return
            while c < n and not st.to_copy[c]:
                c += 1
            if call_failed is not None and (c >= n or after_fail >= self.params.max_workers - 1):
                # backup_loop: report ends the job, stop pauses it first, and
                # both stop and ignore start a new call from the beginning.
                is_read, code = call_failed
                call_failed, after_fail = None, 0
                policy = self.params.on_source_error if is_read else self.params.on_target_error
                if error_action(self, policy, is_read, code) == "report":
                    raise JobFailed(code)
                await self.pause_point()
                cancelled_call = self.is_cancelled()
                c = 0
                continue
            if c >= n:
                return
            delay = 0 if cancelled_call else self.ratelimit_delay(0)
            if delay:
                await self.sleep_ns(delay)
                continue
            async with st.lock:
                if not st.to_copy[c]:
                    continue
                end = c + 1
                while end < n and end - c < max_clusters and st.to_copy[end]:
                    end += 1
                pos = c * cluster
                nbytes = min(end * cluster, self.length) - pos
                # No io point here: block status of a file is an lseek and an
                # injected error fails at once; the request waits where it
                # reaches the disk (``qmpgraph.io.hooks.disk_wait``).
                nbytes, zero = await self._task_extent(source_edge, pos, nbytes, cluster)
                is_read = False
                try:
                    if zero:
                        await child_write_zeroes(target_edge, pos, nbytes)
                    else:
                        is_read = True
                        data = await child_read(source_edge, pos, nbytes)
                        is_read = False
                        if self.params.compress:
                            await write_compressed_target(target_edge, pos, data)
                        else:
                            await child_write(target_edge, pos, data)
                except (BlockIOError, OSError) as err:
                    failed: tuple[bool, int] | None = (is_read, io_errno(err))
                else:
                    failed = None
                    last = -(-(pos + nbytes) // cluster)
                    for k in range(c, last):
                        st.to_copy[k], st.done[k] = 0, 1
            if call_failed is not None:
                after_fail += 1
            if failed is not None:
                # The failed task's clusters are still to copy.
                if not cancelled_call:
                    call_failed = call_failed or failed
                c = -(-(pos + nbytes) // cluster)
                continue
            self.progress_update(nbytes)
            self.ratelimit_delay(nbytes)
            c = last

    async def _task_extent(
        self, source_edge: Any, pos: int, nbytes: int, cluster: int
    ) -> tuple[int, bool]:
        """block_copy_block_status: the task's bytes and whether they read as zeros."""
        flags, pnum = await child_block_status(source_edge, pos, nbytes)
        if pnum < cluster:
            return min(cluster, self.length - pos), False
        if pos + pnum >= self.length:
            pnum = self.length - pos
        else:
            pnum -= pnum % cluster
        return min(pnum, nbytes), bool(flags & ZERO and not flags & DATA)

    # -- the end --------------------------------------------------------------------

    def commit(self) -> None:
        """backup_commit: backup_cleanup_sync_bitmap after success."""
        self._cleanup_sync_bitmap(success=True)

    def abort(self) -> None:
        """backup_abort: backup_cleanup_sync_bitmap after failure or cancel."""
        self._cleanup_sync_bitmap(success=False)

    def _cleanup_sync_bitmap(self, *, success: bool) -> None:
        """Abdicate (the successor, in its own place in the list, takes the
        bitmap's name) when the job succeeded or ``bitmap-mode=always``, else
        reclaim (the successor merges back); a failed ``always`` job also keeps
        what it did not copy."""
        bitmap, successor = self.params.bitmap, self.successor
        if bitmap is None or successor is None or self.creating:
            return
        mode = self.params.bitmap_mode
        sync = (success or mode == "always") and mode != "never"
        with self.daemon.graph_transaction("backup-bitmap", {"id": self.id}) as tran:
            if sync:
                bitmap = bitmap_registry.abdicate(tran, self.source, bitmap)
            else:
                merged = DirtyBitmap(None, bitmap.size, bitmap.granularity)
                merged.restore_bits(bitmap.copy_bits())
                merged.merge_from(successor)
                bitmap_registry.change_bits(tran, bitmap, merged.bits)
                disabled = successor.disabled
                bitmap_registry.change_flags(tran, bitmap, disabled=disabled, busy=False)
                bitmap_registry.set_successor(tran, bitmap, None)
                bitmap_registry.remove(tran, self.source, successor)
            if not success and mode == "always":
                merged = DirtyBitmap(None, bitmap.size, bitmap.granularity)
                merged.restore_bits(bitmap.copy_bits())
                st = CBW_IO.state(self.cbw)
                for c in range(len(st.to_copy)):
                    if st.to_copy[c]:
                        pos = c * st.cluster
                        merged.set_range(pos, min(st.cluster, self.length - pos))
                bitmap_registry.change_bits(tran, bitmap, merged.bits)
        self.successor = None

    def clean(self) -> None:
        """backup_clean: drop the copy-before-write filter."""
        if self.creating or self.dropped:
            return
        # The filter's bitmaps go with it: keep what they counted.
        self._progress = self.progress_current
        self.dropped = True
        graph = self.daemon.graph
        cbw = self.cbw
        self._drain_txn_peers()
        # Dropping the filter drains it: a job above it (another backup of
        # the same source, whose filter sits on this one) pauses and goes on.
        drain_node_bounce(self.daemon, cbw)
        with self.daemon.graph_transaction("backup-clean", {"id": self.id}) as tran:
            ref_node(tran, cbw)
            self.remove_all_nodes(tran)
            if cbw.file is not None and cbw.file.child is not None:
                drop_filter(tran, graph, cbw)
            unref_node(tran, graph, cbw)
        CBW_IO.drop(cbw)

    def _drain_txn_peers(self) -> None:
        """Dropping the filter drains the graph: in QEMU the cancelled jobs of
        the same group that the drain reaches run to their end then, before
        this job's last events (the others end later, in job_finish_sync)."""
        for other in list(self.txn.jobs):
            done = other is self or other.is_completed()
            if not done and other.cancel_requested() and drain_reaches(other, self.cbw):
                other.finish_now()

    def free(self) -> None:
        """block_job_free, unless the creating transaction is still open."""
        if not self.creating:
            super().free()


async def write_compressed_target(edge: Edge, offset: int, data: bytes) -> None:
    """bdrv_co_pwritev with BDRV_REQ_WRITE_COMPRESSED on a qcow2 target:
    whole clusters deflated (``qcow2_compress``); the target's dirty bitmaps
    see the write."""
    child = edge.child
    if child is None:
        raise BlockIOError(errno.ENOMEDIUM)
    if not edge.perm & Perm.WRITE or child.read_only:
        raise eperm()

    def compressed(img: Any) -> int:
        try:
            write_compressed(img, offset, data)
        except CompressedWriteError as err:
            return err.errno
        return 0

    try:
        err = await QCOW2_IO._call(child, compressed)
    finally:
        mark_dirty(child, offset, len(data))
    if err:
        raise BlockIOError(err)


def _child_edge(node: Node, name: str) -> Any:
    for edge in node.children:
        if edge.name == name and edge.child is not None:
            return edge
    raise JobFailed(errno.ENOMEDIUM)


def _init_from_bitmap(to_copy: bytearray, cluster: int, bitmap: DirtyBitmap, length: int) -> None:
    """backup_init_bcs_bitmap for sync=bitmap: only the bitmap's dirty clusters."""
    for c in range(len(to_copy)):
        to_copy[c] = 0
    for lo, hi in bitmap.dirty_ranges(0, length):
        first = lo // cluster
        end = min(len(to_copy), -(-hi // cluster))
        for c in range(first, end):
            to_copy[c] = 1
