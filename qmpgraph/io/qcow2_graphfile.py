"""A qcow2 image's file (or data file) seen through the block graph.

``GraphFile`` is the ``HostFile`` that ``Qcow2Image`` gets when the node's
``file`` (or ``data-file``) child is not a plain ``file`` node: blkdebug
(error injection), raw with an ``offset`` window, throttle, null-co...
Each call goes back into trio (``trio.from_thread.run``) and through the
generic request path (``child_read``, ``child_write``, ``child_discard``),
so the child's own hook applies its rules, windows and limits, marks its
dirty bitmaps and counts its statistics, and its errors (``BlockIOError``
with the child's errno) fail the qcow2 request as QEMU's do.  The library
therefore runs such images only in a worker thread, never inline in the
trio thread (``qmpgraph.io.qcow2_hook``).

The edge is looked up on every call (in the trio thread), so a child
replaced later is used without rebuilding the image.  A ``data`` view
fires blkdebug's ``read_aio``/``write_aio`` events on the image's ``file``
edge before each guest data read or write, where QEMU's qcow2 fires
BLKDBG_READ_AIO/BLKDBG_WRITE_AIO; metadata I/O fires nothing.

After a failed request, ``resync_tables`` makes the image's L1 and cached
L2 tables what the file holds and ``free_unlinked`` gives back the clusters
the request allocated that no table links.

What does not live here: the descriptor-based files (``qcow2_storage``),
the qcow2 format, the image's lock and worker thread (``qcow2_hook``).
"""

from __future__ import annotations

import errno
import struct

import trio

from qmpgraph.drivers.qcow2_io import Qcow2Error, Qcow2Image
from qmpgraph.drivers.qcow2_read import OFFSET_MASK
from qmpgraph.errors import QMPError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io import hooks  # a module: hooks imports qcow2_hook, which imports this one
from qmpgraph.io.request import BlockIOError


def plain_file(edge: Edge | None) -> bool:
    """Whether ``edge`` leads to a ``file`` node (the descriptor fast path)."""
    child = edge.child if edge is not None else None
    return child is not None and child.format_name == "file"


class GraphFile:
    """``HostFile`` over ``node``'s child edge ``name``, from a worker thread.

    ``data``: this view carries guest data (fires ``read_aio``/``write_aio``
    on the ``file`` edge first).
    """

    def __init__(self, node: Node, name: str, *, data: bool = False) -> None:
        self.node = node
        self.name = name
        self.data = data

    def view(self, *, data: bool) -> GraphFile:
        """The same child, as a data or a metadata view."""
        return GraphFile(self.node, self.name, data=data)

    # -- in the trio thread ---------------------------------------------------

    def _edge(self) -> Edge:
        for edge in self.node.children:
            if edge.name == self.name and edge.child is not None:
                return edge
        raise BlockIOError(errno.ENOMEDIUM)

    def _size(self) -> int:
        child = self._edge().child
        assert child is not None
        return child.driver.size(child) if child.driver is not None else 0

    async def _read(self, offset: int, length: int) -> bytes:
        edge = self._edge()
        if self.data:
            hooks.debug_event(self.node.file, "read_aio")
        # A HostFile read stops at the end of the file; the child may refuse
        # to read past its own end (a raw window), so ask only what exists.
        length = max(0, min(length, self._size() - offset))
        if not length:
            return b""
        return await hooks.child_read(edge, offset, length)

    async def _write(self, offset: int, data: bytes) -> None:
        edge = self._edge()
        if self.data:
            hooks.debug_event(self.node.file, "write_aio")
        await hooks.child_write(edge, offset, data)

    async def _discard(self, offset: int, length: int) -> None:
        await hooks.child_discard(self._edge(), offset, length)

    async def _flush(self) -> None:
        child = self._edge().child
        assert child is not None
        await hooks.flush_node(child)

    # -- HostFile, in the image's worker thread ----------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (shorter only at the child's end)."""
        return trio.from_thread.run(self._read, offset, length)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Read into ``buf`` at ``offset``; the bytes read."""
        data = self.pread(offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` through the child's hook."""
        trio.from_thread.run(self._write, offset, bytes(data))

    def pwritev(self, offset: int, bufs: list[bytes | bytearray | memoryview]) -> None:
        """Write the buffers back to back at ``offset`` (one request, as QEMU's)."""
        self.pwrite(offset, b"".join(bytes(b) for b in bufs))

    def discard(self, offset: int, length: int) -> None:
        """Discard a range of the child (a no-op unless it has discard=unmap)."""
        trio.from_thread.run(self._discard, offset, length)

    def size(self) -> int:
        """The child node's length."""
        return trio.from_thread.run_sync(self._size)

    def flush(self) -> None:
        """flush_node on the child."""
        trio.from_thread.run(self._flush)

    def truncate(self, size: int) -> None:
        """Not through the graph: the data path never shrinks or grows its file."""
        raise BlockIOError(errno.ENOTSUP)


def resync_tables(image: Qcow2Image, node: Node) -> bool:
    """After a failed request through the graph, make the image's L1 table
    and cached L2 tables what the file holds (QEMU's caches are updated only
    after the writes they describe succeeded).  Read with the drivers'
    control-plane reads, which no blkdebug rule fails; False if that fails."""
    edge = node.file
    child = edge.child if edge is not None else None
    if child is None or child.driver is None:
        return False
    driver = child.driver
    cs = image.cluster_size
    try:
        raw = driver.read(child, image.l1_offset, len(image.l1) * 8)
        image.l1[:] = struct.unpack(f">{len(image.l1)}Q", raw.ljust(len(image.l1) * 8, b"\0"))
        live = {entry & OFFSET_MASK for entry in image.l1}
        for offset in list(image._l2_cache):
            if offset not in live:
                del image._l2_cache[offset]
                continue
            table = struct.unpack(
                f">{image.l2_entries}Q", driver.read(child, offset, cs).ljust(cs, b"\0")
            )
            image._l2_cache[offset][:] = table
    except (OSError, QMPError, BlockIOError, struct.error):
        return False
    return True


def free_unlinked(image: Qcow2Image, allocated: list[tuple[int, int]]) -> None:
    """Give back the clusters a failed request allocated that no table links
    (qcow2_alloc_cluster_abort), so the next allocation reuses them; best effort."""
    if not allocated:
        return
    cs = image.cluster_size
    linked = {entry & OFFSET_MASK for entry in image.l1}
    linked.update(entry & OFFSET_MASK for table in image._l2_cache.values() for entry in table)
    refs = image.refcounts
    linked.update(entry & OFFSET_MASK for entry in refs.table)
    for offset, count in allocated:
        for host in range(offset, offset + count * cs, cs):
            if host in linked:
                continue
            try:
                refs.free_bytes(host, cs)
            except (BlockIOError, Qcow2Error, OSError):
                return
            refs.free_hint = min(refs.free_hint, host // cs)
