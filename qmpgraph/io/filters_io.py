"""Data paths of the small filters that change requests: compress,
preallocate, blkverify, blklogwrites.

compress (block/filter-compress.c): writes reach the ``file`` child (a
qcow2 node) as compressed writes (``qmpgraph.drivers.qcow2_compress``);
reads, write-zeroes, discards and block status pass through.  The node's
request alignment is the child's cluster size, so, as QEMU's block layer
does, an unaligned write first reads the head and tail clusters and then
writes whole clusters.  qcow2 refuses to compress over an allocated cluster
(EIO) and writes a cluster that does not shrink as a normal one.

preallocate (block/preallocate.c): while the node's parents hold WRITE and
RESIZE on it (so it holds both, unshared, on ``file``), a write or
write-zeroes ending past the end of the data (``data_end``) first extends
``file`` with zeros up to the end plus ``prealloc-size``, aligned to
``prealloc-align`` (a write-zeroes that starts in the preallocated area
is then already done); the node's length is ``data_end``.  Flushes do not
truncate; ``close`` and a permission update taking WRITE|RESIZE away
truncate ``file`` back to ``data_end`` (in the driver module).  The state
lives in the node's ``PreallocateState`` (``qmpgraph.drivers.preallocate``).

blkverify (block/blkverify.c): reads and writes go to ``test``, then to
``raw``.  Different outcomes (``return value mismatch -5 != 0``) or, for a
read, different data (``contents mismatch at offset N``) print QEMU's
message and end the process with status 1, as QEMU 7.2 does.  A
write-zeroes aborts the process on an assertion in QEMU 7.2; so it does
here.  Discards do nothing, flushes reach ``test`` only.
QEMU runs both requests at once; here ``test`` goes first.

blklogwrites (block/blklogwrites.c): requests are aligned to the log
sector size (unaligned writes read the rest first).  Each write,
write-zeroes, discard and flush (a flush only after a write since the last
one) goes to ``file`` first, then appends a dm-log-writes entry to ``log``
(one sector: sector, sector count, flags DISCARD/FLUSH; written data
follows it, zero writes get zeroed sectors); the superblock (magic,
version, entry count, sector size) is rewritten and ``log`` flushed on a
flush and every ``log-super-update-interval`` entries.

What does not live here: the drivers' open and permission rules.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from qmpgraph.bitmaps.registry import mark_dirty
from qmpgraph.drivers.base import node_alignment
from qmpgraph.drivers.blklogwrites import BlklogwritesState
from qmpgraph.drivers.preallocate import PreallocateState, child_length
from qmpgraph.drivers.qcow2_compress import CompressedWriteError, write_compressed
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import Perm
from qmpgraph.io.hooks import (
    IOHook,
    PassThroughIO,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    flush_node,
    register_hook,
)
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import ALLOCATED, DATA, REQ_NO_FALLBACK, BlockIOError, eperm

T = TypeVar("T")


def _file(node: Node) -> Edge:
    edge = node.file
    if edge is None or edge.child is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


def _cluster_size(node: Node | None) -> int:
    """A qcow2 node's cluster size (from its header state), 0 when unknown."""
    state = node.state if node is not None else None
    for holder in (state, getattr(state, "header", None)):
        size = getattr(holder, "cluster_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return 0


class CompressIO(PassThroughIO):
    """compress: writes become compressed cluster writes on the qcow2 child."""

    handles_fua = False

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        edge = _file(node)
        child = edge.child
        assert child is not None
        if not edge.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) or child.read_only:
            raise eperm()
        if child.format_name != "qcow2":
            raise BlockIOError(errno.ENOTSUP)
        align = _cluster_size(child) or 1
        start = offset - offset % align
        end = -(-(offset + len(data)) // align) * align
        size = child.driver.size(child) if child.driver is not None else 0
        if start != offset or end != offset + len(data):
            # bdrv_co_pwritev's padding: read the head and tail clusters first.
            head = await child_read(edge, start, offset - start) if start != offset else b""
            tail_end = min(end, size)
            tail = b""
            if tail_end > offset + len(data):
                tail = await child_read(edge, offset + len(data), tail_end - offset - len(data))
            data = head + data + tail
            offset = start

        def compressed(img: Any) -> int:
            try:
                write_compressed(img, offset, data)
            except CompressedWriteError as err:
                return err.errno
            return 0

        # The qcow2 hook runs calls on its image one at a time in a worker.
        try:
            err = await QCOW2_IO._call(child, compressed)
        finally:
            # The tracked writes of both nodes cover the padded clusters (the
            # generic path marks this node for the unpadded request only).
            mark_dirty(node, offset, len(data))
            mark_dirty(child, offset, len(data))
        if err:
            raise BlockIOError(err)


def _can_write_resize(edge: Edge) -> bool:
    both = Perm.WRITE | Perm.RESIZE
    return edge.perm & both == both


class PreallocateIO(PassThroughIO):
    """preallocate: grows ``file`` ahead of writes past the data's end."""

    @staticmethod
    async def _handle_write(node: Node, offset: int, length: int, merge_zero: bool) -> bool:
        """handle_write: True when a write-zeroes is already done by the preallocation."""
        state = node.state
        edge = _file(node)
        if not isinstance(state, PreallocateState):
            return False
        if not _can_write_resize(edge):
            state.invalidate()
            return False
        child = edge.child
        assert child is not None
        end = offset + length
        if state.data_end < 0:
            state.data_end = child_length(child)
            if state.file_end < 0:
                state.file_end = state.data_end
        if end <= state.data_end:
            return False
        state.data_end = end
        if state.zero_start < 0 or not merge_zero:
            state.zero_start = end
        if state.file_end < 0:
            state.file_end = child_length(child)
        if end <= state.file_end:
            return merge_zero and offset >= state.zero_start
        file_align = node_alignment(child)
        align = max(state.align, file_align)
        start = min(offset, state.file_end) if merge_zero else state.file_end
        start = -(-start // file_align) * file_align
        stop = -(-(max(start, end) + state.size) // align) * align
        merge_zero = merge_zero and start <= offset
        try:
            await child_write_zeroes(edge, start, stop - start, REQ_NO_FALLBACK)
        except BlockIOError:
            state.file_end = -1
            return False
        state.file_end = stop
        return merge_zero

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await self._handle_write(node, offset, len(data), False)
        await super().write(node, offset, data, flags)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        # Only a plain write-zeroes may be merged with the preallocation.
        merge = not flags & ~REQ_NO_FALLBACK
        if await self._handle_write(node, offset, length, merge):
            return
        await super().write_zeroes(node, offset, length, flags)


def _named(node: Node, name: str) -> Edge:
    for edge in node.children:
        if edge.name == name and edge.child is not None:
            return edge
    raise BlockIOError(errno.ENOMEDIUM)


def _blkverify_abort(kind: str, offset: int, length: int, what: str) -> NoReturn:
    """blkverify_err: the message on stderr, then exit(1) as QEMU 7.2."""
    print(f"blkverify: {kind} offset={offset} bytes={length} {what}", file=sys.stderr, flush=True)
    os._exit(1)


class BlkverifyIO(IOHook):
    """blkverify: requests go to ``test`` and ``raw``; any difference ends the process."""

    flushes_children = True

    @staticmethod
    async def _both(
        node: Node, kind: str, offset: int, length: int, run: Callable[[Edge], Awaitable[T]]
    ) -> tuple[T | None, T | None]:
        """blkverify_co_prwv: the test request, then the raw one; their errors must agree."""
        results: list[T | None] = []
        errs: list[int] = []
        for name in ("test", "raw"):
            try:
                results.append(await run(_named(node, name)))
                errs.append(0)
            except BlockIOError as err:
                results.append(None)
                errs.append(err.errno)
        if errs[0] != errs[1]:
            _blkverify_abort(
                kind, offset, length, f"return value mismatch {-errs[0]} != {-errs[1]}"
            )
        if errs[0]:
            raise BlockIOError(errs[0])
        return results[0], results[1]

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        test, raw = await self._both(
            node, "read", offset, length, lambda e: child_read(e, offset, length)
        )
        assert test is not None and raw is not None
        if test != raw:
            at = next(i for i in range(length) if test[i] != raw[i])
            _blkverify_abort("read", offset, length, f"contents mismatch at offset {offset + at}")
        return test

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await self._both(
            node, "write", offset, len(data), lambda e: child_write(e, offset, data, flags)
        )

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        """QEMU 7.2 fails an assertion here (blkverify claims zero flags without
        a write-zeroes of its own): the same message, then abort()."""
        del node, offset, length, flags
        print(
            "qemu-storage-daemon: ../../block/io.c:1908: bdrv_co_do_pwrite_zeroes: "
            "Assertion `!bs->supported_zero_flags' failed.",
            file=sys.stderr,
            flush=True,
        )
        os.abort()

    async def flush(self, node: Node) -> None:
        """Only the test image is flushed (the raw one "is not important")."""
        child = _named(node, "test").child
        assert child is not None
        await flush_node(child)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        return DATA | ALLOCATED, length


# -- blklogwrites -----------------------------------------------------------------

_LOG_MAGIC = 0x6A736677736872
_LOG_FLUSH, _LOG_DISCARD = 1, 4
_SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
_ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len


@dataclass(eq=False, slots=True)
class _LogRuntime:
    source: BlklogwritesState
    cur_log_sector: int
    nr_entries: int
    write_gen: int = 0
    flushed_gen: int = 0


_LOGS: dict[int, _LogRuntime] = {}


def _log_runtime(node: Node) -> _LogRuntime:
    state = node.state
    if not isinstance(state, BlklogwritesState):
        raise BlockIOError(errno.ENOMEDIUM)
    rt = _LOGS.get(node.id)
    if rt is None or rt.source is not state:
        rt = _LOGS[node.id] = _LogRuntime(state, state.cur_log_sector, state.nr_entries)
    return rt


class BlklogwritesIO(PassThroughIO):
    """blklogwrites: each write, write-zeroes, discard and flush is also logged."""

    # QEMU 7.2's blklogwrites takes no FUA: the block layer flushes after the
    # write instead, so the log shows a flush entry, never the FUA flag.
    handles_fua = False

    async def _log(
        self,
        node: Node,
        offset: int,
        length: int,
        payload: bytes | None,
        *,
        flags: int,
        zero: bool,
    ) -> None:
        """blk_log_writes_co_do_log: the entry (and data), then maybe the superblock."""
        rt = _log_runtime(node)
        size = rt.source.sector_size
        bits = size.bit_length() - 1
        log = _named(node, "log")
        entry = _ENTRY.pack(offset >> bits, length >> bits, flags, 0).ljust(size, b"\0")
        record = entry + (payload or b"")
        where = rt.cur_log_sector << bits
        rt.nr_entries += 1
        rt.cur_log_sector += -(-len(record) // size)
        await child_write(log, where, record)
        if zero:
            where = rt.cur_log_sector << bits
            rt.cur_log_sector += -(-length // size)
            await child_write_zeroes(log, where, length)
        if flags & _LOG_FLUSH or rt.nr_entries % rt.source.update_interval == 0:
            sb = _SUPER.pack(_LOG_MAGIC, 1, rt.nr_entries, size).ljust(size, b"\0")
            await child_write(log, 0, sb)
            child = log.child
            assert child is not None
            await flush_node(child)

    async def _logged(
        self,
        node: Node,
        offset: int,
        length: int,
        payload: bytes | None,
        *,
        flags: int,
        zero: bool,
        file_op: Callable[[], Awaitable[None]],
    ) -> None:
        """blk_log_writes_co_log: the file request, then the log; the log's error wins."""
        size = _log_runtime(node).source.sector_size
        if (offset | length) % size:
            raise BlockIOError(errno.EINVAL)
        file_err = 0
        try:
            await file_op()
        except BlockIOError as err:
            file_err = err.errno
        await self._log(node, offset, length, payload, flags=flags, zero=zero)
        if file_err:
            raise BlockIOError(file_err)

    async def _padded(self, node: Node, offset: int, data: bytes) -> tuple[int, bytes]:
        """bdrv_co_pwritev's padding to the log sector size (read-modify-write)."""
        align = _log_runtime(node).source.sector_size
        start = offset - offset % align
        end = -(-(offset + len(data)) // align) * align
        if start == offset and end == offset + len(data):
            return offset, data
        whole = bytearray(await child_read(_file(node), start, end - start))
        whole[offset - start : offset - start + len(data)] = data
        return start, bytes(whole)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        _log_runtime(node).write_gen += 1
        offset, data = await self._padded(node, offset, data)

        async def file_op() -> None:
            await child_write(_file(node), offset, data, flags)

        await self._logged(node, offset, len(data), data, flags=0, zero=False, file_op=file_op)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        _log_runtime(node).write_gen += 1

        async def file_op() -> None:
            await child_write_zeroes(_file(node), offset, length, flags)

        await self._logged(node, offset, length, None, flags=0, zero=True, file_op=file_op)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        _log_runtime(node).write_gen += 1

        async def file_op() -> None:
            await child_discard(_file(node), offset, length)

        await self._logged(
            node, offset, length, None, flags=_LOG_DISCARD, zero=False, file_op=file_op
        )

    async def flush(self, node: Node) -> None:
        """flush_to_disk: only after a write since the last flush (the write generation)."""
        rt = _log_runtime(node)
        if rt.write_gen == rt.flushed_gen:
            return
        gen = rt.write_gen

        async def file_op() -> None:
            child = _file(node).child
            assert child is not None
            await flush_node(child)

        await self._logged(node, 0, 0, None, flags=_LOG_FLUSH, zero=False, file_op=file_op)
        rt.flushed_gen = gen


register_hook("compress", CompressIO())
register_hook("preallocate", PreallocateIO())
register_hook("blkverify", BlkverifyIO())
register_hook("blklogwrites", BlklogwritesIO())
