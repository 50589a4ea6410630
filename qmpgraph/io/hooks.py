"""Per-driver I/O hooks and the generic request path between nodes.

A hook is a stateless singleton keyed by the driver's ``format_name`` in
``IO_HOOKS``; its async methods act on one node (per-node state stays in
``Node.state``) and reach children only through ``child_*`` functions, which
check the edge's permissions as QEMU's ``bdrv_co_*`` do (a write through an
edge without WRITE fails with EPERM, as does any write to a read-only node).

Generic behaviour kept out of the hooks (QEMU's block/io.c): FUA emulated by
a flush after the write, ``detect-zeroes``, discard and unmapping only on
nodes opened with ``discard=unmap``, dirty bitmaps marked when a write,
write-zeroes or discard finished on a node (``qmpgraph.bitmaps``), and flush
recursing into children that hold write permissions.  Reads past a file's end
read zeros.

What does not live here: permission rules, bounds of the device (``backend``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from types import MappingProxyType

import trio

from qmpgraph.bitmaps.registry import mark_dirty
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.null import NullState
from qmpgraph.drivers.raw import RawState
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import OpenFlag, Perm
from qmpgraph.io.request import (
    ALLOCATED,
    DATA,
    OFFSET_VALID,
    REQ_FUA,
    REQ_MAY_UNMAP,
    ZERO,
    BlockIOError,
    eperm,
)
from qmpgraph.io.stats import record_discard, record_write

_ZERO_CHUNK = 1 << 20

# Set by a job's task (``qmpgraph.jobs.core``): what a request does where
# QEMU's coroutine yields, so that a job entered by a command sends what it
# sends before the command's reply exactly as qemu-storage-daemon does.  The
# argument says where: True where the request waits for the disk (file-posix
# hands it to the thread pool), False where it yields for one main-loop turn
# (blkdebug failing a request reschedules its coroutine first).
JOB_YIELD: ContextVar[Callable[[bool], Awaitable[None]] | None] = ContextVar(
    "job_yield", default=None
)


async def disk_wait() -> None:
    """Where a request waits for the disk: the current job's hook, if any."""
    hook = JOB_YIELD.get()
    if hook is not None:
        await hook(True)


def in_job() -> bool:
    """Whether the current task is a job's (a yield point may hold it)."""
    return JOB_YIELD.get() is not None


async def turn_wait() -> None:
    """Where a request yields for one main-loop turn: the current job's hook, if any."""
    hook = JOB_YIELD.get()
    if hook is not None:
        await hook(False)


class IOHook:
    """The data path of one driver; the defaults answer ENOTSUP."""

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (already inside the node)."""
        raise BlockIOError(errno.ENOTSUP)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        """Write ``data``; ``flags`` may hold REQ_FUA if the hook said it handles it."""
        raise BlockIOError(errno.ENOTSUP)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        """Zero a range (REQ_MAY_UNMAP: holes allowed); default writes zeros."""
        pos, end = offset, offset + length
        while pos < end:
            n = min(_ZERO_CHUNK, end - pos)
            await self.write(node, pos, bytes(n), 0)
            pos += n

    async def discard(self, node: Node, offset: int, length: int) -> None:
        """Drop a range (advisory: doing nothing is correct)."""

    async def flush(self, node: Node) -> None:
        """Make this node's own writes stable (children are flushed by the caller)."""

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        """(BDRV_BLOCK_* flags, length they hold for) from ``offset``; default: data."""
        return DATA | ALLOCATED, length

    def debug_event(self, node: Node, event: str) -> None:
        """BLKDBG_EVENT fired on this node (only blkdebug acts on them)."""

    handles_fua = False
    # The driver flushes its children itself (QEMU's bdrv_co_flush): quorum.
    flushes_children = False


_IO_HOOKS: dict[str, IOHook] = {}
IO_HOOKS: Mapping[str, IOHook] = MappingProxyType(_IO_HOOKS)


def register_hook(format_name: str, hook: IOHook) -> None:
    """Make ``hook`` the data path of the driver called ``format_name``."""
    _IO_HOOKS[format_name] = hook


def hook_of(node: Node) -> IOHook:
    """The node's hook (ENOTSUP for drivers without a data path yet)."""
    hook = _IO_HOOKS.get(node.format_name or "")
    if hook is None:
        raise BlockIOError(errno.ENOTSUP, f"no I/O path for driver '{node.format_name}'")
    return hook


# -- the generic path (QEMU's bdrv_co_* on a BdrvChild) -----------------------


def debug_event(edge: Edge | None, event: str) -> None:
    """BLKDBG_EVENT(edge, event): tell the child's driver (blkdebug's rules)."""
    node = edge.child if edge is not None else None
    hook = _IO_HOOKS.get(node.format_name or "") if node is not None else None
    if node is not None and hook is not None:
        hook.debug_event(node, event)


def _child(edge: Edge) -> Node:
    node = edge.child
    if node is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return node


def _check_write(edge: Edge) -> Node:
    node = _child(edge)
    if not edge.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) or node.read_only:
        raise eperm()
    return node


async def child_read(edge: Edge, offset: int, length: int) -> bytes:
    """Read through ``edge``."""
    node = _child(edge)
    if not length:
        return b""
    return await hook_of(node).read(node, offset, length)


async def child_write(edge: Edge, offset: int, data: bytes, flags: int = 0) -> None:
    """Write through ``edge`` (needs WRITE), honouring FUA and detect-zeroes."""
    node = _check_write(edge)
    if not data:
        return
    if node.detect_zeroes != "off" and data.count(0) == len(data):
        zflags = flags & REQ_FUA
        if node.detect_zeroes == "unmap":
            zflags |= REQ_MAY_UNMAP
        await child_write_zeroes(edge, offset, len(data), zflags)
        return
    hook = hook_of(node)
    try:
        await hook.write(node, offset, data, flags if hook.handles_fua else 0)
    finally:  # bdrv_co_write_req_finish marks bitmaps whatever the outcome
        mark_dirty(node, offset, len(data))
        record_write(node, offset, len(data))
    if flags & REQ_FUA and not hook.handles_fua:
        await flush_node(node)


async def child_write_zeroes(
    edge: Edge, offset: int, length: int, flags: int = 0, *, backend: bool = False
) -> None:
    """Zero through ``edge``; unmapping only where the node allows discards.

    ``backend``: a request entering at a BlockBackend (blk_co_pwrite_zeroes)
    keeps REQ_MAY_UNMAP whatever the node's discard option, as QEMU 7.2's
    does (only bdrv_co_pwrite_zeroes, a driver's call on its child, drops it).
    """
    node = _check_write(edge)
    if not length:
        return
    if not backend and not node.open_flags & OpenFlag.UNMAP:
        flags &= ~REQ_MAY_UNMAP
    hook = hook_of(node)
    try:
        await hook.write_zeroes(node, offset, length, flags & ~REQ_FUA)
    finally:
        mark_dirty(node, offset, length)
        record_write(node, offset, length)
    if flags & REQ_FUA:
        await flush_node(node)


async def child_discard(edge: Edge, offset: int, length: int) -> None:
    """Discard through ``edge``; a no-op unless the node has ``discard=unmap``."""
    node = _check_write(edge)
    if not length or not node.open_flags & OpenFlag.UNMAP:
        return
    hook = hook_of(node)
    if type(hook).discard is IOHook.discard:
        return  # a driver without discard returns before QEMU's tracked request
    try:
        await hook.discard(node, offset, length)
    finally:
        mark_dirty(node, offset, length)


async def flush_node(node: Node) -> None:
    """bdrv_co_flush: this node, then every child it may write through."""
    if node.read_only:
        return
    # bdrv_co_flush's events on the primary child (fired even without new
    # writes: the write generation is not tracked here).
    debug_event(node.file, "flush_to_os")
    if not node.open_flags & OpenFlag.NO_FLUSH:
        debug_event(node.file, "flush_to_disk")
    hook = hook_of(node)
    await hook.flush(node)
    if hook.flushes_children:
        return
    for edge in node.children:
        if edge.child is not None and edge.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            await flush_node(edge.child)


async def child_block_status(edge: Edge, offset: int, length: int) -> tuple[int, int]:
    """Block status of ``edge``'s node; data or zero ranges count as allocated."""
    node = _child(edge)
    return await node_block_status(node, offset, length)


async def node_block_status(node: Node, offset: int, length: int) -> tuple[int, int]:
    """bdrv_co_block_status of ``node`` itself (one extent from ``offset``)."""
    flags, pnum = await hook_of(node).block_status(node, offset, length)
    pnum = max(1, min(pnum, length))
    if flags & (DATA | ZERO):
        flags |= ALLOCATED
    return flags, pnum


# -- file ----------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False where the filesystem does not support ``mode``."""
    rc = _libc.fallocate(
        ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)
    )
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise BlockIOError(err)


def _fd(node: Node) -> int:
    state = node.state
    if not isinstance(state, FileState) or state.lock.closed:
        raise BlockIOError(errno.EBADF)
    return state.lock.fd


class FileIO(IOHook):
    """file-posix: pread/pwrite on the descriptor that holds the node's locks."""

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        fd = _fd(node)
        await disk_wait()
        try:
            data = os.pread(fd, length, offset)
            while len(data) < length:
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:  # past the end: zeros, as file-posix pads short reads
                    return data + bytes(length - len(data))
                data += more
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO) from err
        return data

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        fd = _fd(node)
        await disk_wait()
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO) from err

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        fd = _fd(node)
        await disk_wait()
        size = os.fstat(fd).st_size
        if (
            flags & REQ_MAY_UNMAP
            and offset + length <= size
            and _fallocate(fd, _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length)
        ):
            return
        if _fallocate(fd, _FALLOC_ZERO_RANGE, offset, length):
            return
        await super().write_zeroes(node, offset, length, flags)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        await disk_wait()
        done = _fallocate(_fd(node), _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, offset, length)
        record_discard(node, length, done)

    async def flush(self, node: Node) -> None:
        if node.open_flags & OpenFlag.NO_FLUSH:
            return
        fd = _fd(node)
        await disk_wait()
        try:
            await trio.to_thread.run_sync(os.fdatasync, fd)
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO) from err

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        """SEEK_DATA/SEEK_HOLE, as file-posix's find_allocation."""
        fd = _fd(node)
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # a hole up to the end of the file
                return ZERO | OFFSET_VALID, length
            return DATA | OFFSET_VALID, length
        if data > offset:
            return ZERO | OFFSET_VALID, data - offset
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            return DATA | OFFSET_VALID, length
        return DATA | OFFSET_VALID, max(1, hole - offset)


# -- raw -----------------------------------------------------------------------


def _file_edge(node: Node) -> Edge:
    edge = node.file
    if edge is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


class RawIO(IOHook):
    """raw: the ``file`` child seen through the ``offset``/``size`` window."""

    handles_fua = True

    @staticmethod
    def _base(node: Node, offset: int = 0, length: int = 0, write: bool = False) -> int:
        """raw_adjust_offset: the window's start; a request that does not fit
        a window with an explicit ``size`` (a format above it may grow past
        it) fails, ENOSPC for writes, EINVAL for reads."""
        state = node.state
        if not isinstance(state, RawState):
            return 0
        if state.has_size and (offset > state.size or length > state.size - offset):
            raise BlockIOError(errno.ENOSPC if write else errno.EINVAL)
        return state.offset

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        base = self._base(node, offset, length)
        debug_event(node.file, "read_aio")
        return await child_read(_file_edge(node), base + offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        base = self._base(node, offset, len(data), write=True)
        debug_event(node.file, "write_aio")
        await child_write(_file_edge(node), base + offset, data, flags)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        base = self._base(node, offset, length, write=True)
        await child_write_zeroes(_file_edge(node), base + offset, length, flags)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        base = self._base(node, offset, length, write=True)
        await child_discard(_file_edge(node), base + offset, length)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        return await child_block_status(_file_edge(node), self._base(node) + offset, length)


# -- null-co / null-aio --------------------------------------------------------


class NullIO(IOHook):
    """null-co/null-aio: writes vanish; reads are zeros (QEMU leaves the buffer
    as it is without ``read-zeroes``; zeros are one valid choice of garbage)."""

    @staticmethod
    async def _latency(node: Node) -> None:
        state = node.state
        if isinstance(state, NullState) and state.latency_ns:
            await trio.sleep(state.latency_ns / 1e9)

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        await self._latency(node)
        return bytes(length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await self._latency(node)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        await self._latency(node)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        state = node.state
        zero = ZERO if isinstance(state, NullState) and state.read_zeroes else 0
        return OFFSET_VALID | zero, length


# -- filters that pass requests on unchanged -----------------------------------


def _filtered(node: Node) -> Edge:
    edge = node.file or node.backing
    if edge is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


class PassThroughIO(IOHook):
    """A filter whose requests go to its filtered child unchanged."""

    handles_fua = True

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        return await child_read(_filtered(node), offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await child_write(_filtered(node), offset, data, flags)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        await child_write_zeroes(_filtered(node), offset, length, flags)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        await child_discard(_filtered(node), offset, length)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        return await child_block_status(_filtered(node), offset, length)


register_hook("file", FileIO())
register_hook("raw", RawIO())
register_hook("null-co", NullIO())
register_hook("null-aio", NullIO())
from qmpgraph.io import blkdebug_io as _blkdebug_io  # noqa: E402, F401  (registers "blkdebug")
from qmpgraph.io import cbw_hook as _cbw_hook  # noqa: E402, F401  (copy-before-write, snapshot-access)
from qmpgraph.io import cor_io as _cor_io  # noqa: E402, F401  (registers "copy-on-read")
from qmpgraph.io import filters_io as _filters_io  # noqa: E402, F401  (compress, preallocate, blkverify, blklogwrites)
from qmpgraph.io import luks_io as _luks_io  # noqa: E402, F401  (registers "luks")
from qmpgraph.io import qcow2_hook as _qcow2_hook  # noqa: E402, F401  (registers "qcow2")
from qmpgraph.io import quorum_io as _quorum_io  # noqa: E402, F401  (registers "quorum")
from qmpgraph.io import throttle_io as _throttle_io  # noqa: E402, F401  (registers "throttle")
