"""Compressed cluster writes on a ``Qcow2Image`` (QEMU 7.2's
``qcow2_co_pwritev_compressed_part``), synchronous.

``write_compressed(image, offset, data)``: ``offset`` must be cluster
aligned and ``data`` whole clusters (only the image's last cluster may be
partial; it is padded with zeros), else EINVAL as QEMU.  Each cluster is
deflated as QEMU does (zlib raw deflate, 4 KiB window, default level,
memLevel 9); one that does not shrink below a cluster is written as a normal
cluster.  A compressed cluster never overwrites an allocated one (QEMU
fails with EIO); unallocated and zero clusters are replaced.

Host space comes from ``qcow2_alloc_bytes``'s sub-cluster allocator: the
compressed data of consecutive writes are packed one after the other in the
same host clusters while they fit, continuing into the next cluster when it
is free and adjacent; each host cluster a compressed cluster touches gets
one more reference.  The packing position is per open image, as QEMU's
``free_byte_offset``.  The L2 entry: host byte offset, the number of
512-byte sectors spanned minus one, and the compressed flag.  Order: new
refcounts, data, L2 entry (the image's crash-safe order).

This module reaches into ``Qcow2Image``'s metadata helpers (``_l2_for_write``,
``_write_l2``, ``_barrier``); the zstd compression type is refused
(ENOTSUP), as are images with an external data file (QEMU's rule).

What does not live here: the compress filter's data path
(``qmpgraph.io.filters_io``), reading compressed clusters (``qcow2_io``).
"""

from __future__ import annotations

import errno
import weakref
import zlib

from qmpgraph.drivers.qcow2_io import Qcow2Image
from qmpgraph.drivers.qcow2_read import OFFSET_MASK, OFLAG_COMPRESSED
from qmpgraph.drivers.qcow2_storage import Qcow2Error

# qcow2_alloc_bytes' free_byte_offset, per open image (0: start a new cluster).
_FREE_BYTE: weakref.WeakKeyDictionary[Qcow2Image, int] = weakref.WeakKeyDictionary()


class CompressedWriteError(Qcow2Error):
    """A compressed write QEMU refuses; ``errno`` is its error."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def deflate_cluster(data: bytes, limit: int) -> bytes | None:
    """qcow2_zlib_compress: raw deflate of ``data``, None if it needs more than ``limit`` bytes."""
    comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    out = comp.compress(data) + comp.flush(zlib.Z_FINISH)
    return out if len(out) <= limit else None


def _alloc_bytes(image: Qcow2Image, size: int) -> int:
    """qcow2_alloc_bytes: host bytes for ``size`` compressed bytes (references taken)."""
    cs = image.cluster_size
    refs = image.refcounts
    offset = _FREE_BYTE.get(image, 0)
    if offset and refs.get(offset // cs) >= refs.max_refcount:
        offset = 0
    free_in_cluster = cs - offset % cs if offset else cs
    if offset and free_in_cluster >= size:
        refs.change(offset // cs, (offset + size - 1) // cs - offset // cs + 1, 1)
    else:
        new_cluster = refs.allocate(1)
        if offset and -(-offset // cs) * cs == new_cluster:
            # The next cluster continues the partly used one: the old one gets
            # one more reference, the new one has its first.
            refs.change(offset // cs, 1, 1)
        else:
            offset = new_cluster
    end = offset + size
    _FREE_BYTE[image] = end if end % cs else 0
    return offset


def _write_one(image: Qcow2Image, offset: int, cluster: bytes) -> None:
    cs = image.cluster_size
    out = deflate_cluster(cluster, cs - 1)
    if out is None:
        # Could not compress: a normal cluster.
        image.write(offset, cluster[: min(cs, image.size - offset)])
        return
    shift = image.cluster_bits + image.l2_bits
    l1_index = offset >> shift
    table_offset, table = image._l2_for_write(l1_index)
    index = (offset >> image.cluster_bits) & (image.l2_entries - 1)
    if table[index] & OFFSET_MASK:
        raise CompressedWriteError(errno.EIO, "compressed write over an allocated cluster")
    old = table[index]
    host = _alloc_bytes(image, len(out))
    image.host.pwrite(host, out)
    sectors = (host + len(out) - 1) // 512 - host // 512
    image._barrier()
    table[index] = host | OFLAG_COMPRESSED | (sectors << (62 - (image.cluster_bits - 8)))
    try:
        image._write_l2(table_offset, table, index, index + 1)
    except OSError:
        table[index] = old
        raise


def write_compressed(image: Qcow2Image, offset: int, data: bytes) -> None:
    """Write whole clusters of ``data`` at ``offset`` as compressed clusters."""
    image._check_writable()
    cs = image.cluster_size
    if image.external_data:
        raise CompressedWriteError(errno.ENOTSUP, "compressed writes need the data in the image")
    if image.header.compression_type != 0:
        raise CompressedWriteError(errno.ENOTSUP, "only zlib compression is written")
    if not data:
        return
    end = offset + len(data)
    if offset % cs or (len(data) % cs and end != image.size):
        raise CompressedWriteError(errno.EINVAL, "compressed writes must be whole clusters")
    image._check_range(offset, len(data))
    for pos in range(offset, end, cs):
        chunk = data[pos - offset : pos - offset + cs]
        _write_one(image, pos, chunk + bytes(cs - len(chunk)))
