"""Data paths of the small filters that change requests: compress, preallocate.

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
is then already done); the node's length is ``data_end``.  ``close`` and
losing the permissions truncate ``file`` back to ``data_end``.  The state
lives in the node's ``PreallocateState`` (``qmpgraph.drivers.preallocate``).

What does not live here: the drivers' open and permission rules.
"""

from __future__ import annotations

import errno
from typing import Any

from qmpgraph.drivers.qcow2_compress import CompressedWriteError, write_compressed
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import Perm
from qmpgraph.io.hooks import PassThroughIO, child_read, register_hook
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import BlockIOError, eperm


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
        err = await QCOW2_IO._call(child, compressed)
        if err:
            raise BlockIOError(err)


register_hook("compress", CompressIO())
