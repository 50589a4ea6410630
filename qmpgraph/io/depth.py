"""Block status through a backing chain, layer by layer, as QEMU 7.2 walks it.

QEMU answers block status on two levels.  ``bdrv_co_block_status`` asks
one node (a filter, or raw, hands the question to its child unchanged:
``BDRV_BLOCK_RAW``); ``bdrv_co_common_block_status_above`` asks the top
node and, where it does not allocate the range, its filtered or backing
child, then that one's, counting the layers it went through.  NBD uses the
second for both of its contexts: ``base:allocation`` shows the flags of
the layer that answered, ``qemu:allocation-depth`` how deep that layer is
(1: the exported node; 0: no layer allocates the range).

Three consequences that the per-driver hooks alone would not give:

* every filter counts as a layer: a throttle node over a qcow2 image
  whose backing file holds the data answers depth 3;
* raw and snapshot-access are not filters, so the walk stops there: over
  a qcow2 overlay they show only what the overlay itself allocates
  (``base:allocation`` "hole", depth 0 elsewhere);
* a lower layer shorter than the one above it reads as allocated zeros
  past its end, at its own depth.

qcow2 answers here for its own clusters (not through its hook, which
answers for the whole chain), one L2 slice at a time as QEMU does, and
with metadata preallocation detected as QEMU detects it, its data clusters
over holes of the file read as zeros.  Lengths are whole sectors
(bdrv_co_getlength rounds a file's length up).

``own_status`` is the one-node question, ``status_above`` the walk and
``allocation_depth`` NBD's depth.  What does not live here: the other
drivers' own answers (their hooks in ``hooks``, ``cbw_hook``, ...).
"""

from __future__ import annotations

import os

from qmpgraph.drivers import qcow2_read
from qmpgraph.drivers.base import node_size
from qmpgraph.drivers.qcow2_io import Qcow2Image
from qmpgraph.graph.graph import filter_child, filter_or_cow_child
from qmpgraph.graph.model import Node
from qmpgraph.io.blkdebug_io import rule_check
from qmpgraph.io.hooks import node_block_status
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.io.request import ALLOCATED, DATA, OFFSET_VALID, ZERO, eio

# pnum 0: the offset lies at or past the node's end (QEMU's BDRV_BLOCK_EOF answer).
_PAST_END = (0, 0)


def _raw_window(node: Node) -> tuple[Node, int] | None:
    """raw's ``file`` child and the window's start; None when it has no child."""
    edge = node.file
    if edge is None or edge.child is None:
        return None
    return edge.child, int(getattr(node.state, "offset", 0) or 0)


async def own_status(node: Node, offset: int, length: int) -> tuple[int, int]:
    """(BDRV_BLOCK_* flags, pnum) of ``node`` alone: QEMU's bdrv_co_block_status.

    Filters and raw answer with their child's status (raw shifted by its
    window); qcow2 answers for its own clusters only: unallocated ones have
    no flags, or ZERO where there is no backing data to defer to.  Other
    drivers answer through their hooks.  pnum is 0 at or past the node's end.
    """
    size = -(-node_size(node) // 512) * 512  # bdrv_co_getlength: whole sectors
    if offset >= size:
        return _PAST_END
    length = min(length, size - offset)
    drv = node.driver
    if node.format_name == "raw":
        window = _raw_window(node)
        if window is not None:
            child, base = window
            flags, pnum = await own_status(child, base + offset, length)
            return flags, min(pnum, length)
    if drv is not None and drv.is_filter:
        edge = filter_child(node)
        if edge is not None and edge.child is not None:
            if node.format_name == "blkdebug":  # its rules may fail block status
                rule_check(node, offset, length, "block-status")
            flags, pnum = await own_status(edge.child, offset, length)
            return flags, min(pnum, length)
    if node.format_name == "qcow2":
        return await _qcow2_status(node, offset, length)
    return await node_block_status(node, offset, length)


async def _qcow2_status(node: Node, offset: int, length: int) -> tuple[int, int]:
    """qcow2's own answer: the first run of one cluster kind in this layer."""
    # qcow2_get_host_offset answers within one L2 slice (a cluster's worth
    # of 8-byte entries, the default l2-cache-entry-size).
    cluster = cluster_size(node)
    slice_bytes = cluster * (cluster // 8)
    length = min(length, slice_bytes - offset % slice_bytes)
    kind, _, pnum, host = (await QCOW2_IO.own_runs(node, offset, length, first_only=True))[0]
    if kind == qcow2_read.NORMAL:
        if await _metadata_preallocated(node):
            # QEMU's BDRV_BLOCK_RECURSE: holes of the file under the data read as zeros.
            return await _recurse_into_file(node, host, pnum)
        return DATA | OFFSET_VALID | ALLOCATED, pnum
    if kind == qcow2_read.COMPRESSED:
        return DATA | ALLOCATED, pnum
    if kind == qcow2_read.ZERO:
        return ZERO | ALLOCATED, pnum
    # Unallocated: zeros without backing data to defer to, judged at the run's
    # start only, so a run crossing the backing file's end is no zero.
    backing = node.backing.child if node.backing is not None else None
    if backing is None or offset >= node_size(backing):
        return ZERO, pnum
    return 0, pnum


def cluster_size(node: Node) -> int:
    """A qcow2 node's cluster size (64 KiB when its header is not at hand)."""
    state = node.state
    for holder in (state, getattr(state, "header", None)):
        size = getattr(holder, "cluster_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return 65536


# (node id, id of its state) -> QEMU's metadata_preallocation, judged once per open.
_PREALLOCATED: dict[tuple[int, int], bool] = {}


async def _metadata_preallocated(node: Node) -> bool:
    """qcow2_detect_metadata_preallocation: far more clusters have a refcount
    than the file has blocks allocated (checked on the first block status)."""
    key = (node.id, id(node.state))
    known = _PREALLOCATED.get(key)
    if known is not None:
        return known
    file_node = node.file.child if node.file is not None else None
    fd = getattr(getattr(file_node, "state", None), "lock", None)
    if file_node is None or fd is None or any(e.name == "data-file" for e in node.children):
        _PREALLOCATED[key] = False
        return False
    st = os.fstat(fd.fd)

    def detect(img: Qcow2Image) -> bool:
        cluster = img.cluster_size
        real = st.st_blocks * 512 // cluster
        threshold = max(real * 10 // 9, real + 2)
        count = 0
        for i in range(-(-st.st_size // cluster)):
            if count >= threshold:
                break
            count += bool(img.refcounts.get(i))
        return count >= threshold

    # The image's own call queue: the library is not thread-safe.
    result = await QCOW2_IO._call(node, detect)
    _PREALLOCATED[key] = result
    return result


async def _recurse_into_file(node: Node, host: int, pnum: int) -> tuple[int, int]:
    """The data's status narrowed by its file's: holes (or past its end) are zeros."""
    flags = DATA | OFFSET_VALID | ALLOCATED
    assert node.file is not None and node.file.child is not None
    file_flags, file_pnum = await own_status(node.file.child, host, pnum)
    if not file_pnum:
        return flags | ZERO, pnum
    return flags | (file_flags & ZERO), min(pnum, file_pnum)


async def status_above(node: Node, offset: int, length: int) -> tuple[int, int, int]:
    """(flags, pnum, depth) of the whole chain below ``node`` (base NULL).

    QEMU's bdrv_co_common_block_status_above: the first layer that
    allocates the range answers; ``depth`` counts the layers asked, the top
    one being 1.  Without ALLOCATED in the flags no layer holds the range.
    """
    flags, pnum = await own_status(node, offset, length)
    depth = 1
    if not pnum:  # callers ask inside the node; a shrunken node ends the request
        raise eio()
    if flags & ALLOCATED:
        return flags, pnum, depth
    edge = filter_or_cow_child(node)
    while edge is not None and edge.child is not None:
        layer = edge.child
        lower, lower_pnum = await own_status(layer, offset, pnum)
        depth += 1
        if not lower_pnum:
            # The layer ends before the range: zeros, allocated at this depth.
            return ZERO | ALLOCATED, pnum, depth
        flags, pnum = lower, lower_pnum
        if flags & ALLOCATED:
            return flags, pnum, depth
        edge = filter_or_cow_child(layer)
    return flags, pnum, depth


async def allocation_depth(node: Node, offset: int, length: int) -> tuple[int, int]:
    """(depth, pnum) for NBD's ``qemu:allocation-depth``: QEMU's
    bdrv_is_allocated_above(node, NULL, false, ...), 0 where nothing allocates."""
    flags, pnum, depth = await status_above(node, offset, length)
    return (depth if flags & ALLOCATED else 0), pnum
