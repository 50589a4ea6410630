"""Whether a write-zeroes request can be done "fast" (NBD's FAST_ZERO).

QEMU turns NBD_CMD_FLAG_FAST_ZERO into BDRV_REQ_NO_FALLBACK: the request
fails with ENOTSUP instead of falling back to writing a buffer of zeros
where a driver has no cheap way to zero.  In QEMU 7.2:

* file-posix zeroes with fallocate (assumed to work on the host's file
  systems), raw and filters pass the request to their child;
* null-co (and every driver without a write-zeroes method of its own,
  e.g. luks) has no cheap way: ENOTSUP;
* qcow2 zeroes whole clusters by marking them; a piece covering part of a
  cluster is cheap only if the rest of that cluster already reads as
  zeros and the cluster itself is unallocated or a zero cluster in this
  layer (else ENOTSUP);
* quorum is cheap when every child is.

``supported`` answers that question for a whole request before anything
is written; QEMU works piece by piece and may have zeroed the cheap
leading pieces of a request whose later piece fails (not modelled).

What does not live here: performing the write (``hooks``, ``backend``).
"""

from __future__ import annotations

from qmpgraph.drivers import qcow2_read
from qmpgraph.drivers.base import node_size
from qmpgraph.graph.graph import filter_child
from qmpgraph.graph.model import Node
from qmpgraph.io.depth import cluster_size, status_above
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import ZERO


async def supported(node: Node, offset: int, length: int) -> bool:
    """Whether zeroing [offset, offset + length) of ``node`` needs no fallback."""
    name = node.format_name
    if name == "file":
        return True
    if name == "raw":
        edge = node.file
        if edge is None or edge.child is None:
            return False
        base = int(getattr(node.state, "offset", 0) or 0)
        return await supported(edge.child, base + offset, length)
    if name == "qcow2":
        return await _qcow2(node, offset, length)
    if name == "quorum":
        children = [e.child for e in node.children if e.child is not None]
        return all([await supported(child, offset, length) for child in children])
    edge = filter_child(node)
    if edge is not None and edge.child is not None:
        return await supported(edge.child, offset, length)
    return False  # null-co, luks, ...: no write-zeroes method of their own


async def _reads_zero(node: Node, offset: int, length: int) -> bool:
    """qcow2's is_zero: the chain's status says ZERO all over the range."""
    end = min(offset + length, node_size(node))
    while offset < end:
        flags, pnum, _ = await status_above(node, offset, end - offset)
        if not flags & ZERO:
            return False
        offset += pnum
    return True


async def _qcow2(node: Node, offset: int, length: int) -> bool:
    cluster = cluster_size(node)
    end = offset + length
    # Only the partial clusters at either end need a look.
    partial = {offset - offset % cluster} if offset % cluster else set()
    if end % cluster:
        partial.add(end - end % cluster)
    for start in sorted(partial):
        stop = start + cluster
        head_end, tail_start = max(start, offset), min(stop, end)
        if not await _reads_zero(node, start, head_end - start):
            return False
        if not await _reads_zero(node, tail_start, stop - tail_start):
            return False
        size = min(cluster, node_size(node) - start)
        kind = (await QCOW2_IO.own_runs(node, start, size, first_only=True))[0][0]
        if kind not in (qcow2_read.UNALLOCATED, qcow2_read.ZERO):
            return False
    return True
