"""The data path of ``copy-before-write`` and ``snapshot-access`` (QEMU 7.2).

copy-before-write (``CbwIO``): reads, flushes and block status go to
``file``.  Before a write, write-zeroes or discard reaches ``file``, every
cluster of the range not copied yet is copied from ``file`` to ``target``
and marked done (cluster size: the larger of 64 KiB and the target's
cluster size).  Requests with the write-unchanged flag skip the copy.  A
failed copy (or one slower than ``cbw-timeout``: ETIMEDOUT) fails the guest
request with ``on-cbw-error=break-guest-write``; with ``break-snapshot`` the
error is recorded, the write goes through and every later snapshot call
fails with EACCES.

The snapshot API (QEMU's ``preadv_snapshot``, ``snapshot_block_status``,
``pdiscard_snapshot``) is ``read_snapshot``, ``block_status_snapshot`` and
``discard_snapshot`` of ``CbwIO``.  One ``trio.Lock`` per cbw node orders
copies against snapshot reads of not-yet-copied areas from ``file``: a guest
write to such an area waits for the read (QEMU's frozen read requests), so
the snapshot never sees new data.  Snapshot reads of copied areas come from
``target``.

snapshot-access (``SnapshotAccessIO``) maps reads, block status and discard
onto its ``file`` child's snapshot API (discard only with ``discard=unmap``,
as the generic path already checks) and refuses writes with ENOTSUP; with
qmpgraph's ``__org.qmpgraph_snapshot`` option it reads a qcow2 internal
snapshot through the qcow2 node's image instead (``qcow2_hook``).

Every cluster starts as "to be copied" and readable, or, with the user
``bitmap`` option, only the clusters that bitmap marked at open.

What does not live here: the drivers' open and permission rules
(``qmpgraph.drivers.copy_before_write``, ``snapshot_access``).
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from qmpgraph.drivers.copy_before_write import initial_bitmap
from qmpgraph.drivers.snapshot_access import exported_snapshot
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io import depth  # a module: depth imports hooks, which import this one
from qmpgraph.io.hooks import (
    IOHook,
    child_block_status,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    register_hook,
)
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import ALLOCATED, OFFSET_VALID, ZERO, BlockIOError

# BDRV_REQ_WRITE_UNCHANGED: the write does not change guest-visible data.
REQ_WRITE_UNCHANGED = 0x40

_MIN_CLUSTER = 64 << 10
_COPY_CHUNK = 1 << 20


def _edge(node: Node, name: str) -> Edge:
    for edge in node.children:
        if edge.name == name and edge.child is not None:
            return edge
    raise BlockIOError(errno.ENOMEDIUM)


def _size(node: Node) -> int:
    return node.driver.size(node) if node.driver is not None else 0


def _target_cluster(target: Node | None) -> int:
    """The target's cluster size (qcow2's header), 0 when it has none."""
    state = target.state if target is not None else None
    for holder in (state, getattr(state, "header", None)):
        size = getattr(holder, "cluster_size", None)
        if isinstance(size, int):
            return size
    return 0


@dataclass(slots=True)
class _CbwState:
    """One cbw node's bitmaps, one byte per cluster, and its snapshot error."""

    cluster: int
    to_copy: bytearray  # 1: still to be copied before a guest write
    done: bytearray  # 1: copied to the target
    access: bytearray  # 1: snapshot readers may read it
    # Clusters guest writes went through (QEMU's done_bitmap: what queries count).
    written: set[int] = field(default_factory=set)
    lock: trio.Lock = field(default_factory=trio.Lock)
    error: int | None = None  # the first copy error under break-snapshot

    def clusters(self, offset: int, length: int) -> range:
        """Cluster indices the byte range touches (rounded outwards)."""
        return range(offset // self.cluster, math.ceil((offset + length) / self.cluster))


class CbwIO(IOHook):
    """copy-before-write: copies old data to ``target`` before guest writes."""

    handles_fua = True

    def __init__(self) -> None:
        self._states: dict[int, _CbwState] = {}
        # Requests under way through each node, and who waits for none: a
        # job drops its filter only once they ended (QEMU drains the node).
        self._inflight: dict[int, int] = {}
        self._idle: dict[int, trio.Event] = {}

    @contextlib.contextmanager
    def _request(self, node: Node) -> Iterator[None]:
        """Count one request under way through ``node``."""
        self._inflight[node.id] = self._inflight.get(node.id, 0) + 1
        try:
            yield
        finally:
            left = self._inflight.pop(node.id) - 1
            if left:
                self._inflight[node.id] = left
            else:
                idle = self._idle.pop(node.id, None)
                if idle is not None:
                    idle.set()

    def inflight(self, node: Node) -> int:
        """How many requests are under way through ``node``."""
        return self._inflight.get(node.id, 0)

    async def drained(self, node: Node) -> None:
        """Wait until no request is under way through ``node`` (bdrv_drain)."""
        while self._inflight.get(node.id):
            idle = self._idle.setdefault(node.id, trio.Event())
            await idle.wait()

    def state(self, node: Node) -> _CbwState:
        """The node's bitmaps, made on its first request."""
        st = self._states.get(node.id)
        if st is None:
            target = _edge(node, "target").child
            cluster = max(_MIN_CLUSTER, _target_cluster(target))
            n = math.ceil(_size(node) / cluster)
            to_copy = bytearray(b"\1" * n)
            user = initial_bitmap(node)
            if user is not None:  # only what the user bitmap marks (merged per cluster)
                to_copy = bytearray(n)
                for lo, hi in user.dirty_ranges():
                    to_copy[lo // cluster : math.ceil(hi / cluster)] = b"\1" * (
                        math.ceil(hi / cluster) - lo // cluster
                    )
            st = _CbwState(cluster, to_copy, bytearray(n), bytearray(to_copy))
            self._states[node.id] = st
        return st

    def peek(self, node: Node) -> _CbwState | None:
        """The node's bitmaps if a request made them already (queries)."""
        return self._states.get(node.id)

    def fingerprint(self) -> tuple[tuple[int, int, int, int], ...]:
        """What the bitmaps' counts depend on (they move without the graph), per node."""
        return tuple(
            (nid, st.to_copy.count(1), st.access.count(1), len(st.written))
            for nid, st in sorted(self._states.items())
        )

    def drop(self, node: Node) -> None:
        """Forget ``node``'s bitmaps (a new snapshot starts on the next request)."""
        self._states.pop(node.id, None)

    async def _copy(self, node: Node, st: _CbwState, first: int, end: int) -> None:
        """Copy clusters ``first``..``end`` (exclusive) from ``file`` to ``target``."""
        source, target = _edge(node, "file"), _edge(node, "target")
        assert source.child is not None
        size = _size(node)
        pos, stop = first * st.cluster, min(end * st.cluster, size)
        while pos < stop:
            # block-copy asks the source's status: zeros are written as zeroes
            # (a zero cluster in a qcow2 target), a run shorter than a cluster
            # is copied as one cluster of data.
            flags, pnum, _ = await depth.status_above(source.child, pos, stop - pos)
            if pnum < st.cluster:
                flags, pnum = 0, st.cluster
            elif pos + pnum < size:
                pnum -= pnum % st.cluster
            n = min(_COPY_CHUNK, pnum, stop - pos)
            if flags & ZERO:
                await child_write_zeroes(target, pos, n)
            else:
                await child_write(target, pos, await child_read(source, pos, n))
            pos += n

    async def _cbw(self, node: Node, offset: int, length: int, flags: int) -> None:
        """Copy the range's not-yet-copied clusters; QEMU's cbw_do_copy_before_write."""
        st = self.state(node)
        if flags & REQ_WRITE_UNCHANGED or st.error is not None or not length:
            return
        timeout = int(node.options.get("cbw-timeout", 0) or 0)
        async with st.lock:
            if st.error is not None:
                return
            todo = [c for c in st.clusters(offset, length) if c < len(st.to_copy) and st.to_copy[c]]
            try:
                with trio.fail_after(timeout) if timeout else contextlib.nullcontext():
                    for first, end in _runs(todo):
                        await self._copy(node, st, first, end)
                        for c in range(first, end):
                            st.to_copy[c], st.done[c] = 0, 1
                st.written.update(st.clusters(offset, length))
            except (BlockIOError, trio.TooSlowError) as err:
                code = err.errno if isinstance(err, BlockIOError) else errno.ETIMEDOUT
                if node.options.get("on-cbw-error") == "break-snapshot":
                    st.error = code
                    return
                raise BlockIOError(code) from err

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        with self._request(node):
            return await child_read(_edge(node, "file"), offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        with self._request(node):
            await self._cbw(node, offset, len(data), flags)
            await child_write(_edge(node, "file"), offset, data, flags & ~REQ_WRITE_UNCHANGED)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        with self._request(node):
            await self._cbw(node, offset, length, flags)
            await child_write_zeroes(
                _edge(node, "file"), offset, length, flags & ~REQ_WRITE_UNCHANGED
            )

    async def discard(self, node: Node, offset: int, length: int) -> None:
        with self._request(node):
            await self._cbw(node, offset, length, 0)
            await child_discard(_edge(node, "file"), offset, length)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        with self._request(node):
            return await child_block_status(_edge(node, "file"), offset, length)

    # -- the snapshot API --------------------------------------------------

    def _check_access(self, st: _CbwState, offset: int, length: int) -> None:
        if st.error is not None:
            raise BlockIOError(errno.EACCES)
        for c in st.clusters(offset, length):
            if c >= len(st.access) or not st.access[c]:
                raise BlockIOError(errno.EACCES)

    @staticmethod
    def _piece(st: _CbwState, offset: int, end: int) -> tuple[int, bool]:
        """Where the snapshot's ``offset``..``end`` is read from: (piece end, from target).

        QEMU 7.2's cbw_snapshot_read_lock asks the done bitmap with
        hbitmap_status, which (before QEMU 8.0's fix) says "done" only when
        the whole remaining range is: a done run followed by clusters not
        copied is read from ``file`` (the guest's new data) up to the run's
        end.  qsd's snapshot reads and block status do that; so do these.
        """

        def done(c: int) -> bool:
            return bool(st.done[c]) if c < len(st.done) else False

        first = done(offset // st.cluster)
        pos = (offset // st.cluster + 1) * st.cluster
        while pos < end and done(pos // st.cluster) == first:
            pos += st.cluster
        stop = min(pos, end)
        return stop, first and stop == end

    async def read_snapshot(self, node: Node, offset: int, length: int) -> bytes:
        """The snapshot's bytes: from ``target`` where copied, else from ``file``."""
        st = self.state(node)
        self._check_access(st, offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        async with st.lock:  # guest writes to uncopied areas wait for this read
            while pos < end:
                stop, copied = self._piece(st, pos, end)
                edge = _edge(node, "target" if copied else "file")
                out += await child_read(edge, pos, stop - pos)
                pos = stop
            if st.error is not None:  # broken while this read waited
                raise BlockIOError(errno.EACCES)
        return bytes(out)

    async def block_status_snapshot(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        """Status of the snapshot's first extent: of the node ``_piece`` reads it from.

        Where a done run is followed by clusters not copied, that is
        ``file``: its current status, not the copied data's (checked live
        against qsd 7.2, tests/nbd/test_nbdy_fleece_map.py).
        """
        st = self.state(node)
        self._check_access(st, offset, length)
        async with st.lock:
            stop, copied = self._piece(st, offset, offset + length)
            edge = _edge(node, "target" if copied else "file")
            assert edge.child is not None
            # QEMU asks that node alone (bdrv_block_status): not its backing chain.
            flags, pnum = await depth.own_status(edge.child, offset, stop - offset)
        if copied:
            flags |= ALLOCATED
        # An offset in another node's file means nothing to the snapshot's readers.
        return flags & ~OFFSET_VALID, pnum

    async def discard_snapshot(self, node: Node, offset: int, length: int) -> None:
        """Drop whole clusters from the snapshot: unreadable, no longer copied."""
        st = self.state(node)
        first = math.ceil(offset / st.cluster)
        end = (offset + length) // st.cluster
        if end <= first:
            return
        async with st.lock:
            for c in range(first, min(end, len(st.access))):
                st.access[c] = st.to_copy[c] = 0
        start = first * st.cluster
        stop = min(end * st.cluster, _size(node))
        await child_discard(_edge(node, "target"), start, stop - start)


def _runs(clusters: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted cluster indices as (first, end) pairs."""
    runs: list[tuple[int, int]] = []
    for c in clusters:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


class SnapshotAccessIO(IOHook):
    """snapshot-access: the ``file`` child's snapshot, read-only.

    With qmpgraph's ``__org.qmpgraph_snapshot`` option the snapshot is an
    internal snapshot of the qcow2 ``file`` node, read through that node's
    image (``Qcow2IO.read_snapshot``); discard is then not supported.
    """

    @staticmethod
    def _cbw(node: Node) -> Node:
        child = _edge(node, "file").child
        assert child is not None
        if child.format_name != "copy-before-write":
            raise BlockIOError(errno.ENOTSUP)
        return child

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        internal = exported_snapshot(node)
        if internal is not None:
            child = _edge(node, "file").child
            assert child is not None
            return await QCOW2_IO.read_snapshot(child, internal.id, offset, length)
        return await CBW_IO.read_snapshot(self._cbw(node), offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        raise BlockIOError(errno.ENOTSUP)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        if exported_snapshot(node) is not None:
            raise BlockIOError(errno.ENOTSUP)
        await CBW_IO.discard_snapshot(self._cbw(node), offset, length)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        internal = exported_snapshot(node)
        if internal is not None:
            child = _edge(node, "file").child
            assert child is not None
            return await QCOW2_IO.block_status_snapshot(child, internal.id, offset, length)
        return await CBW_IO.block_status_snapshot(self._cbw(node), offset, length)


CBW_IO = CbwIO()
register_hook("copy-before-write", CBW_IO)
register_hook("snapshot-access", SnapshotAccessIO())
