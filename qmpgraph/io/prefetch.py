"""NBD_CMD_CACHE as QEMU 7.2 serves it: a copy-on-read prefetch.

QEMU reads the range with ``BDRV_REQ_COPY_ON_READ | BDRV_REQ_PREFETCH`` at
the exported node (its BlockBackend's root).  Where that node allocates the
whole range (a file always does; raw and filters answer for their child)
nothing happens at all.  Otherwise every piece of the range, widened to
the node's cluster size, that the node does not allocate is read (through
the backing chain) and written back into the node: as write-zeroes where
it read as zeros and the driver can zero, else as data.  The write is
QEMU's internal one: it bypasses the export's permissions (a read-only
export of a writable node still copies) but not a read-only node: EPERM
for data, while zeros "succeed" there (QEMU's qcow2 changes only its
in-memory L2 cache, which a read-only node never writes back).

What does not live here: the request's validation and reply (``server.nbd``,
``qmpgraph.nbd``), the drivers' read and write paths (their hooks).
"""

from __future__ import annotations

from qmpgraph.drivers.base import node_size
from qmpgraph.graph.graph import filter_child
from qmpgraph.graph.model import Node
from qmpgraph.io.backend import BackendIO
from qmpgraph.io.cbw_hook import REQ_WRITE_UNCHANGED
from qmpgraph.io.depth import cluster_size, own_status
from qmpgraph.io.hooks import hook_of
from qmpgraph.io.request import ALLOCATED, BlockIOError, eio, eperm

# QEMU's MAX_BOUNCE_BUFFER: one copy-on-read step copies at most this much.
_MAX_BOUNCE = 32768 << 9
# Drivers without a write-zeroes method of their own: zeros are written as data.
_NO_WRITE_ZEROES = frozenset({"null-co", "null-aio", "luks", "snapshot-access"})


def _cor_cluster(node: Node | None) -> int:
    """bdrv_get_info's cluster size (qcow2's, through raw and filters), 1 without."""
    while node is not None:
        if node.format_name == "qcow2":
            return cluster_size(node)
        edge = node.file if node.format_name == "raw" else filter_child(node)
        node = edge.child if edge is not None else None
    return 1


async def _allocated(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated: (allocated, pnum); an error counts as not allocated."""
    try:
        flags, pnum = await own_status(node, offset, length)
    except BlockIOError:
        return False, length
    return bool(flags & ALLOCATED), pnum


async def cache(io: BackendIO, offset: int, length: int) -> None:
    """Prefetch [offset, offset + length) of the export's node (see the module)."""
    node = io.node
    if offset < 0 or length < 0 or offset + length > io.size():
        raise eio()
    if not length:
        return
    allocated, pnum = await _allocated(node, offset, length)
    if allocated and pnum >= length:
        return
    cluster = _cor_cluster(node)
    pos = offset - offset % cluster
    end = min(-(-(offset + length) // cluster) * cluster, -(-node_size(node) // 512) * 512)
    hook = hook_of(node)
    while pos < end:
        allocated, pnum = await _allocated(node, pos, end - pos)
        if not pnum:
            return  # the node ends inside the last cluster
        pnum = min(pnum, end - pos)
        if not allocated:
            pnum = min(pnum, _MAX_BOUNCE)
            data = await hook.read(node, pos, pnum)
            if data.count(0) == len(data) and node.format_name not in _NO_WRITE_ZEROES:
                # On a read-only node QEMU's qcow2 marks the zero clusters in
                # its L2 cache only, never written back: no error, no change.
                if not node.read_only:
                    await hook.write_zeroes(node, pos, pnum, REQ_WRITE_UNCHANGED)
            elif node.read_only:
                raise eperm()
            else:
                await hook.write(node, pos, data, REQ_WRITE_UNCHANGED)
        pos += pnum
