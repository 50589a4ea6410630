"""Resizing a ``Qcow2Image`` (qcow2_co_truncate without preallocation).

Growing: a bigger L1 table when the old one is too small (written whole,
made durable, then the header is switched over, then the old one freed);
the new size in the header; then the new area is made to read as zeros
where it would not (a longer backing file shows through, as the block
layer's ``BDRV_REQ_ZERO_WRITE`` prevents in QEMU, and old data left in the
last partial cluster by an earlier shrink).

Shrinking, in QEMU's order: a full discard of the clusters past the new end
(the entries become unallocated, the clusters are freed), the L1 entries
past the new end zeroed and their L2 tables freed (the header's ``l1_size``
stays), the new size in the header, and the file cut after its last used
cluster.  (QEMU also drops refcount blocks that count nothing but
themselves; this does not, which only keeps the file a little longer.)

What does not live here: the ``block_resize`` command's own resize of an
image that no data path has open (``qcow2_resize``).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qmpgraph.drivers.qcow2_storage import Status
from qmpgraph.errors import GenericError

if TYPE_CHECKING:
    from qmpgraph.drivers.qcow2_io import Qcow2Image

_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_HEADER_SIZE = 24
_HEADER_L1 = 36
_MAX_L1_ENTRIES = (32 << 20) // 8


def truncate(img: Qcow2Image, new_size: int) -> None:
    """Resize ``img`` to ``new_size`` bytes, with QEMU 7.2's checks and messages."""
    if new_size < 0 or new_size % 512:
        raise GenericError("The new size must be a multiple of 512")
    if img.snapshots and img.header.version < 3:
        raise GenericError("Can't resize a v2 image which has snapshots")
    old_size = img.size
    shift = img.cluster_bits + img.l2_bits
    new_l1 = (new_size + (1 << shift) - 1) >> shift
    if new_size < old_size:
        cs = img.cluster_size
        start = -(-new_size // cs) * cs
        if start < old_size:
            img._discard_clusters(start, old_size, full=True)
        _shrink_l1(img, new_l1)
        _set_size(img, new_size)
        file_size = img.host.size()
        last = img.refcounts.last_used_cluster(-(-file_size // cs))
        if (last + 1) * cs < file_size:
            img.host.truncate((last + 1) * cs)
    elif new_size > old_size:
        _grow_l1(img, new_l1)
        _set_size(img, new_size)
        _zero_new_area(img, old_size, new_size)
    if img.external_data and img.data_raw:
        img.data_host.truncate(new_size)


def _set_size(img: Qcow2Image, size: int) -> None:
    img.host.pwrite(_HEADER_SIZE, struct.pack(">Q", size))
    img.size = size


def _grow_l1(img: Qcow2Image, new_l1: int) -> None:
    """qcow2_grow_l1_table with an exact size."""
    old_l1 = len(img.l1)
    if new_l1 <= old_l1:
        return
    if new_l1 > _MAX_L1_ENTRIES:
        raise GenericError("Failed to grow the L1 table: File too large")
    cs = img.cluster_size
    clusters = -(-new_l1 * 8 // cs)
    table = img.l1 + [0] * (new_l1 - old_l1)
    offset = img.refcounts.allocate(clusters)
    raw = struct.pack(f">{new_l1}Q", *table)
    img.host.pwrite(offset, raw + bytes(clusters * cs - len(raw)))
    img.host.flush()
    img.host.pwrite(_HEADER_L1, struct.pack(">IQ", new_l1, offset))
    img.host.flush()
    old_offset = img.l1_offset
    img.l1, img.l1_offset = table, offset
    if old_l1:
        img.refcounts.free_bytes(old_offset, old_l1 * 8)


def _shrink_l1(img: Qcow2Image, new_l1: int) -> None:
    """qcow2_shrink_l1_table: zero the entries past ``new_l1``, free their L2 tables."""
    old_l1 = len(img.l1)
    if new_l1 >= old_l1:
        return
    freed = [e & _OFFSET_MASK for e in img.l1[new_l1:] if e & _OFFSET_MASK]
    img.host.pwrite(img.l1_offset + new_l1 * 8, bytes((old_l1 - new_l1) * 8))
    img.l1[new_l1:] = [0] * (old_l1 - new_l1)
    for table in freed:
        img.refcounts.free_bytes(table, img.cluster_size)


def _zero_new_area(img: Qcow2Image, old_size: int, new_size: int) -> None:
    """Make [old_size, new_size) read as zeros where it does not already."""
    for ext in img.block_status(old_size, new_size - old_size):
        if not ext.flags & Status.ZERO:
            img.write_zeroes(ext.offset, ext.length, may_unmap=True)
