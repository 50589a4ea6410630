"""The data path of ``mirror_top`` and the mirror job's dirty map (QEMU 7.2).

``mirror_top`` (``MirrorTopIO``) passes every request to its ``backing``
child.  While its job runs, each write, write-zeroes or discard that reached
the source also tells the job about it (QEMU's ``bdrv_mirror_top_do_write``):

* ``copy-mode=background`` (the default): the range is marked dirty in the
  job's ``DirtyMap`` (even when the write failed, as QEMU does), and the
  job's copy loop copies it again later;
* ``copy-mode=write-blocking``: once the source write succeeded, the same
  request goes to the target as well, under the job's copy lock, so a
  background copy of an overlapping range cannot land after it.

Once the job stops (``MirrorTopState.stop``) or has failed, writes go to the
source only.

``DirtyMap`` is one byte per ``granularity`` chunk (QEMU's HBitmap at the
job's granularity); ``on_dirty`` (set by the job) wakes an idle copy loop
when something became dirty (QEMU's ready mirror polls every 100 ms
instead; waking it keeps a virtual clock from spinning).

What does not live here: the driver's permissions
(``qmpgraph.drivers.job_filters``), the job and its copy loop
(``qmpgraph.jobs.mirror``).
"""

from __future__ import annotations

import errno
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io.hooks import (
    IOHook,
    child_block_status,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    register_hook,
)
from qmpgraph.io.request import BlockIOError


class DirtyMap:
    """Chunks still to be copied: the job's ``DirtyBitmap`` (one bit per
    ``granularity`` bytes), which query-named-block-nodes lists on the source.

    Every change bumps the bitmaps' generation (cached query replies show the
    count).  The chunk count is fixed: the source cannot be resized meanwhile.
    """

    def __init__(self, length: int, granularity: int, bitmap: DirtyBitmap | None = None) -> None:
        self.length = length
        self.granularity = granularity
        self.bitmap = bitmap if bitmap is not None else DirtyBitmap(None, length, granularity)
        self.chunks = math.ceil(length / granularity) if length else 0
        self.on_dirty: Callable[[], None] | None = None

    def mark(self, offset: int, length: int) -> None:
        """Mark every chunk the byte range touches dirty; tells ``on_dirty``."""
        if length <= 0:
            return
        self.bitmap.set_range(offset, length)
        bitmap_registry._bump()  # cached query replies show the count
        if self.on_dirty is not None:
            self.on_dirty()

    def clear_chunks(self, first: int, end: int) -> None:
        """Clear chunks ``first``..``end`` (exclusive)."""
        end = min(end, self.chunks)
        if first >= end:
            return
        bits = self.bitmap.bits
        last = end - 1
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            bits[fb] &= ~((0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))) & 0xFF
        else:
            bits[fb] &= ~(0xFF << (first & 7)) & 0xFF
            bits[fb + 1 : lb] = bytes(lb - fb - 1)
            bits[lb] &= ~(0xFF >> (7 - (last & 7))) & 0xFF
        bitmap_registry._bump()  # cached query replies show the count

    def is_dirty(self, offset: int) -> bool:
        """Whether the chunk holding byte ``offset`` is dirty."""
        return self.bitmap.get(offset)

    def dirty_bytes(self) -> int:
        """Bytes covered by dirty chunks (the last chunk counts in full)."""
        return self.bitmap.count()

    def dirty_chunk_count(self) -> int:
        """Number of dirty chunks."""
        return self.bitmap.count() // self.granularity

    def next_run(self, start: int, max_chunks: int) -> tuple[int, int] | None:
        """The first run of dirty chunks at or after chunk ``start`` (wrapping
        round once), at most ``max_chunks`` long, as (first, end); None if clean."""
        for lo, hi in ((start, self.chunks), (0, min(start, self.chunks))):
            for first, end in self.bitmap.granule_runs(lo, hi):
                return first, min(end, first + max_chunks)
        return None


@dataclass(slots=True)
class MirrorTopState:
    """What a ``mirror_top`` node knows of its job (QEMU's MirrorBDSOpaque)."""

    # Once set, the filter takes nothing on its child (the job is stopping).
    stop: bool = False
    # The job's dirty map; None before the job set it up and after it ended.
    dirty: DirtyMap | None = None
    # write-blocking mode: where guest writes go besides the source.
    active_target: Edge | None = None
    # Set when the job failed or was cancelled: no more copying to the target.
    detached: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Write-like requests under way through the filter, and who waits for none
    # (the job's last check before the pivot: QEMU drains the source there).
    inflight: int = 0
    idle: trio.Event | None = None
    # write-blocking mode: told the errno of a failed copy to the target
    # (the guest's write itself succeeds, as in QEMU's do_sync_target_write).
    on_target_error: Callable[[int], None] | None = None
    # write-blocking mode: the job's progress, told of bytes a guest write
    # copies to the target (job_progress_increase_remaining, then
    # job_progress_update once the copy succeeded).
    add_remaining: Callable[[int], None] | None = None
    add_done: Callable[[int], None] | None = None

    def begin(self) -> None:
        """A write-like request enters the filter."""
        self.inflight += 1

    def end(self) -> None:
        """A write-like request left the filter."""
        self.inflight -= 1
        if not self.inflight and self.idle is not None:
            self.idle.set()
            self.idle = None

    async def drained(self) -> None:
        """Wait until no write-like request is under way."""
        while self.inflight:
            if self.idle is None:
                self.idle = trio.Event()
            await self.idle.wait()


def _backing(node: Node) -> Edge:
    edge = node.backing
    if edge is None or edge.child is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


def _state(node: Node) -> MirrorTopState | None:
    state = node.state
    return state if isinstance(state, MirrorTopState) else None


class MirrorTopIO(IOHook):
    """mirror_top: requests go to ``backing``; writes are reported to the job."""

    handles_fua = True

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        return await child_read(_backing(node), offset, length)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        return await child_block_status(_backing(node), offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await self._request(
            node,
            offset,
            len(data),
            lambda edge, at, n: child_write(edge, at, data[at - offset : at - offset + n], flags),
        )

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        # The copy to the target goes through the job's BlockBackend, which
        # keeps MAY_UNMAP (blk_co_pwrite_zeroes).
        backing = _backing(node)
        await self._request(
            node,
            offset,
            length,
            lambda edge, at, n: child_write_zeroes(edge, at, n, flags, backend=edge is not backing),
        )

    async def discard(self, node: Node, offset: int, length: int) -> None:
        await self._request(node, offset, length, child_discard)

    async def _request(
        self,
        node: Node,
        offset: int,
        length: int,
        send: Callable[[Edge, int, int], Awaitable[None]],
    ) -> None:
        """bdrv_mirror_top_do_write: the source first; then the range is dirty,
        or (write-blocking) the same request goes to the target under the
        job's copy lock.  The job's final drain waits for it to end."""
        st = _state(node)
        if st is None:
            await send(_backing(node), offset, length)
            return
        active = self._active(st)
        st.begin()
        try:
            try:
                await send(_backing(node), offset, length)
            finally:
                self._mark(st, active, offset, length)
            if active is not None:
                async with st.lock:
                    await self._sync_target_write(st, active, offset, length, send)
        finally:
            st.end()

    @staticmethod
    async def _sync_target_write(
        st: MirrorTopState,
        active: Edge,
        offset: int,
        length: int,
        send: Callable[[Edge, int, int], Awaitable[None]],
    ) -> None:
        """do_sync_target_write: an unaligned head or tail inside a dirty
        chunk is left to the background copy (the chunk stays dirty); the
        whole chunks the rest covers become clean, and the job's progress
        grows by what goes to the target (remaining before, done after)."""
        dirty = st.dirty
        assert dirty is not None
        gran = dirty.granularity
        if offset % gran and dirty.is_dirty(offset):
            skip = -offset % gran
            if length <= skip:
                return
            offset += skip
            length -= skip
        end = offset + length
        if end % gran and dirty.is_dirty(end - 1):
            tail = end % gran
            if length <= tail:
                return
            length -= tail
            end -= tail
        dirty.clear_chunks(-(-offset // gran), end // gran)
        if st.add_remaining is not None:
            st.add_remaining(length)
        try:
            await send(active, offset, length)
        except (BlockIOError, OSError) as exc:
            # The range is to be copied again; the job's on-target-error
            # decides about the job.
            dirty.mark(offset, length)
            if st.on_target_error is not None:
                st.on_target_error(exc.errno or errno.EIO)
        else:
            if st.add_done is not None:
                st.add_done(length)

    @staticmethod
    def _active(st: MirrorTopState | None) -> Edge | None:
        """The target edge a write-blocking job copies guest writes to, if any."""
        if st is None or st.stop or st.detached or st.dirty is None:
            return None
        return st.active_target

    @staticmethod
    def _mark(st: MirrorTopState, active: Edge | None, offset: int, length: int) -> None:
        if active is None and st.dirty is not None and not st.stop:
            st.dirty.mark(offset, length)


MIRROR_TOP_IO = MirrorTopIO()
register_hook("mirror_top", MIRROR_TOP_IO)
