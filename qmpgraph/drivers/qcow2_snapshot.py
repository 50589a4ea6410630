"""The qcow2 snapshot table, as the data path needs it (L1 table and disk size).

``read_snapshot_table`` parses the table entries (QCowSnapshotHeader plus
its extra data: ``vm_state_size_large``, ``disk_size``, ``icount``);
``find_snapshot`` looks one up by id first, then by name, as QEMU's
``find_snapshot_by_id_or_name`` does.

What does not live here: the control plane's ``SnapshotInfo`` view
(``qcow2.read_snapshots``), creating or deleting snapshots
(``qcow2_snapshot_write``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qmpgraph.drivers.qcow2_storage import HostFile, pread_full

_ENTRY_HEADER = 40


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One internal snapshot: where its L1 table is and its virtual size."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int | None  # None: not recorded (older images): the image's size
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None = None  # None: not recorded (-1 on disk, or absent)


def read_snapshot_table(host: HostFile, offset: int, count: int) -> tuple[SnapshotEntry, ...]:
    """The ``count`` snapshot table entries starting at ``offset``."""
    out: list[SnapshotEntry] = []
    for _ in range(count):
        head = pread_full(host, offset, _ENTRY_HEADER)
        l1_offset, l1_size, id_len, name_len, sec, nsec, clock, vm_state, extra_len = struct.unpack(
            ">QIHHIIQII", head
        )
        offset += _ENTRY_HEADER
        extra = pread_full(host, offset, extra_len)
        offset += extra_len
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_len >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        text = pread_full(host, offset, id_len + name_len)
        offset = (offset + id_len + name_len + 7) & ~7
        out.append(
            SnapshotEntry(
                id=text[:id_len].decode("utf-8", "replace"),
                name=text[id_len:].decode("utf-8", "replace"),
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                disk_size=disk_size,
                vm_state_size=vm_state,
                date_sec=sec,
                date_nsec=nsec,
                vm_clock_nsec=clock,
                icount=icount,
            )
        )
    return tuple(out)


def find_snapshot(snapshots: tuple[SnapshotEntry, ...], id_or_name: str) -> SnapshotEntry | None:
    """The snapshot whose id is ``id_or_name``, else the first with that name."""
    for snap in snapshots:
        if snap.id == id_or_name:
            return snap
    for snap in snapshots:
        if snap.name == id_or_name:
            return snap
    return None
