"""qcow2 resize (qcow2_co_truncate without preallocation), on the real image file.

Growing writes the new size into the header and, when the L1 table is too
small for it, allocates a bigger L1 table (first fit from QEMU's free-cluster
hint), copies the old entries, points the header at it and frees the old one.
Shrinking does what QEMU 7.2 does, in its order: a full discard of the cut-off
clusters (which allocates an L2 table for every L1 entry in the range that
has none, as get_cluster_table does), zeroing the L1 entries past the new end
and freeing their L2 tables, dropping unused refcount blocks from the
reftable, and truncating the file after its last used cluster.  The header's
``l1_size`` is left as it was, as QEMU leaves it.

Every write goes through ``ImageWriter``, which keeps the old bytes and the old
file length, so that ``restore`` (the undo of an aborted transaction) puts the
file back exactly.  Unsupported here (reported as errors, never half done):
growing the refcount structures (an allocation outside the existing refcount
blocks), and discarding clusters passed through to the host (hole punching).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from qmpgraph.drivers.qcow2_discard import DiscardType, FreedClusters
from qmpgraph.errors import GenericError
from qmpgraph.io.stats import record_fd_write

_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_MAX_L1_ENTRIES = (32 << 20) // 8  # QCOW_MAX_L1_SIZE / L1E_SIZE
_INT_MAX = (1 << 31) - 1
_HEADER_SIZE_OFFSET = 24
_HEADER_L1_OFFSET = 36
# Zeros of short-lived L2 tables past the end of the file are written up to
# this much (as QEMU writes them); beyond it only the file length is kept.
_TEMP_WRITE_LIMIT = 16 << 20  # l1_size (be32) then l1_table_offset (be64)


class Unsupported(Exception):
    """A resize step qmpgraph does not implement (the refcount structure would grow)."""


@dataclass(slots=True)
class ImageWriter:
    """Positional I/O on the image's descriptor, journaled for ``restore``."""

    fd: int
    length: int
    journal: list[tuple[int, bytes]] = field(default_factory=list)
    original_length: int = -1

    def __post_init__(self) -> None:
        self.original_length = self.length

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (zeros past the end of the file)."""
        data = os.pread(self.fd, size, offset) if size else b""
        return data + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``, remembering what was there."""
        if offset < self.original_length:
            keep = min(len(data), self.original_length - offset)
            self.journal.append((offset, self.read(offset, keep)))
        os.pwrite(self.fd, data, offset)
        record_fd_write(self.fd, offset, len(data))
        self.length = max(self.length, offset + len(data))

    def truncate(self, length: int) -> None:
        """Set the file's length, remembering a cut-off tail of the original."""
        if length < self.original_length:
            end = min(self.original_length, self.length)
            if end > length:
                self.journal.append((length, self.read(length, end - length)))
        os.ftruncate(self.fd, length)
        self.length = length

    def restore(self) -> None:
        """Undo every write and truncation (newest first)."""
        os.ftruncate(self.fd, max(self.length, self.original_length))
        for offset, data in reversed(self.journal):
            os.pwrite(self.fd, data, offset)
        os.ftruncate(self.fd, self.original_length)
        self.journal.clear()
        self.length = self.original_length


@dataclass(slots=True)
class Geometry:
    """The header fields resize reads and changes."""

    size: int
    cluster_bits: int
    l2_bits: int
    refcount_order: int
    l1_size: int
    l1_table_offset: int
    reftable_offset: int
    reftable_clusters: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    def size_to_l1(self, size: int) -> int:
        """L1 entries needed for a virtual size of ``size`` bytes."""
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift


def read_geometry(io: ImageWriter) -> Geometry:
    """Parse the fields resize needs from the header (v2 or v3)."""
    head = io.read(0, 104)
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    size = struct.unpack_from(">Q", head, 24)[0]
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", head, 36)
    version = struct.unpack_from(">I", head, 4)[0]
    incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
    order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
    extended = bool(incompat & (1 << 4))
    return Geometry(
        size,
        cluster_bits,
        cluster_bits - (4 if extended else 3),
        order,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        extended,
    )


class Refcounts:
    """Cluster reference counts read and written through the refcount blocks."""

    def __init__(self, io: ImageWriter, geo: Geometry, free_hint: int) -> None:
        self.io = io
        self.geo = geo
        self.bits = 1 << geo.refcount_order
        self.per_block = (geo.cluster_size * 8) // self.bits
        count = geo.reftable_clusters * geo.cluster_size // 8
        raw = io.read(geo.reftable_offset, count * 8)
        self.table = list(struct.unpack(f">{count}Q", raw))
        self.free_hint = free_hint
        #: Freed clusters to discard in the file (qcow2_discard), if any.
        self.discards: FreedClusters | None = None

    def freeing(self, kind: DiscardType) -> None:
        """Clusters freed from now on are freed for ``kind`` (discard_passthrough)."""
        if self.discards is not None:
            self.discards.kind = kind

    def _locate(self, cluster: int) -> tuple[int, int] | None:
        index, slot = divmod(cluster, self.per_block)
        if index >= len(self.table) or not self.table[index] & _L1_OFFSET_MASK:
            return None
        return self.table[index] & _L1_OFFSET_MASK, slot

    def get(self, cluster: int) -> int:
        """The refcount of ``cluster`` (0 where no refcount block covers it)."""
        where = self._locate(cluster)
        if where is None:
            return 0
        block, slot = where
        bit = slot * self.bits
        if self.bits >= 8:
            raw = self.io.read(block + bit // 8, self.bits // 8)
            return int.from_bytes(raw, "big")
        byte = self.io.read(block + bit // 8, 1)[0]
        return (byte >> (bit % 8)) & ((1 << self.bits) - 1)

    def set(self, cluster: int, value: int) -> None:
        """Store ``value`` as the refcount of ``cluster``."""
        where = self._locate(cluster)
        if where is None:
            raise Unsupported("no refcount block covers the cluster")
        block, slot = where
        bit = slot * self.bits
        if self.bits >= 8:
            self.io.write(block + bit // 8, value.to_bytes(self.bits // 8, "big"))
            return
        mask = ((1 << self.bits) - 1) << (bit % 8)
        byte = self.io.read(block + bit // 8, 1)[0]
        byte = (byte & ~mask) | ((value << (bit % 8)) & mask)
        self.io.write(block + bit // 8, bytes([byte]))

    def alloc(self, size: int) -> int:
        """alloc_clusters_noref + refcount 1: the byte offset of ``size`` new bytes."""
        count = max(1, -(-size // self.geo.cluster_size))
        run = 0
        while run < count:
            cluster = self.free_hint
            self.free_hint += 1
            run = run + 1 if self.get(cluster) == 0 else 0
        start = self.free_hint - count
        if self.discards is not None:
            self.discards.reused(start, count)
        for cluster in range(start, start + count):
            self.set(cluster, 1)
        return start << self.geo.cluster_bits

    def skip_free_cluster(self) -> int:
        """The cluster ``alloc`` would take next, passed over without a reference."""
        while self.get(self.free_hint) != 0:
            self.free_hint += 1
        self.free_hint += 1
        return (self.free_hint - 1) << self.geo.cluster_bits

    def free(self, offset: int, size: int) -> None:
        """Drop one reference from every cluster of [offset, offset + size)."""
        if size <= 0:
            return
        first = offset >> self.geo.cluster_bits
        last = (offset + size - 1) >> self.geo.cluster_bits
        for cluster in range(first, last + 1):
            value = self.get(cluster) - 1
            self.set(cluster, value)
            if value == 0 and self.discards is not None:
                self.discards.freed(cluster)
            if value == 0 and cluster < self.free_hint:
                self.free_hint = cluster


@dataclass(frozen=True, slots=True)
class ResizeResult:
    """What the node's in-memory header must say after the resize."""

    size: int
    l1_size: int
    l1_table_offset: int
    free_hint: int


def _read_l1(io: ImageWriter, geo: Geometry) -> list[int]:
    raw = io.read(geo.l1_table_offset, geo.l1_size * 8)
    return list(struct.unpack(f">{geo.l1_size}Q", raw))


def _grow_l1(io: ImageWriter, geo: Geometry, refs: Refcounts, new_l1: int) -> None:
    """qcow2_grow_l1_table with an exact size."""
    if new_l1 <= geo.l1_size:
        return
    if new_l1 > _INT_MAX // 8 or new_l1 > _MAX_L1_ENTRIES:
        raise GenericError("Failed to grow the L1 table: File too large")
    table = _read_l1(io, geo) + [0] * (new_l1 - geo.l1_size)
    try:
        offset = refs.alloc(new_l1 * 8)
    except Unsupported:
        raise GenericError("Failed to grow the L1 table: Operation not supported") from None
    io.write(offset, struct.pack(f">{new_l1}Q", *table))
    io.write(_HEADER_L1_OFFSET, struct.pack(">IQ", new_l1, offset))
    old_offset, old_size = geo.l1_table_offset, geo.l1_size
    geo.l1_size, geo.l1_table_offset = new_l1, offset
    refs.freeing(DiscardType.OTHER)
    refs.free(old_offset, old_size * 8)


def _free_l2_entry(geo: Geometry, refs: Refcounts, entry: int) -> None:
    """qcow2_free_any_cluster for a data cluster an L2 entry points to."""
    if entry & _COMPRESSED:
        shift = 62 - (geo.cluster_bits - 8)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (geo.cluster_bits - 8)) - 1)) + 1
        refs.free(offset, sectors * 512 - (offset & 511))
    elif entry & _L2_OFFSET_MASK:
        refs.free(entry & _L2_OFFSET_MASK, geo.cluster_size)


def _discard(
    io: ImageWriter, geo: Geometry, refs: Refcounts, start: int, end: int, *, keep_l1: int
) -> None:
    """qcow2_cluster_discard(full_discard) of whole clusters in [start, end).

    An L2 table QEMU allocates for an empty L1 entry at or past ``keep_l1``
    is freed again by the L1 shrink, so it only takes its place here: the
    allocation hint, zeros inside the file, the file's length (the final
    truncation cuts it off again).
    """
    if start >= end:
        return
    l1 = _read_l1(io, geo)
    entry_size = 16 if geo.extended_l2 else 8
    per_l2 = 1 << geo.l2_bits
    first = start >> geo.cluster_bits
    last = (end - 1) >> geo.cluster_bits
    cluster = first
    temp_first: int | None = None
    temp_bytes = 0
    while cluster <= last:
        index = cluster >> geo.l2_bits
        entry = l1[index]
        if index >= keep_l1 and not entry & _L1_OFFSET_MASK:
            # An empty table QEMU allocates here and frees again in the L1
            # shrink: only its place (hint, file length, zeros) matters.
            new = refs.skip_free_cluster()
            if refs.discards is not None:
                refs.discards.freed(new >> geo.cluster_bits)
            temp_first = new if temp_first is None else temp_first
            temp_bytes += geo.cluster_size
            if new < io.length or temp_bytes <= _TEMP_WRITE_LIMIT:
                # Written as QEMU writes it: the host file system keeps the
                # traces (extent blocks) in the file's allocated size.
                io.write(new, bytes(geo.cluster_size))
            io.length = max(io.length, new + geo.cluster_size)
            cluster = (index + 1) * per_l2
            continue
        if not entry & _COPIED:
            # get_cluster_table: a fresh (or copied) L2 table before touching it.
            old = entry & _L1_OFFSET_MASK
            content = io.read(old, geo.cluster_size) if old else bytes(geo.cluster_size)
            new = refs.alloc(geo.cluster_size)
            io.write(new, content)
            l1[index] = new | _COPIED
            io.write(geo.l1_table_offset + index * 8, struct.pack(">Q", l1[index]))
            if old:
                refs.freeing(DiscardType.OTHER)
                refs.free(old, geo.cluster_size)
                refs.freeing(DiscardType.ALWAYS)
        table = l1[index] & _L1_OFFSET_MASK
        stop = min(last, (index + 1) * per_l2 - 1)
        for c in range(cluster, stop + 1):
            pos = table + (c % per_l2) * entry_size
            old_entry = struct.unpack(">Q", io.read(pos, 8))[0]
            if old_entry or (geo.extended_l2 and any(io.read(pos + 8, 8))):
                _free_l2_entry(geo, refs, old_entry)
                io.write(pos, bytes(entry_size))
        cluster = stop + 1
    if temp_first is not None:
        refs.free_hint = min(refs.free_hint, temp_first)


def _shrink_l1(io: ImageWriter, geo: Geometry, refs: Refcounts, new_l1: int) -> None:
    """qcow2_shrink_l1_table: zero the entries past ``new_l1``, free their L2 tables."""
    if new_l1 >= geo.l1_size:
        return
    l1 = _read_l1(io, geo)
    io.write(geo.l1_table_offset + new_l1 * 8, bytes((geo.l1_size - new_l1) * 8))
    for index in range(geo.l1_size - 1, new_l1 - 1, -1):
        if l1[index] & _L1_OFFSET_MASK:
            refs.free(l1[index] & _L1_OFFSET_MASK, geo.cluster_size)


def _shrink_reftable(io: ImageWriter, geo: Geometry, refs: Refcounts) -> None:
    """qcow2_shrink_reftable: forget refcount blocks that count nothing but themselves."""
    new_table = []
    for index, entry in enumerate(refs.table):
        block = entry & _L1_OFFSET_MASK
        if not block:
            new_table.append(0)
            continue
        content = bytearray(io.read(block, geo.cluster_size))
        own = block >> geo.cluster_bits
        if own // refs.per_block == index:
            bit = (own % refs.per_block) * refs.bits
            if refs.bits >= 8:
                content[bit // 8 : bit // 8 + refs.bits // 8] = bytes(refs.bits // 8)
            else:
                content[bit // 8] &= ~(((1 << refs.bits) - 1) << (bit % 8)) & 0xFF
        new_table.append(entry if any(content) else 0)
    io.write(geo.reftable_offset, struct.pack(f">{len(new_table)}Q", *new_table))
    if refs.discards is not None:
        # qcow2_discard_refcount_block: whatever the kinds passed through.
        refs.discards.kind = DiscardType.ALWAYS
        for old, new in zip(refs.table, new_table, strict=True):
            if old & _L1_OFFSET_MASK and not new:
                refs.discards.freed((old & _L1_OFFSET_MASK) >> geo.cluster_bits)
    refs.table = new_table


def _last_cluster(geo: Geometry, refs: Refcounts, length: int) -> int:
    for cluster in range(-(-length // geo.cluster_size) - 1, -1, -1):
        if refs.get(cluster) > 0:
            return cluster
    raise GenericError("Failed to find the last cluster: Input/output error")


def resize(
    io: ImageWriter,
    new_size: int,
    *,
    nb_snapshots: int,
    version: int,
    free_hint: int,
    discards: FreedClusters | None = None,
) -> ResizeResult:
    """qcow2_co_truncate's metadata part for ``new_size`` (PREALLOC_MODE_OFF).

    Clusters it frees are recorded in ``discards`` when given (the cut-off
    clusters and L2 tables as QCOW2_DISCARD_ALWAYS, replaced tables as
    QCOW2_DISCARD_OTHER, dropped refcount blocks always); the caller
    discards them once the resize stands.
    """
    if new_size % 512:
        raise GenericError("The new size must be a multiple of 512")
    if nb_snapshots and version < 3:
        raise GenericError("Can't resize a v2 image which has snapshots")
    geo = read_geometry(io)
    refs = Refcounts(io, geo, free_hint)
    refs.discards = discards
    refs.freeing(DiscardType.ALWAYS)
    old_length = geo.size // 512 * 512
    new_l1 = geo.size_to_l1(new_size)
    try:
        if new_size < old_length:
            cs = geo.cluster_size
            _discard(io, geo, refs, -(-new_size // cs) * cs, old_length, keep_l1=new_l1)
            _shrink_l1(io, geo, refs, new_l1)
            _shrink_reftable(io, geo, refs)
            last = _last_cluster(geo, refs, io.length)
            if (last + 1) * cs < io.length:
                io.truncate((last + 1) * cs)
            elif io.length > os.fstat(io.fd).st_size:
                os.ftruncate(io.fd, io.length)
        else:
            _grow_l1(io, geo, refs, new_l1)
    except Unsupported as err:
        raise GenericError(f"Failed to discard cropped clusters: {err}") from None
    io.write(_HEADER_SIZE_OFFSET, struct.pack(">Q", new_size))
    return ResizeResult(new_size, geo.l1_size, geo.l1_table_offset, refs.free_hint)
