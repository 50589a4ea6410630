"""The qcow2 data path: guest reads and writes on a qcow2 image (synchronous).

``Qcow2Image(file, backing=..., data_file=...)`` opens an image over a
``HostFile`` (see ``qcow2_storage``) and offers what a block node needs:

* ``read(offset, length)`` / ``readinto(offset, buf)``: through the L1/L2
  tables; unallocated clusters read from the backing image (zeros past its
  end, or without one), zero clusters (v3 zero flag) as zeros, compressed
  clusters inflated (zlib raw deflate; zstd when the ``zstandard`` module is
  installed, else ``Qcow2Error``), data clusters from the image file or the
  external data file.  Contiguous host runs are read with one ``pread``.
* ``write(offset, data, fua=False)``: clusters with refcount 1 (the COPIED
  flag) are written in place; others (unallocated, zero, compressed, shared
  with a snapshot) get new clusters, one contiguous allocation per L2 table,
  filled with the old guest data around the written part (copy-on-write
  from the backing image, zeros, the inflated cluster, the shared cluster).
* ``write_zeroes(offset, length, may_unmap=False)``: zero flags on whole
  clusters (v3); explicit zeros for partial clusters and on v2 images.
* ``discard(offset, length)``: whole clusters (and the partial last cluster
  of the image), as QEMU's request discard: the entry becomes a zero
  cluster on v3, unallocated on v2 (reads the backing image again); the
  cluster is freed.  Discard is a no-op on images with a raw data file.
* ``flush()``, ``block_status(offset, length)`` (``Extent`` list),
  ``truncate(new_size)`` (see ``qcow2_truncate``), ``snapshots`` and
  ``snapshot(id_or_name)`` (a read-only view of an internal snapshot at its
  own virtual size, see ``qcow2_snapshot``).

Metadata is write-through: every call leaves the file consistent for
``qemu-img check`` when it returns, in QEMU's crash-safe order: refcounts
of new clusters first, then guest data, then L2 entries, then L1 entries,
then the refcounts of freed clusters.  Only ``flush`` (or ``fua``) syncs.
The dirty bit is never set: QEMU sets it only with lazy refcounts, which
this data path does not use (refcounts are always exact); a writable open
refuses an image whose dirty bit is set (``qemu-img check -r all`` repairs
it).  Unknown autoclear bits are cleared on a writable open, since their
data would go stale; ``bitmaps`` too, unless every stored bitmap is marked
in use (``qcow2_bitmaps``: stale by definition).

Thread safety: none; the caller serialises calls on one image (one lock
per image in an async layer that runs these calls in worker threads).
Not supported (refused at open with ``Qcow2Error``): extended L2 entries,
encryption.  Compressed writes are not done (writes to a compressed cluster
allocate a normal one).

What does not live here: header validation (``qcow2``), image creation
(``qcow2_image``), the block-resize command's own resize (``qcow2_resize``).
"""

from __future__ import annotations

import importlib
import os
import struct
import zlib
from collections import OrderedDict
from typing import Any

from qmpgraph.drivers import qcow2_bitmaps, qcow2_truncate
from qmpgraph.drivers.qcow2 import (
    AUTOCLEAR_DATA_FILE_RAW,
    INCOMPAT_DIRTY,
    Qcow2Header,
    header_read_length,
    parse_header,
)
from qmpgraph.drivers.qcow2_read import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    UNALLOCATED,
    ZERO,
    GuestMapping,
)
from qmpgraph.drivers.qcow2_refcount import Refcounts
from qmpgraph.drivers.qcow2_snapshot import SnapshotEntry, find_snapshot, read_snapshot_table
from qmpgraph.drivers.qcow2_storage import (
    BlockSource,
    Extent,
    FdFile,
    HostFile,
    Qcow2Error,
    RawImage,
    Status,
    pread_full,
)
from qmpgraph.errors import GenericError

_HEADER_AUTOCLEAR = 88
_L2_CACHE_BYTES = 32 << 20
_ZERO_CHUNK = 4 << 20

__all__ = [
    "BlockSource",
    "Extent",
    "FdFile",
    "HostFile",
    "Qcow2Error",
    "Qcow2Image",
    "RawImage",
    "Status",
    "open_image",
]


class Qcow2Image(GuestMapping):
    """A qcow2 image's guest data, read and written through its metadata.

    ``file`` holds the image (``HostFile``); ``backing`` is the backing image
    (any ``BlockSource``: another ``Qcow2Image``, a ``RawImage``), or None;
    ``data_file`` is the external data file, required when the header says
    there is one.  ``read_only`` refuses writes (and skips the open-time
    header updates).  ``barriers`` syncs the file between dependent
    metadata writes (new refcounts before the L2/L1 entries that use them,
    removed entries before the refcounts they held are dropped), so the
    image stays consistent across a power loss too, at the cost of a sync
    per allocating request; without it, the order holds for the page cache
    (a killed process), and ``flush`` makes everything durable.  Errors:
    ``qmpgraph.errors.GenericError`` with QEMU's messages for a bad header,
    ``Qcow2Error`` for what the data path cannot do, ``ValueError`` for
    requests past the end of the image.
    """

    def __init__(
        self,
        file: HostFile,
        *,
        backing: BlockSource | None = None,
        data_file: HostFile | None = None,
        read_only: bool = False,
        barriers: bool = False,
    ) -> None:
        self.image = self
        self.barriers = barriers
        self.host = file
        self.backing_source = backing
        self.read_only = read_only
        self._owned: list[Any] = []
        raw = pread_full(file, 0, 4096)
        need = header_read_length(raw)
        if need > len(raw):
            raw = pread_full(file, 0, need)
        header = parse_header(raw, writable=not read_only)
        self.header: Qcow2Header = header
        if header.extended_l2:
            raise Qcow2Error("qcow2 images with extended L2 entries are not supported")
        if header.crypt_method:
            raise Qcow2Error("encrypted qcow2 images are not supported")
        if header.incompatible_features & INCOMPAT_DIRTY and not read_only:
            raise Qcow2Error(
                "qcow2 image is dirty (lazy refcounts); repair it with 'qemu-img check -r all'"
            )
        if header.has_data_file and data_file is None:
            raise GenericError("'data-file' is required for this image")
        self.data_host: HostFile = data_file if header.has_data_file and data_file else file
        self.external_data = header.has_data_file
        self.data_raw = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.l2_bits = header.l2_bits
        self.l2_entries = 1 << self.l2_bits
        self.size = header.size // 512 * 512
        self.l1_offset = header.l1_table_offset
        self.l1 = list(struct.unpack(f">{header.l1_size}Q", pread_full(
            file, header.l1_table_offset, header.l1_size * 8)))  # fmt: skip
        rt_offset, rt_clusters = struct.unpack_from(">QI", raw.ljust(60, b"\0"), 48)
        self.refcounts = Refcounts(
            file,
            cluster_bits=self.cluster_bits,
            refcount_order=header.refcount_order,
            table_offset=rt_offset,
            table_clusters=rt_clusters,
        )
        self._l2_cache: OrderedDict[int, list[int]] = OrderedDict()
        self._l2_cache_max = max(16, _L2_CACHE_BYTES // self.cluster_size)
        self._inflated: tuple[int, bytes] = (-1, b"")
        self.snapshots: tuple[SnapshotEntry, ...] = read_snapshot_table(
            file, header.snapshots_offset, header.nb_snapshots
        )
        self._views: dict[str, Qcow2Snapshot] = {}
        # Compressed entries: host offset bits, then (sectors - 1).
        self._csize_shift = 62 - (self.cluster_bits - 8)
        self._csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        unknown_autoclear = header.autoclear_features & ~AUTOCLEAR_DATA_FILE_RAW
        if unknown_autoclear & qcow2_bitmaps.AUTOCLEAR_BITMAPS and qcow2_bitmaps.all_in_use(
            file, raw
        ):
            # Bitmaps marked in use are stale by definition: the extension may stay.
            unknown_autoclear &= ~qcow2_bitmaps.AUTOCLEAR_BITMAPS
        if not read_only and header.version >= 3 and unknown_autoclear:
            kept = header.autoclear_features & ~unknown_autoclear
            file.pwrite(_HEADER_AUTOCLEAR, struct.pack(">Q", kept))

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close what ``open_image`` opened for this image (files, backing chain)."""
        for obj in reversed(self._owned):
            obj.close()
        self._owned.clear()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata access ---------------------------------------------------

    def _l2(self, offset: int) -> list[int]:
        """The L2 table at host ``offset`` (cached; always equal to the file)."""
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        raw = pread_full(self.host, offset, self.cluster_size)
        table = list(struct.unpack(f">{self.l2_entries}Q", raw))
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return table

    def _write_l2(self, offset: int, table: list[int], lo: int, hi: int) -> None:
        """Write entries [lo, hi) of the L2 table at ``offset``."""
        if hi > lo:
            self.host.pwrite(offset + lo * 8, struct.pack(f">{hi - lo}Q", *table[lo:hi]))

    def _set_l1(self, index: int, entry: int) -> None:
        self.l1[index] = entry
        self.host.pwrite(self.l1_offset + index * 8, struct.pack(">Q", entry))

    def _l2_for_write(self, l1_index: int) -> tuple[int, list[int]]:
        """The active L2 table for ``l1_index``, allocated or copied when shared."""
        entry = self.l1[l1_index]
        old = entry & OFFSET_MASK
        if old and entry & OFLAG_COPIED:
            return old, self._l2(old)
        content = list(self._l2(old)) if old else [0] * self.l2_entries
        new = self.refcounts.allocate(1)
        self.host.pwrite(new, struct.pack(f">{self.l2_entries}Q", *content))
        self._l2_cache[new] = content
        self._barrier()
        self._set_l1(l1_index, new | OFLAG_COPIED)
        if old:
            self._barrier()
            self.refcounts.free_bytes(old, self.cluster_size)
        return new, content

    def _barrier(self) -> None:
        """With ``barriers``, make earlier writes durable before the next ones."""
        if self.barriers:
            self.flush()

    def _has_host_or_compressed(self, entry: int) -> bool:
        return bool(entry & OFLAG_COMPRESSED) or self._has_host(entry)

    def _has_host(self, entry: int) -> bool:
        """Whether a (not compressed) L2 entry has a host cluster."""
        if entry & OFFSET_MASK:
            return True
        return self.external_data and bool(entry & OFLAG_COPIED)

    def _free_entry(self, entry: int) -> None:
        """Drop the reference an L2 entry held on its host cluster (qcow2_free_any_cluster)."""
        if entry & OFLAG_COMPRESSED:
            offset = entry & self._coffset_mask & ~511
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            self.refcounts.free_bytes(offset, sectors * 512)
        elif entry & OFFSET_MASK and not self.external_data:
            self.refcounts.free_bytes(entry & OFFSET_MASK, self.cluster_size)

    # -- reads -------------------------------------------------------------

    def _read_backing(self, dst: memoryview, guest: int) -> None:
        backing = self.backing_source
        n = 0 if backing is None else max(0, min(len(dst), backing.size - guest))
        if n and backing is not None:
            dst[:n] = backing.read(guest, n)
        if n < len(dst):
            dst[n:] = bytes(len(dst) - n)

    def _backing_status(self, guest: int, length: int) -> list[Extent]:
        backing = self.backing_source
        n = 0 if backing is None else max(0, min(length, backing.size - guest))
        out: list[Extent] = []
        if n and backing is not None:
            for ext in backing.block_status(guest, n):
                flags = ext.flags & ~Status.ALLOCATED
                depth = ext.depth + 1 if ext.depth else 0
                out.append(Extent(ext.offset, ext.length, Status(flags), depth))
        if n < length:
            out.append(Extent(guest + n, length - n, Status.ZERO, 0))
        return out

    def _inflate(self, entry: int) -> bytes:
        """The guest cluster a compressed L2 entry holds."""
        if self._inflated[0] == entry:
            return self._inflated[1]
        coffset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        csize = sectors * 512 - (coffset & 511)
        data = pread_full(self.host, coffset, csize)
        if self.header.compression_type == 0:
            try:
                out = zlib.decompressobj(-12).decompress(data, self.cluster_size)
            except zlib.error as err:
                raise Qcow2Error(f"qcow2: bad compressed cluster: {err}") from None
        else:
            out = _zstd_decompress(data, self.cluster_size)
        if len(out) != self.cluster_size:
            raise Qcow2Error("qcow2: compressed cluster does not inflate to a whole cluster")
        self._inflated = (entry, out)
        return out

    # -- writes ------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise Qcow2Error("qcow2 image is open read-only")

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data`` at guest ``offset`` (allocating, copying on write)."""
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        shift = self.cluster_bits + self.l2_bits
        pos, end = offset, offset + len(view)
        while pos < end:
            l1_index = pos >> shift
            stop = min(end, (l1_index + 1) << shift)
            self._write_slice(l1_index, pos, view[pos - offset : stop - offset])
            pos = stop
        if fua:
            self.flush()

    def _write_slice(self, l1_index: int, pos: int, data: memoryview) -> None:
        """A write within one L2 table's range."""
        cb, cs = self.cluster_bits, self.cluster_size
        end = pos + len(data)
        first, last = pos >> cb, (end - 1) >> cb
        table_offset, table = self._l2_for_write(l1_index)
        base = first & (self.l2_entries - 1)
        entries = table[base : base + last - first + 1]
        if self._write_simple(table_offset, table, base, entries, pos=pos, data=data):
            return
        v3 = self.header.version >= 3
        # fresh: needs a new host cluster; filled: written whole (fresh, or
        # an allocated zero cluster whose unwritten part must become zeros).
        fresh = [
            not (e & OFLAG_COPIED) or bool(e & OFLAG_COMPRESSED) or not self._has_host(e)
            for e in entries
        ]
        filled = [f or (v3 and bool(e & OFLAG_ZERO)) for f, e in zip(fresh, entries, strict=True)]
        # Old guest data around the written part, read before the L2 changes.
        head = tail = b""
        if filled[0] and pos > first << cb:
            head = self.read(first << cb, pos - (first << cb))
        last_end = (last + 1) << cb
        if filled[-1] and end < last_end:
            tail = self.read(end, max(0, min(last_end, self.size) - end))
            tail += bytes(last_end - end - len(tail))
        count = sum(fresh)
        next_host = 0
        if count and not self.external_data:
            next_host = self.refcounts.allocate(count)
        # Gather the host writes, merging contiguous ones.
        segments: list[tuple[int, list[Any]]] = []
        seg_end = -1
        for i, entry in enumerate(entries):
            cluster = first + i
            lo = max(pos, cluster << cb)
            hi = min(end, (cluster + 1) << cb)
            chunk = data[lo - pos : hi - pos]
            if filled[i]:
                if not fresh[i]:
                    host = entry & OFFSET_MASK
                elif self.external_data:
                    host = cluster << cb
                else:
                    host, next_host = next_host, next_host + cs
                before = head if i == 0 else b""
                after = tail if cluster == last else b""
                if not fresh[i]:
                    before, after = bytes(len(before)), bytes(len(after))
                bufs: list[Any] = [before, chunk, after]
                start = host
                table[base + i] = host | OFLAG_COPIED
            else:
                start = (entry & OFFSET_MASK) + (lo & (cs - 1))
                bufs = [chunk]
            if start == seg_end:
                segments[-1][1].extend(bufs)
            else:
                segments.append((start, bufs))
            seg_end = start + sum(len(b) for b in bufs)
        writev = getattr(self.data_host, "pwritev", None)
        for start, bufs in segments:
            parts = [b for b in bufs if len(b)]
            if len(parts) == 1:
                self.data_host.pwrite(start, parts[0])
            elif writev is not None:
                writev(start, parts)
            else:
                self.data_host.pwrite(start, b"".join(parts))
        changed = [i for i, e in enumerate(entries) if table[base + i] != e]
        if changed:
            if count:
                self._barrier()
            self._write_l2(table_offset, table, base + changed[0], base + changed[-1] + 1)
        freed = [
            entries[i] for i in changed if fresh[i] and self._has_host_or_compressed(entries[i])
        ]
        if freed:
            self._barrier()
        for entry in freed:
            self._free_entry(entry)

    def _write_simple(
        self,
        table_offset: int,
        table: list[int],
        base: int,
        entries: list[int],
        *,
        pos: int,
        data: memoryview,
    ) -> bool:
        """The two common cases of ``_write_slice`` without its per-cluster
        bookkeeping; False (nothing done) for every other case.

        Whole unallocated clusters (a copy into a fresh image): one run of
        new clusters, one data write, then the L2 entries.  Clusters written
        in place (COPIED, contiguous on the host): one data write, no
        metadata.  The order of writes is the general path's.
        """
        cs = self.cluster_size
        n = len(entries)
        first = entries[0]
        if not first and not self.external_data:
            if (pos | len(data)) & (cs - 1) or any(entries):
                return False
            host = self.refcounts.allocate(n)
            self.data_host.pwrite(host, data)
            new = host | OFLAG_COPIED
            table[base : base + n] = range(new, new + n * cs, cs)
            self._barrier()
            self._write_l2(table_offset, table, base, base + n)
            return True
        host = first & OFFSET_MASK
        if (
            host
            and first & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_COPIED
            and (n == 1 or entries == list(range(first, first + n * cs, cs)))
        ):
            self.data_host.pwrite(host + (pos & (cs - 1)), data)
            return True
        return False

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make [offset, offset + length) read as zeros, as qcow2_co_pwrite_zeroes.

        Whole clusters of a v3 image get the zero flag (their host cluster is
        kept when allocated, unless ``may_unmap``).  A piece of a cluster
        does too, for the whole cluster, when the rest of the cluster reads
        as zeros and this layer holds no data there; otherwise zeros are
        written over the piece (QEMU's fallback).  v2 images and images with
        a raw data file get explicit zeros where the range does not already
        read as zeros.
        """
        self._check_writable()
        self._check_range(offset, length)
        cs = self.cluster_size
        end = offset + length
        if self.header.version < 3 or self.data_raw:
            self._write_zero_bytes(offset, end)
            return
        start = -(-offset // cs) * cs
        stop = end if end == self.size else end // cs * cs
        if stop <= start:
            # No whole cluster: the piece up to the next boundary, then the rest.
            boundary = min(end, start)
            self._zero_piece(offset, boundary, may_unmap)
            self._zero_piece(boundary, end, may_unmap)
            return
        self._zero_piece(offset, start, may_unmap)
        self._zero_clusters(start, stop, unmap=may_unmap)
        self._zero_piece(stop, end, may_unmap)

    def _zero_piece(self, start: int, stop: int, may_unmap: bool) -> None:
        """Zero [start, stop) inside one cluster (qcow2's misaligned zero write)."""
        if stop <= start:
            return
        first = start - start % self.cluster_size
        last = min(first + self.cluster_size, self.size)
        if self._reads_zero(first, start) and self._reads_zero(stop, last):
            kind = self._runs(first, last - first)[0][0]
            if kind in (UNALLOCATED, ZERO):
                self._zero_clusters(first, last, unmap=may_unmap)
                return
        self.write(start, bytes(stop - start))

    def _reads_zero(self, start: int, stop: int) -> bool:
        """Whether [start, stop) reads as zeros by block status (QEMU's is_zero)."""
        if stop <= start:
            return True
        return all(ext.flags & Status.ZERO for ext in self.block_status(start, stop - start))

    def _write_zero_bytes(self, start: int, stop: int) -> None:
        """Write zeros where [start, stop) does not read as zeros already."""
        if stop <= start:
            return
        for ext in self.block_status(start, stop - start):
            if ext.flags & Status.ZERO:
                continue
            pos = ext.offset
            while pos < ext.offset + ext.length:
                n = min(_ZERO_CHUNK, ext.offset + ext.length - pos)
                self.write(pos, bytes(n))
                pos += n

    def _zero_clusters(self, start: int, stop: int, *, unmap: bool) -> None:
        """Zero flags on the clusters of [start, stop) (cluster aligned, v3)."""

        def new_entry(entry: int) -> int:
            # Unallocated clusters get the flag too, backing file or not, as
            # QEMU's zero_in_l2_slice does (qemu-img map shows them present).
            host = self._has_host(entry)
            keep = not unmap and host and entry & OFLAG_COPIED and not entry & OFLAG_COMPRESSED
            return (entry | OFLAG_ZERO) if keep else OFLAG_ZERO

        self._rewrite_entries(start, stop, new_entry, need_table=True)

    def discard(self, offset: int, length: int) -> None:
        """Discard the whole clusters of [offset, offset + length), as QEMU's discard."""
        self._check_writable()
        self._check_range(offset, length)
        if self.data_raw:
            return
        cs = self.cluster_size
        end = offset + length
        start = -(-offset // cs) * cs
        stop = end if end == self.size else end // cs * cs
        if stop <= start:
            return
        self._discard_clusters(start, stop, full=False)

    def _discard_clusters(self, start: int, stop: int, *, full: bool) -> None:
        v3 = self.header.version >= 3
        has_backing = self.backing_source is not None

        def new_entry(entry: int) -> int:
            if full:
                return 0
            # Unallocated without a backing file, or already a zero cluster:
            # it reads as zeros already.
            if (
                not self._has_host(entry)
                and not entry & OFLAG_COMPRESSED
                and (not has_backing or (v3 and entry & OFLAG_ZERO))
            ):
                return entry
            return OFLAG_ZERO if v3 else 0

        self._rewrite_entries(start, stop, new_entry, need_table=has_backing and v3 and not full)

    def _rewrite_entries(self, start: int, stop: int, new_entry: Any, *, need_table: bool) -> None:
        """Apply ``new_entry(old) -> new`` to the L2 entries of [start, stop), freeing
        the host clusters of replaced entries after the L2 write."""
        cb = self.cluster_bits
        cluster, last = start >> cb, (stop - 1) >> cb
        while cluster <= last:
            l1_index = cluster >> self.l2_bits
            table_stop = min(last, ((l1_index + 1) << self.l2_bits) - 1)
            base = cluster & (self.l2_entries - 1)
            count = table_stop - cluster + 1
            l2_offset = self.l1[l1_index] & OFFSET_MASK
            old_table = self._l2(l2_offset) if l2_offset else [0] * self.l2_entries
            olds = old_table[base : base + count]
            news = [new_entry(e) for e in olds]
            if news != olds and (l2_offset or need_table):
                table_offset, table = self._l2_for_write(l1_index)
                olds = table[base : base + count]
                news = [new_entry(e) for e in olds]
                table[base : base + count] = news
                changed = [i for i in range(count) if news[i] != olds[i]]
                if changed:
                    self._write_l2(table_offset, table, base + changed[0], base + changed[-1] + 1)
                    self._barrier()
                for i in changed:
                    if olds[i] & (OFFSET_MASK | OFLAG_COMPRESSED) and (
                        news[i] & OFFSET_MASK != olds[i] & OFFSET_MASK or olds[i] & OFLAG_COMPRESSED
                    ):
                        self._free_entry(olds[i])
            cluster = table_stop + 1

    def flush(self) -> None:
        """Make every completed write durable (data file first, then the image)."""
        if self.data_host is not self.host:
            self.data_host.flush()
        self.host.flush()

    def truncate(self, new_size: int) -> None:
        """Resize the image (see ``qcow2_truncate.truncate`` for the rules)."""
        self._check_writable()
        qcow2_truncate.truncate(self, new_size)

    # -- snapshots ---------------------------------------------------------

    def snapshot(self, id_or_name: str) -> Qcow2Snapshot:
        """A read-only view of the internal snapshot with this id (or else name).

        Views are kept: a snapshot's L1 table never changes while the
        snapshot exists, and this image's table is read once at open.
        """
        view = self._views.get(id_or_name)
        if view is not None:
            return view
        entry = find_snapshot(self.snapshots, id_or_name)
        if entry is None:
            raise Qcow2Error(f"Can't find snapshot '{id_or_name}'")
        view = self._views[id_or_name] = Qcow2Snapshot(self, entry)
        return view


class Qcow2Snapshot(GuestMapping):
    """An internal snapshot's guest data, read-only, at the snapshot's own size.

    Unallocated clusters read through the image's backing file, as QEMU's
    ``bdrv_snapshot_load_tmp`` does.  The view stays valid while the active
    layer is written (writes never touch clusters a snapshot shares).
    """

    def __init__(self, image: Qcow2Image, entry: SnapshotEntry) -> None:
        self.image = image
        self.entry = entry
        self.size = (entry.disk_size if entry.disk_size is not None else image.size) // 512 * 512
        raw = pread_full(image.host, entry.l1_table_offset, entry.l1_size * 8)
        self.l1 = list(struct.unpack(f">{entry.l1_size}Q", raw))

    def close(self) -> None:
        """Nothing to release (the image owns the files)."""


def _zstd_decompress(data: bytes, size: int) -> bytes:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        raise Qcow2Error(
            "qcow2: zstd-compressed clusters need the 'zstandard' Python module"
        ) from None
    # QEMU writes one zstd frame per cluster, possibly without a content size.
    out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return bytes(out[:size])


def open_image(path: str | os.PathLike[str], *, read_only: bool = False) -> Qcow2Image:
    """Open a qcow2 image file and, from its header, its backing chain (read-only).

    A backing file name is relative to the image's directory; its format is
    the header's backing format (probed from the magic when absent: qcow2
    or raw).  An external data file is opened by its header name, relative
    to the image's directory.  ``close()`` closes them all.
    """
    path = os.fspath(path)
    host = FdFile.open(path, read_only=read_only)
    owned: list[Any] = [host]
    try:
        probe = Qcow2Image(host, read_only=True, data_file=host)
        header = probe.header
        base = os.path.dirname(path)
        backing: BlockSource | None = None
        if header.backing_file:
            backing = _open_backing(os.path.join(base, header.backing_file), header.backing_format)
            owned.append(backing)
        data_file: HostFile | None = None
        if header.has_data_file and header.data_file:
            data = FdFile.open(os.path.join(base, header.data_file), read_only=read_only)
            owned.append(data)
            data_file = data
        image = Qcow2Image(host, backing=backing, data_file=data_file, read_only=read_only)
    except BaseException:
        for obj in reversed(owned):
            obj.close()
        raise
    image._owned = owned
    return image


def _open_backing(path: str, fmt: str | None) -> BlockSource:
    """A backing image, read-only: qcow2 (with its own chain) or raw."""
    if fmt not in (None, "raw", "qcow2"):
        raise Qcow2Error(f"unsupported backing format '{fmt}'")
    if fmt is None:
        with open(path, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    if fmt == "raw":
        return RawImage(FdFile.open(path, read_only=True), owned=True)
    return open_image(path, read_only=True)
