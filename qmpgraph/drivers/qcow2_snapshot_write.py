"""Creating and deleting qcow2 internal snapshots (qcow2_snapshot_create/_delete).

``create_snapshot(host, ...)`` and ``delete_snapshot(host, ...)`` change an
image file in place, through any ``HostFile``, in QEMU 7.2's order:

* create: a new snapshot id (the largest numeric id plus one), a copy of
  the active L1 table in new clusters, then one more reference on every L2
  table and data cluster the active L1 reaches (COPIED flags cleared in the
  active L2 and L1 tables, since those clusters are now shared), then the
  snapshot table rewritten with the new entry appended;
* delete: the snapshot table rewritten without the entry, then one reference
  less on everything the snapshot's L1 reaches, its L1 table freed, and the
  COPIED flags of the active tables recomputed (a cluster whose refcount fell
  back to 1 is the active layer's alone again).

The snapshot table is always written to newly allocated clusters, synced,
and then made current with one 12-byte header write (``nb_snapshots`` and
``snapshots_offset``), before the old table is freed; with no snapshot left
both fields are 0.  Entries are written as QEMU writes them: 24 bytes of
extra data (large VM state size, disk size, icount; unknown extra data of
older entries is kept after them).

Reads of guest data through a snapshot live in ``qcow2_io``
(``Qcow2Image.snapshot``); the table's parser in ``qcow2_snapshot``.  What
does not live here: VM state, ``snapshot -a`` (revert), extended L2 entries
and external data files (refused with ``Qcow2Error``, errno ENOTSUP).
"""

from __future__ import annotations

import errno
import re
import struct
from collections import Counter
from dataclasses import dataclass

from qmpgraph.drivers.qcow2 import (
    Qcow2Header,
    header_read_length,
    parse_header,
)
from qmpgraph.drivers.qcow2_discard import FreedClusters
from qmpgraph.drivers.qcow2_read import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED
from qmpgraph.drivers.qcow2_refcount import Refcounts
from qmpgraph.drivers.qcow2_snapshot import SnapshotEntry
from qmpgraph.drivers.qcow2_storage import HostFile, Qcow2Error, pread_full

_ENTRY_HEADER = ">QIHHIIQII"
_ENTRY_HEADER_LEN = 40
_EXTRA_LEN = 24  # sizeof(QCowSnapshotExtraData) in QEMU 7.2
_HEADER_SNAPSHOTS = 60  # nb_snapshots (be32), snapshots_offset (be64)
_MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
_MAX_TABLE = 64 << 20  # QCOW_MAX_SNAPSHOTS_SIZE
_NO_ICOUNT = (1 << 64) - 1
_LEADING_NUMBER = re.compile(r"\s*\+?(\d+)")


class SnapshotFailed(Qcow2Error):
    """A snapshot operation failed with an errno, as QEMU's driver returns it."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


@dataclass(slots=True)
class _Entry:
    """One snapshot table entry as QEMU keeps it in memory (QCowSnapshot)."""

    l1_table_offset: int
    l1_size: int
    id: bytes
    name: bytes
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int
    unknown_extra: bytes

    def public(self) -> SnapshotEntry:
        return SnapshotEntry(
            id=self.id.decode("utf-8", "replace"),
            name=self.name.decode("utf-8", "replace"),
            l1_table_offset=self.l1_table_offset,
            l1_size=self.l1_size,
            disk_size=self.disk_size,
            vm_state_size=self.vm_state_size,
            date_sec=self.date_sec,
            date_nsec=self.date_nsec,
            vm_clock_nsec=self.vm_clock_nsec,
            icount=None if self.icount == _NO_ICOUNT else self.icount,
        )

    def encode(self) -> bytes:
        vm32 = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        head = struct.pack(
            _ENTRY_HEADER,
            self.l1_table_offset,
            self.l1_size,
            len(self.id),
            len(self.name),
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            vm32,
            _EXTRA_LEN + len(self.unknown_extra),
        )
        extra = struct.pack(">QQQ", self.vm_state_size, self.disk_size, self.icount)
        return head + extra + self.unknown_extra + self.id + self.name


class _WholeBlocks(Refcounts):
    """Refcounts whose changed blocks are also written back whole at the end
    (``write_back``), as QEMU's refcount-block cache writes clusters: in a
    sparse image file that allocates the whole block, as qsd's actual-size
    shows."""

    def __init__(self, host: HostFile, **kwargs: int) -> None:
        super().__init__(host, **kwargs)
        self.touched: set[int] = set()

    def change(self, first: int, count: int, delta: int) -> None:
        super().change(first, count, delta)
        if count > 0:
            per = self.per_block
            self.touched.update(range(first // per, (first + count - 1) // per + 1))

    def write_back(self) -> None:
        """Write every changed refcount block whole."""
        for index in sorted(self.touched):
            if index < len(self.table) and self.table[index] & OFFSET_MASK:
                offset = self.table[index] & OFFSET_MASK
                self.host.pwrite(offset, pread_full(self.host, offset, self.cluster_size))
        self.touched.clear()


class _Image:
    """What a snapshot operation needs of an image: header, refcounts, tables."""

    def __init__(self, host: HostFile) -> None:
        self.host = host
        raw = pread_full(host, 0, 4096)
        need = header_read_length(raw)
        if need > len(raw):
            raw = pread_full(host, 0, need)
        header: Qcow2Header = parse_header(raw, writable=True)
        if header.has_data_file or header.extended_l2 or header.crypt_method:
            raise SnapshotFailed(errno.ENOTSUP)
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = 1 << header.l2_bits
        rt_offset, rt_clusters = struct.unpack_from(">QI", raw.ljust(60, b"\0"), 48)
        self.refcounts = _WholeBlocks(
            host,
            cluster_bits=header.cluster_bits,
            refcount_order=header.refcount_order,
            table_offset=rt_offset,
            table_clusters=rt_clusters,
        )
        csize_shift = 62 - (header.cluster_bits - 8)
        self._csize_shift = csize_shift
        self._csize_mask = (1 << (header.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << csize_shift) - 1
        self.entries = self._read_entries(header.snapshots_offset, header.nb_snapshots)

    def _read_entries(self, offset: int, count: int) -> list[_Entry]:
        out: list[_Entry] = []
        host = self.host
        for _ in range(count):
            offset = (offset + 7) & ~7
            fields = struct.unpack(_ENTRY_HEADER, pread_full(host, offset, _ENTRY_HEADER_LEN))
            l1_offset, l1_size, id_len, name_len, sec, nsec, clock, vm32, extra_len = fields
            offset += _ENTRY_HEADER_LEN
            extra = pread_full(host, offset, extra_len)
            offset += extra_len
            vm_state = struct.unpack_from(">Q", extra, 0)[0] if extra_len >= 8 else vm32
            # Missing fields: what QEMU's qcow2_read_snapshots assumes.
            disk = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else None
            if disk is None:
                disk = self.header.size // 512 * 512
            icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else _NO_ICOUNT
            text = pread_full(host, offset, id_len + name_len)
            offset += id_len + name_len
            out.append(
                _Entry(
                    l1_offset,
                    l1_size,
                    text[:id_len],
                    text[id_len:],
                    sec,
                    nsec,
                    clock,
                    vm_state,
                    disk,
                    icount,
                    extra[_EXTRA_LEN:],
                )
            )
        return out

    # -- the snapshot table ------------------------------------------------

    def write_table(self) -> None:
        """qcow2_write_snapshots: the table in new clusters, then the header."""
        blob = bytearray()
        for entry in self.entries:
            blob += bytes(-len(blob) % 8)
            blob += entry.encode()
            if len(blob) > _MAX_TABLE:
                raise SnapshotFailed(errno.EFBIG)
        offset = 0
        if self.entries:
            offset = self.refcounts.allocate(-(-len(blob) // self.cluster_size))
            self.host.pwrite(offset, bytes(blob))
        self.host.flush()
        old_offset, old_count = self.header.snapshots_offset, self.header.nb_snapshots
        old_size = self._table_size(old_offset, old_count)
        self.host.pwrite(_HEADER_SNAPSHOTS, struct.pack(">IQ", len(self.entries), offset))
        self.host.flush()
        if old_count and old_size:
            self.refcounts.free_bytes(old_offset, old_size)

    def _table_size(self, offset: int, count: int) -> int:
        """Byte length of the table as stored (each entry's own lengths)."""
        pos = offset
        for _ in range(count):
            pos = (pos + 7) & ~7
            fields = struct.unpack(_ENTRY_HEADER, pread_full(self.host, pos, _ENTRY_HEADER_LEN))
            pos += _ENTRY_HEADER_LEN + fields[8] + fields[2] + fields[3]
        return pos - offset

    # -- refcounts through an L1 table -------------------------------------

    def _read_l1(self, offset: int, size: int) -> list[int]:
        return list(struct.unpack(f">{size}Q", pread_full(self.host, offset, size * 8)))

    def _l2_table(self, offset: int) -> list[int]:
        raw = pread_full(self.host, offset, self.cluster_size)
        return list(struct.unpack(f">{self.l2_entries}Q", raw))

    def update_refcounts(self, l1_offset: int, l1_size: int, addend: int) -> None:
        """qcow2_update_snapshot_refcount: add ``addend`` to every cluster the L1
        table at ``l1_offset`` reaches, and recompute the COPIED flags of its
        L2 and L1 entries (set where the refcount is exactly 1).

        The refcount changes are gathered first and written in runs (one
        write per refcount block and run, not one per cluster); then the
        flags are rewritten, skipping L2 tables that this call freed.
        """
        cb = self.cluster_bits
        l1 = self._read_l1(l1_offset, l1_size)
        tables = [(i, e & OFFSET_MASK) for i, e in enumerate(l1) if e & OFFSET_MASK]
        if addend:
            counts: Counter[int] = Counter()
            for _, l2_offset in tables:
                counts[l2_offset >> cb] += 1
                for entry in self._l2_table(l2_offset):
                    if entry & OFLAG_COMPRESSED:
                        coffset = entry & self._coffset_mask & ~511
                        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
                        first = coffset >> cb
                        for cluster in range(first, ((coffset + sectors * 512 - 1) >> cb) + 1):
                            counts[cluster] += 1
                    elif entry & OFFSET_MASK:
                        if entry & OFFSET_MASK & (self.cluster_size - 1):
                            raise SnapshotFailed(errno.EIO, "qcow2: misaligned data cluster")
                        counts[(entry & OFFSET_MASK) >> cb] += 1
            self._apply(counts, addend)
        rc = self.refcounts
        l1_changed = False
        for i, l2_offset in tables:
            refcount = rc.get(l2_offset >> cb)
            if refcount:
                table = self._l2_table(l2_offset)
                new = [
                    e
                    if e & OFLAG_COMPRESSED
                    else (
                        e | OFLAG_COPIED
                        if e & OFFSET_MASK and rc.get((e & OFFSET_MASK) >> cb) == 1
                        else e & ~OFLAG_COPIED
                    )
                    for e in table
                ]
                if new != table:
                    self.host.pwrite(l2_offset, struct.pack(f">{self.l2_entries}Q", *new))
            new_l1 = l2_offset | (OFLAG_COPIED if refcount == 1 else 0)
            if new_l1 != l1[i]:
                l1[i] = new_l1
                l1_changed = True
        if l1_changed:
            self.host.pwrite(l1_offset, struct.pack(f">{l1_size}Q", *l1))
            self.host.flush()

    def _apply(self, counts: Counter[int], addend: int) -> None:
        """Add ``addend`` times each cluster's count, in runs of equal counts."""
        run_start = run_len = run_count = 0
        for cluster in sorted(counts):
            count = counts[cluster]
            if run_len and cluster == run_start + run_len and count == run_count:
                run_len += 1
                continue
            if run_len:
                self.refcounts.change(run_start, run_len, addend * run_count)
            run_start, run_len, run_count = cluster, 1, count
        if run_len:
            self.refcounts.change(run_start, run_len, addend * run_count)


def _new_id(entries: list[_Entry]) -> bytes:
    """find_new_snapshot_id: one more than the largest leading number of an id."""
    top = 0
    for entry in entries:
        match = _LEADING_NUMBER.match(entry.id.decode("utf-8", "replace"))
        if match:
            top = max(top, int(match.group(1)))
    return str(top + 1).encode()


def create_snapshot(
    host: HostFile,
    name: str | bytes,
    *,
    date_sec: int,
    date_nsec: int,
    vm_clock_nsec: int = 0,
    icount: int | None = None,
    discards: FreedClusters | None = None,
) -> SnapshotEntry:
    """qcow2_snapshot_create (no VM state): take a snapshot of the active layer.

    ``name`` is stored as given, its UTF-8 bytes or raw bytes (the caller
    truncates it as QEMU's 256-byte buffer would, even inside a character).
    Errors: ``SnapshotFailed`` with QEMU's errno (EFBIG for too many
    snapshots, ENOTSUP for images this library cannot snapshot, EINVAL when a
    refcount would overflow, as update_refcount).  The old snapshot table
    it frees (QCOW2_DISCARD_SNAPSHOT) is recorded in ``discards`` if given.
    """
    img = _Image(host)
    header = img.header
    if len(img.entries) >= _MAX_SNAPSHOTS:
        raise SnapshotFailed(errno.EFBIG)
    ident = _new_id(img.entries)
    l1_size, l1_offset = header.l1_size, header.l1_table_offset
    snap_l1 = img.refcounts.allocate(-(-(l1_size * 8) // img.cluster_size)) if l1_size else 0
    if l1_size:
        host.pwrite(snap_l1, pread_full(host, l1_offset, l1_size * 8))
    try:
        img.update_refcounts(l1_offset, l1_size, 1)
    except Qcow2Error as err:
        if "would become" in str(err):
            raise SnapshotFailed(errno.EINVAL) from err
        raise
    # Everything the new table points at must be durable before it is current.
    host.flush()
    entry = _Entry(
        snap_l1,
        l1_size,
        ident,
        name.encode() if isinstance(name, str) else name,
        date_sec,
        date_nsec,
        vm_clock_nsec,
        0,
        header.size // 512 * 512,
        _NO_ICOUNT if icount is None else icount,
        b"",
    )
    img.entries.append(entry)
    img.refcounts.discards = discards  # the old snapshot table
    img.write_table()
    img.refcounts.discards = None
    img.refcounts.write_back()
    return entry.public()


def find_entry(
    snapshots: tuple[SnapshotEntry, ...] | list[SnapshotEntry], ident: str | None, name: str | None
) -> SnapshotEntry | None:
    """find_snapshot_by_id_and_name: both must match when both are given."""
    for snap in snapshots:
        if ident is not None and snap.id != ident:
            continue
        if name is not None and snap.name != name:
            continue
        if ident is None and name is None:
            return None
        return snap
    return None


def delete_snapshot(
    host: HostFile,
    ident: str | None,
    name: str | None,
    *,
    discards: FreedClusters | None = None,
) -> SnapshotEntry:
    """qcow2_snapshot_delete: remove the snapshot matching ``ident`` and/or ``name``.

    Clusters it frees (the old snapshot table, the snapshot's data clusters,
    L2 tables and L1 table: QCOW2_DISCARD_SNAPSHOT) are recorded in
    ``discards`` when given; the caller discards them once the deletion
    stands.

    Errors: ``SnapshotFailed`` (ENOENT "Can't find the snapshot"; ENOTSUP for
    images this library cannot change).
    """
    img = _Image(host)
    found = find_entry([e.public() for e in img.entries], ident, name)
    if found is None:
        raise SnapshotFailed(errno.ENOENT, "Can't find the snapshot")
    index = next(
        i
        for i, e in enumerate(img.entries)
        if e.l1_table_offset == found.l1_table_offset and e.public() == found
    )
    entry = img.entries.pop(index)
    img.refcounts.discards = discards
    img.write_table()
    img.update_refcounts(entry.l1_table_offset, entry.l1_size, -1)
    if entry.l1_size:
        img.refcounts.free_bytes(entry.l1_table_offset, entry.l1_size * 8)
    img.refcounts.discards = None
    img.update_refcounts(img.header.l1_table_offset, img.header.l1_size, 0)
    img.refcounts.write_back()
    return entry.public()
