"""The ``blklogwrites`` filter: logs writes to ``file`` on a ``log`` device.

Children: ``file`` (FILTERED|PRIMARY) and ``log`` (METADATA).  Their
permissions follow the passthrough rule while an edge is being created, the
default rule by role afterwards.  Open follows blk_log_writes_open: with
``log-append`` the log's superblock is read (an empty log gets a fresh one)
and its entries are walked to find the end of the log, with QEMU's messages;
otherwise ``log-sector-size`` (default 512) applies.  Nothing is written at
open: the data path (``qmpgraph.io.filters_io``) appends the entries and
writes the superblock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import ChildSpec, OpenContext
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms, filter_default_perms
from qmpgraph.graph.perms import Role

_MAGIC = 0x6A736677736872
_VERSION = 1
_SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
_ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len
_FLAG_MASK = 0xF  # FLUSH | FUA | DISCARD | MARK
_FLAG_DISCARD = 1 << 2


@dataclass(frozen=True, slots=True)
class BlklogwritesState:
    """Per-node state: the log geometry found at open."""

    sector_size: int
    cur_log_sector: int
    nr_entries: int
    update_interval: int


def _valid_sector_size(size: int) -> bool:
    return size >= 512 and size < (1 << 24) and not size & (size - 1)


def _read(node: Node, offset: int, length: int) -> bytes:
    data = node.driver.read(node, offset, length) if node.driver is not None else b""
    return data + bytes(length - len(data))


def _find_cur_log_sector(log: Node, sector_size: int, nr_entries: int) -> int:
    """Walk the log's entries; the sector after the last one."""
    bits = sector_size.bit_length() - 1
    sector = 1
    for index in range(nr_entries):
        _, nr_sectors, flags, _ = _ENTRY.unpack(_read(log, sector << bits, _ENTRY.size))
        if flags & ~_FLAG_MASK:
            raise GenericError(f"Invalid flags 0x{flags:x} in log entry {index}")
        sector += 1
        if not flags & _FLAG_DISCARD:
            sector += nr_sectors
    return sector


class Blklogwrites(FilterDriver):
    """blklogwrites: a filter that appends every write to a log device."""

    format_name = "blklogwrites"
    options = frozenset({"log-append", "log-sector-size", "log-super-update-interval"})
    children = (*FilterDriver.children, ChildSpec("log", Role.METADATA))
    strong_runtime_options = ("log-append", "log-sector-size")

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file`` and ``log``, then read or choose the log geometry."""
        super().open(ctx, node, options)
        edge = ctx.open_child(node, options, "log", Role.METADATA)
        assert edge is not None and edge.child is not None
        log = edge.child
        cur, entries = 1, 0
        if options.get("log-append", False):
            if "log-sector-size" in options:
                raise GenericError("log-append and log-sector-size are mutually exclusive")
            length = log.driver.size(log) if log.driver is not None else 0
            if not length:
                magic, version, nr_entries, sector_size = _MAGIC, _VERSION, 0, 512
            else:
                magic, version, nr_entries, sector_size = _SUPER.unpack(_read(log, 0, _SUPER.size))
            if magic != _MAGIC:
                raise GenericError("Invalid log superblock magic")
            if version != _VERSION:
                raise GenericError(f"Unsupported log version {version}")
            if _valid_sector_size(sector_size):
                cur = _find_cur_log_sector(log, sector_size, nr_entries)
                entries = nr_entries
        else:
            sector_size = int(options.get("log-sector-size", 512))
        if not _valid_sector_size(sector_size):
            raise GenericError(f"Invalid log sector size {sector_size}")
        interval = int(options.get("log-super-update-interval", 4096))
        if not interval:
            raise GenericError(f"Invalid log superblock update interval {interval}")
        node.state = BlklogwritesState(sector_size, cur, entries, interval)

    def child_perm(
        self,
        node: Node,
        edge: Edge | None,
        role: int,
        perm: int,
        shared: int,
        *,
        queue: ReopenQueue | None,
    ) -> tuple[int, int]:
        """Passthrough while the edge is being created, then the default rule."""
        if edge is None:
            return filter_default_perms(perm, shared)
        return default_perms(node, role, queue, perm, shared)

    def request_alignment(self, node: Node) -> int:
        """Requests are aligned to the log sector size."""
        state = node.state
        return state.sector_size if isinstance(state, BlklogwritesState) else 512


DRIVERS = (Blklogwrites(),)
