"""The data path of the ``copy-on-read`` filter (QEMU 7.2's block/copy-on-read.c
with block/io.c's bdrv_co_do_copy_on_readv).

Writes, write-zeroes, discards and block status pass to ``file`` unchanged.
A read asks ``file``'s node (the node below) whether it allocates the range
itself; where it does not, the read widens to that node's clusters and every
piece it does not allocate is read through its backing chain and written
back into it (as write-zeroes where it read as zeros and the driver can zero
them), before the caller's bytes are cut out of it.  The write back is the
driver's own write: no permission check, no dirty bitmap of that node marked
(those of the nodes below see the driver's writes as usual).  Each copy
fires ``cor_write`` on the node below (blkdebug acts on it).

With ``bottom``, only ranges that some layer from ``file``'s backing down to
``bottom`` allocates are copied; the rest is read without copying (block-stream
uses this to copy only what lies above its base).  ``populate`` is the same
read with BDRV_REQ_PREFETCH (QEMU's stream_populate): the copies only.

Copies are serialising as QEMU makes them: a copy waits for overlapping writes
through the filter and such writes wait for the copy, so a copy never puts old
data over a newer guest write.

What does not live here: the filter's open and permissions
(``qmpgraph.drivers.copy_on_read``), NBD_CMD_CACHE (``prefetch``, whose
cluster and allocation helpers are repeated here: importing it from here
would close an import cycle).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import trio

from qmpgraph.drivers.base import node_size
from qmpgraph.graph.graph import filter_child, filter_or_cow_child, skip_filters
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io import depth  # a module: depth's imports lead back to hooks, which import this one
from qmpgraph.io.hooks import (
    PassThroughIO,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    hook_of,
    register_hook,
)
from qmpgraph.io.request import ALLOCATED, BlockIOError

# BDRV_REQ_WRITE_UNCHANGED (cbw_hook's constant; that module imports this one).
_WRITE_UNCHANGED = 0x40
# QEMU's MAX_BOUNCE_BUFFER: one copy step copies at most this much.
_MAX_BOUNCE = 32768 << 9
# Drivers without a write-zeroes method of their own: zeros are written as data.
_NO_WRITE_ZEROES = frozenset({"null-co", "null-aio", "luks", "snapshot-access"})


def _cor_cluster(node: Node | None) -> int:
    """bdrv_get_info's cluster size (qcow2's, through raw and filters), 1 without."""
    while node is not None:
        if node.format_name == "qcow2":
            return depth.cluster_size(node)
        edge = node.file if node.format_name == "raw" else filter_child(node)
        node = edge.child if edge is not None else None
    return 1


async def _allocated(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated: (allocated, pnum); an error counts as not allocated."""
    try:
        flags, pnum = await depth.own_status(node, offset, length)
    except BlockIOError:
        return False, length
    return bool(flags & ALLOCATED), pnum


@dataclass(slots=True)
class _Tracked:
    """Requests under way through one filter: (start, end, serialising, done)."""

    reqs: list[tuple[int, int, bool, trio.Event]] = field(default_factory=list)

    async def begin(
        self, start: int, end: int, serialising: bool
    ) -> tuple[int, int, bool, trio.Event]:
        """Wait for overlapping requests that must go first, then join the list."""
        while True:
            blocker = next(
                (r for r in self.reqs if r[0] < end and start < r[1] and (serialising or r[2])),
                None,
            )
            if blocker is None:
                break
            await blocker[3].wait()
        req = (start, end, serialising, trio.Event())
        self.reqs.append(req)
        return req

    def end(self, req: tuple[int, int, bool, trio.Event]) -> None:
        """The request is over: whoever waited for it goes on."""
        self.reqs.remove(req)
        req[3].set()


def _file(node: Node) -> Edge:
    edge = node.file
    if edge is None or edge.child is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


async def _allocated_above(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated_above(backing_chain_next(node), bottom, include_base):
    does any layer from the node's backing down to ``bottom`` hold the range."""
    bottom = str(node.options.get("bottom"))
    below = _file(node).child
    assert below is not None
    edge = filter_or_cow_child(skip_filters(below) or below)
    layer = skip_filters(edge.child) if edge is not None else None
    n = length
    while layer is not None:
        try:
            flags, pnum = await depth.own_status(layer, offset, n)
        except BlockIOError:
            return True, n  # an error counts as allocated (then copied anyway)
        if flags & ALLOCATED:
            return True, pnum
        if pnum:
            n = min(n, pnum)
        if layer.node_name == bottom:
            break
        edge = filter_or_cow_child(layer)
        layer = edge.child if edge is not None else None
    return False, n


class CopyOnReadIO(PassThroughIO):
    """copy-on-read: reads write what they read from the backing chain back below."""

    def __init__(self) -> None:
        self._tracked: dict[int, _Tracked] = {}

    def _track(self, node: Node) -> _Tracked:
        return self._tracked.setdefault(node.id, _Tracked())

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """cor_co_preadv_part."""
        return await self._read(node, offset, length, prefetch=False)

    async def populate(self, node: Node, offset: int, length: int) -> None:
        """A read with BDRV_REQ_PREFETCH through the filter (block-stream's
        stream_populate): the copies happen, no data is read for nothing."""
        await self._read(node, offset, length, prefetch=True)

    async def _read(self, node: Node, offset: int, length: int, *, prefetch: bool) -> bytes:
        if node.options.get("bottom") is None:
            return await self._cor_read(node, offset, length, prefetch)
        below = _file(node).child
        assert below is not None
        out: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            allocated, n = await _allocated(below, pos, end - pos)
            copy = False
            if not allocated:
                copy, n = await _allocated_above(node, pos, n)
                if not n:
                    break  # the end of a backing file: the rest stays zeros
            n = min(n, end - pos)
            if copy:
                out.append(await self._cor_read(node, pos, n, prefetch))
            elif not prefetch:  # a prefetch that copies nothing has nothing to do
                out.append(await child_read(_file(node), pos, n))
            pos += n
        if prefetch:
            return b""
        data = b"".join(out)
        return data + bytes(length - len(data))

    async def _cor_read(self, node: Node, offset: int, length: int, prefetch: bool) -> bytes:
        """A read of ``file`` with BDRV_REQ_COPY_ON_READ (bdrv_aligned_preadv)."""
        edge = _file(node)
        below = edge.child
        assert below is not None
        allocated, pnum = await _allocated(below, offset, length)
        if allocated and pnum >= length:
            return b"" if prefetch else await child_read(edge, offset, length)
        cluster = _cor_cluster(below)
        start = offset - offset % cluster
        stop = -(-(offset + length) // cluster) * cluster
        track = self._track(node)
        req = await track.begin(start, stop, True)
        try:
            return await self._copy_on_readv(below, offset, length, cluster, prefetch)
        finally:
            track.end(req)

    async def _copy_on_readv(
        self, below: Node, offset: int, length: int, cluster: int, prefetch: bool
    ) -> bytes:
        """bdrv_co_do_copy_on_readv: whole clusters; unallocated ones are read
        through the chain and written back into ``below`` (allocated ones are
        read only for the caller: not at all for a prefetch)."""
        hook = hook_of(below)
        pos = offset - offset % cluster
        end = min(
            -(-(offset + length) // cluster) * cluster,
            -(-node_size(below) // 512) * 512,
        )
        out = bytearray()
        while pos < end:
            allocated, pnum = await _allocated(below, pos, end - pos)
            if not pnum:
                break  # the image ends inside the last cluster
            pnum = min(pnum, end - pos)
            if allocated:
                if not prefetch:
                    out += await hook.read(below, pos, pnum)
            else:
                pnum = min(pnum, _MAX_BOUNCE)
                data = await hook.read(below, pos, pnum)
                hook.debug_event(below, "cor_write")
                if data.count(0) == len(data) and below.format_name not in _NO_WRITE_ZEROES:
                    await hook.write_zeroes(below, pos, pnum, _WRITE_UNCHANGED)
                else:
                    await hook.write(below, pos, data, _WRITE_UNCHANGED)
                if not prefetch:
                    out += data
            pos += pnum
        if prefetch:
            return b""
        skip = offset - (offset - offset % cluster)
        piece = bytes(out[skip : skip + length])
        return piece + bytes(length - len(piece))

    async def _serialised(
        self, node: Node, offset: int, length: int
    ) -> tuple[_Tracked, tuple[int, int, bool, trio.Event]]:
        track = self._track(node)
        return track, await track.begin(offset, offset + length, False)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        track, req = await self._serialised(node, offset, len(data))
        try:
            await child_write(_file(node), offset, data, flags)
        finally:
            track.end(req)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        track, req = await self._serialised(node, offset, length)
        try:
            await child_write_zeroes(_file(node), offset, length, flags)
        finally:
            track.end(req)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        track, req = await self._serialised(node, offset, length)
        try:
            await child_discard(_file(node), offset, length)
        finally:
            track.end(req)


COR_IO = CopyOnReadIO()
register_hook("copy-on-read", COR_IO)
