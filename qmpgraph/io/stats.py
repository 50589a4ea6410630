"""Per-node I/O counters that ``query-blockstats`` reports for nodes.

QEMU 7.2 keeps almost all of its statistics in BlockBackends (none of which
has a name in a storage daemon), so a node's BlockDeviceStats are zeros
except two things kept on the BlockDriverState itself:

* ``wr_highest_offset``: the end of the furthest write or write-zeroes
  request that finished on the node (bdrv_co_write_req_finish; a failed
  request counts too, a discard does not);
* the file-posix counters of ``driver-specific``: discards the driver
  issued, with their outcome (raw_account_discard).

Both are recorded here, keyed by ``Node.id`` (ids are never reused, so a
node deleted and added again starts from zero, as a new BlockDriverState
does), at O(1) per request.  An entry is a few dozen bytes and only nodes
that were written or discarded have one, so entries of deleted nodes are
left in place rather than tracked (several daemons may share a process in
tests, so no one daemon's node list may sweep them).  What does not live here: the query itself
(``qmpgraph.commands.query.blockstats``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpgraph.graph.model import Node


@dataclass(slots=True)
class DiscardCounts:
    """file-posix's BlockStatsSpecificFile counters of one node."""

    nb_ok: int = 0
    nb_failed: int = 0
    bytes_ok: int = 0


_highest: dict[int, int] = {}
_discards: dict[int, DiscardCounts] = {}


def record_write(node: Node, offset: int, length: int) -> None:
    """A write (or write-zeroes) of ``length`` bytes at ``offset`` finished on ``node``."""
    end = offset + length
    if end > _highest.get(node.id, 0):
        _highest[node.id] = end


def record_discard(node: Node, length: int, ok: bool) -> None:
    """The file driver of ``node`` issued a discard of ``length`` bytes."""
    counts = _discards.get(node.id)
    if counts is None:
        counts = _discards[node.id] = DiscardCounts()
    if ok:
        counts.nb_ok += 1
        counts.bytes_ok += length
    else:
        counts.nb_failed += 1


def highest_offset(node: Node) -> int:
    """``wr_highest_offset`` of ``node``."""
    return _highest.get(node.id, 0)


def discard_counts(node: Node) -> DiscardCounts:
    """The discard counters of ``node`` (zeros if it never discarded)."""
    return _discards.get(node.id) or DiscardCounts()
