"""Per-node I/O counters that ``query-blockstats`` reports for nodes.

QEMU 7.2 keeps almost all of its statistics in BlockBackends (none of which
has a name in a storage daemon), so a node's BlockDeviceStats are zeros
except two things kept on the BlockDriverState itself:

* ``wr_highest_offset``: the end of the furthest write or write-zeroes
  request that finished on the node (bdrv_co_write_req_finish; a failed
  request counts too, a discard does not);
* the file-posix counters of ``driver-specific``: discards the driver
  issued, with their outcome (raw_account_discard).

Writes reach a node two ways: requests through ``qmpgraph.io.hooks``
(``record_write``), and writes made straight through a file node's
descriptor by the qcow2 library and the control plane (``record_fd_write``,
the descriptor bound to its node by ``bind_fd`` when the file node opens).

Both counters are recorded here, keyed by ``Node.id`` (ids are never
reused, so a node deleted and added again starts from zero, as a new
BlockDriverState does), at O(1) per request.  An entry is a few dozen bytes
and only nodes that were written or discarded have one, so entries of
deleted nodes are left in place rather than tracked (several daemons may
share a process in tests, so no one daemon's node list may sweep them).

What does not live here: the query itself
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
# The descriptor of each open file node: the qcow2 library and the control
# plane (image creation, snapshots, bitmaps, resize) write through a file
# node's descriptor, not through the generic request path.  A closed node's
# entry is left behind: its number, once reused, is bound again by the next
# file node that opens it, and a write through a reused number that no node
# opened counts for a node that no longer exists.
_fd_nodes: dict[int, int] = {}


def record_write(node: Node, offset: int, length: int) -> None:
    """A write (or write-zeroes) of ``length`` bytes at ``offset`` finished on ``node``."""
    end = offset + length
    if end > _highest.get(node.id, 0):
        _highest[node.id] = end


def bind_fd(fd: int, node: Node) -> None:
    """``fd`` is now the descriptor of file node ``node``."""
    _fd_nodes[fd] = node.id


def record_fd_write(fd: int, offset: int, length: int) -> None:
    """A write of ``length`` bytes at ``offset`` through descriptor ``fd``."""
    node_id = _fd_nodes.get(fd)
    if node_id is not None and offset + length > _highest.get(node_id, 0):
        _highest[node_id] = offset + length


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
