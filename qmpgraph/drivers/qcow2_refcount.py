"""qcow2 reference counts for the data path: lookups, cluster allocation, freeing.

``Refcounts`` keeps the refcount table in memory and caches refcount blocks;
every change is written through at once (the changed bytes only), so the
file is always consistent after each call returns, and a killed process
loses nothing that was acknowledged.

Allocation is first fit from a moving hint, as QEMU's ``alloc_clusters_noref``
does.  The crash-safe order holds throughout: a cluster's refcount is
written before anything points at it, and dropped only after the last
pointer to it was removed (callers do the pointer writes), so a crash can
leak clusters but never leaves a cluster referenced without a refcount.

A run of clusters that reaches into ranges without a refcount block is
allocated a few clusters longer: the new blocks go in front of the
returned clusters, each counting its range's part of the run, and are
written before the table entries that make them count.  When the refcount
table itself is too small, a new one is written past every covered range,
with the refcount blocks that describe it in front of it, and the header
is switched over in one 12-byte write before the old table is freed.

What does not live here: L1/L2 tables and guest data (``qcow2_io``).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import TYPE_CHECKING

from qmpgraph.drivers.qcow2_storage import HostFile, Qcow2Error, pread_full

if TYPE_CHECKING:
    from qmpgraph.drivers.qcow2_discard import FreedClusters

_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_HEADER_REFTABLE = 48  # refcount_table_offset (be64), refcount_table_clusters (be32)
_BLOCK_CACHE = 64  # refcount blocks kept in memory


class Refcounts:
    """The refcounts of one image file's clusters."""

    def __init__(
        self,
        host: HostFile,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
    ) -> None:
        self.host = host
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        self.per_block = self.cluster_size * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        count = table_clusters * self.cluster_size // 8
        raw = pread_full(host, table_offset, count * 8)
        self.table = list(struct.unpack(f">{count}Q", raw))
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.free_hint = 0
        #: Clusters freed while set are discarded in the file (qcow2_discard).
        self.discards: FreedClusters | None = None

    # -- refcount blocks ---------------------------------------------------

    def _block(self, index: int) -> bytearray | None:
        """Refcount block ``index`` (None where the table has none)."""
        blk = self._blocks.get(index)
        if blk is not None:
            self._blocks.move_to_end(index)
            return blk
        if index >= len(self.table) or not self.table[index] & _OFFSET_MASK:
            return None
        offset = self.table[index] & _OFFSET_MASK
        blk = bytearray(pread_full(self.host, offset, self.cluster_size))
        self._blocks[index] = blk
        if len(self._blocks) > _BLOCK_CACHE:
            self._blocks.popitem(last=False)
        return blk

    def _get_slot(self, blk: bytearray, slot: int) -> int:
        bits = self.bits
        if bits == 16:
            return (blk[2 * slot] << 8) | blk[2 * slot + 1]
        if bits >= 8:
            width = bits // 8
            return int.from_bytes(blk[slot * width : (slot + 1) * width], "big")
        bit = slot * bits
        return (blk[bit >> 3] >> (bit & 7)) & self.max_refcount

    def _set_slot(self, blk: bytearray, slot: int, value: int) -> tuple[int, int]:
        """Store ``value``; returns the byte span changed."""
        bits = self.bits
        if bits >= 8:
            width = bits // 8
            blk[slot * width : (slot + 1) * width] = value.to_bytes(width, "big")
            return slot * width, (slot + 1) * width
        bit = slot * bits
        shift = bit & 7
        mask = self.max_refcount << shift
        blk[bit >> 3] = (blk[bit >> 3] & ~mask & 0xFF) | ((value << shift) & mask)
        return bit >> 3, (bit >> 3) + 1

    def get(self, cluster: int) -> int:
        """The refcount of ``cluster`` (0 where no refcount block covers it)."""
        index, slot = divmod(cluster, self.per_block)
        blk = self._block(index)
        return 0 if blk is None else self._get_slot(blk, slot)

    # -- changes -----------------------------------------------------------

    def change(self, first: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcount of clusters [first, first + count).

        Each touched refcount block is written back once (its changed span).
        Every block must exist (``allocate`` creates them before use).
        """
        cluster, end = first, first + count
        while cluster < end:
            index, slot = divmod(cluster, self.per_block)
            blk = self._block(index)
            if blk is None:
                raise Qcow2Error(f"qcow2: no refcount block covers cluster {cluster}")
            stop = min(end, (index + 1) * self.per_block)
            lo, hi = len(blk), 0
            for s in range(slot, slot + stop - cluster):
                value = self._get_slot(blk, s) + delta
                if value < 0 or value > self.max_refcount:
                    raise Qcow2Error(
                        f"qcow2: refcount of cluster {index * self.per_block + s} "
                        f"would become {value}"
                    )
                a, b = self._set_slot(blk, s, value)
                lo, hi = min(lo, a), max(hi, b)
                if value == 0:
                    self.free_hint = min(self.free_hint, index * self.per_block + s)
                    if delta < 0 and self.discards is not None:
                        self.discards.freed(index * self.per_block + s)
            offset = self.table[index] & _OFFSET_MASK
            self.host.pwrite(offset + lo, bytes(blk[lo:hi]))
            cluster = stop

    def free_bytes(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster overlapping [offset, offset + length)."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        self.change(first, last - first + 1, -1)

    def _find_free(self, count: int) -> int:
        """The first cluster of a run of ``count`` free clusters at or after the hint."""
        cluster = start = self.free_hint
        run = 0
        per_block = self.per_block
        while run < count:
            index, slot = divmod(cluster, per_block)
            blk = self._block(index)
            if blk is None:
                # No block: every cluster of the range is free.
                run += per_block - slot
                cluster += per_block - slot
                continue
            if self._get_slot(blk, slot) == 0:
                run += 1
            else:
                run = 0
                start = cluster + 1
            cluster += 1
        return start

    def allocate(self, count: int) -> int:
        """Byte offset of ``count`` new contiguous clusters, refcount 1, written.

        Ranges of the run that have no refcount block yet get one each, in
        the clusters just before the returned ones (part of the same free
        run), so a run may span any number of ranges.
        """
        if self.discards is not None:
            # A freed cluster may come back: its discard goes first.
            self.discards.process()
        fast = self._allocate_at_hint(count)
        if fast is not None:
            return fast
        per_block = self.per_block
        extra = 0
        while True:
            start = self._find_free(count + extra)
            first_index = start // per_block
            last_index = (start + count + extra - 1) // per_block
            missing = [i for i in range(first_index, last_index + 1) if self._block(i) is None]
            if missing and missing[-1] >= len(self.table):
                self._grow_table(missing[-1])
                extra = 0
                continue
            if len(missing) <= extra:
                break
            extra = len(missing)
        total = count + len(missing)
        self._install_blocks(missing, start, total)
        # The rest of the run lies in ranges whose blocks existed before.
        cluster, end = start, start + total
        while cluster < end:
            index = cluster // per_block
            stop = min(end, (index + 1) * per_block)
            if index not in missing:
                self.change(cluster, stop - cluster, 1)
            cluster = stop
        self.free_hint = end
        return (start + len(missing)) << self.cluster_bits

    def _allocate_at_hint(self, count: int) -> int | None:
        """``allocate``'s common case in bulk byte operations: the ``count``
        clusters at the free hint are free and share one refcount block of
        whole-byte entries (a copy into a growing image).  The same result
        and the same one write as the general path; None (nothing changed)
        when the case does not apply."""
        if self.bits < 8:
            return None
        start = self.free_hint
        index, slot = divmod(start, self.per_block)
        if slot + count > self.per_block:
            return None
        blk = self._block(index)
        if blk is None:
            return None
        width = self.bits // 8
        lo, hi = slot * width, (slot + count) * width
        if blk.count(0, lo, hi) != hi - lo:
            return None
        blk[lo:hi] = (1).to_bytes(width, "big") * count
        self.host.pwrite((self.table[index] & _OFFSET_MASK) + lo, bytes(blk[lo:hi]))
        self.free_hint = start + count
        return start << self.cluster_bits

    def _install_blocks(self, indices: list[int], start: int, total: int) -> None:
        """New refcount blocks for ranges ``indices``, in clusters ``start``,
        ``start + 1``, ...; each counts the clusters of [start, start + total)
        in its range.  Blocks are written before the table entries."""
        per_block = self.per_block
        for j, index in enumerate(indices):
            blk = bytearray(self.cluster_size)
            lo = max(start, index * per_block)
            hi = min(start + total, (index + 1) * per_block)
            for cluster in range(lo, hi):
                self._set_slot(blk, cluster - index * per_block, 1)
            self.host.pwrite((start + j) << self.cluster_bits, blk)
            self._blocks[index] = blk
        for j, index in enumerate(indices):
            offset = (start + j) << self.cluster_bits
            self.table[index] = offset
            self.host.pwrite(self.table_offset + index * 8, struct.pack(">Q", offset))

    def _grow_table(self, needed_index: int) -> None:
        """A bigger refcount table (covering ``needed_index``), written past all ranges."""
        first = len(self.table)  # ranges from here on have no block: all free
        per_table_cluster = self.cluster_size // 8
        blocks = 1
        while True:
            entries = max(needed_index + 1, first + blocks)
            entries += entries // 2  # room to grow before the next move
            table_clusters = -(-entries // per_table_cluster)
            need = -(-(blocks + table_clusters) // self.per_block)
            if need <= blocks:
                break
            blocks = need
        region = first * self.per_block
        used = blocks + table_clusters
        new_table = self.table + [0] * (table_clusters * per_table_cluster - len(self.table))
        for i in range(blocks):
            blk = bytearray(self.cluster_size)
            lo = region + i * self.per_block
            for cluster in range(lo, min(region + used, lo + self.per_block)):
                self._set_slot(blk, cluster - lo, 1)
            offset = (region + i) << self.cluster_bits
            self.host.pwrite(offset, blk)
            new_table[first + i] = offset
        table_offset = (region + blocks) << self.cluster_bits
        self.host.pwrite(table_offset, struct.pack(f">{len(new_table)}Q", *new_table))
        # The new table must be durable before the header points at it.
        self.host.flush()
        self.host.pwrite(_HEADER_REFTABLE, struct.pack(">QI", table_offset, table_clusters))
        self.host.flush()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset, self.table_clusters = table_offset, table_clusters
        self._blocks.clear()
        self.change(old_offset >> self.cluster_bits, old_clusters, -1)

    def last_used_cluster(self, file_clusters: int) -> int:
        """The highest cluster below ``file_clusters`` with a nonzero refcount (-1: none)."""
        for cluster in range(file_clusters - 1, -1, -1):
            if self.get(cluster):
                return cluster
        return -1
