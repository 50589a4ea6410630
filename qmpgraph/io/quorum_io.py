"""The data path of ``quorum`` (QEMU 7.2's block/quorum.c).

Reads (``read-pattern=quorum``) go to every child.  A child that fails is
reported at once (QUORUM_REPORT_BAD with its error); with fewer successes
than ``vote-threshold`` the read fails with the most common error
(QUORUM_FAILURE).  When all successful reads agree, that is the data;
otherwise the versions are voted on: fewer votes than the threshold for the
winner fails the read with EIO (QUORUM_FAILURE), else each child holding
another version is reported (QUORUM_REPORT_BAD without error) and, with
``rewrite-corrupted``, overwritten with the winner.  With ``blkverify`` a
mismatch ends the process, as QEMU 7.2 does (``exit(1)``).  ``fifo`` reads
the children in order until one succeeds.

Writes and write-zeroes go to every child; each failure is reported, and
fewer successes than the threshold fail the request with the most common
error.  A flush flushes every child (quorum flushes its children itself,
``flushes_children``): failures are reported as type ``flush``, and the
flush fails only below the threshold.  Block status is zero only where
every child says so.

Vote lists keep QEMU's order (a new version goes first; ties go to the
version seen last), which fixes the order of the events.  Event data:
``sector-num``/``sectors-count`` cover the request in 512-byte sectors
(both 0 for a flush);
QUORUM_FAILURE's ``reference`` is the node name (qsd's BlockBackends have
no device name).  Both events are rate-limited as QEMU's monitor does: one
at once, then at most the latest one per second (per node name for
QUORUM_REPORT_BAD); a held-back event is sent (and timestamped) late.

What does not live here: open, options and permissions
(``qmpgraph.drivers.quorum``), child add/remove (``qmpgraph.commands.quorum``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import trio

from qmpgraph.drivers.quorum import QuorumState, quorum_children
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io.events import emit_io_event
from qmpgraph.io.hooks import (
    IOHook,
    child_block_status,
    child_read,
    child_write,
    child_write_zeroes,
    flush_node,
    register_hook,
)
from qmpgraph.io.request import DATA, ZERO, BlockIOError

SECTOR = 512


@dataclass(slots=True)
class _Version:
    value: Any
    index: int
    items: list[int] = field(default_factory=list)


def _count_vote(votes: list[_Version], value: Any, index: int) -> None:
    """quorum_count_vote: a new version goes to the list's head, items too."""
    for version in votes:
        if version.value == value:
            break
    else:
        version = _Version(value, index)
        votes.insert(0, version)
    version.items.insert(0, index)


def _winner(votes: list[_Version]) -> _Version:
    """quorum_get_vote_winner: the first version with the most votes."""
    best = votes[0]
    for version in votes[1:]:
        if len(version.items) > len(best.items):
            best = version
    return best


def _state(node: Node) -> QuorumState:
    state = node.state
    if not isinstance(state, QuorumState):
        raise BlockIOError(errno.ENOMEDIUM)
    return state


def _sectors(offset: int, length: int) -> tuple[int, int]:
    start = offset // SECTOR
    return start, -(-(offset + length) // SECTOR) - start


# QEMU's monitor sends these events at most once a second (per node name for
# QUORUM_REPORT_BAD): the first at once, then the last one of each second
# when the second is over (monitor_qapi_event_conf).
EVENT_RATE = 1.0


@dataclass(slots=True)
class _Throttled:
    deadline: float
    # The trio run whose timer task releases it (a finished run releases nothing).
    run: object
    stored: dict[str, Any] | None = None


_THROTTLED: weakref.WeakKeyDictionary[BlockGraph, dict[tuple[str, str], _Throttled]] = (
    weakref.WeakKeyDictionary()
)


def _emit(graph: BlockGraph | None, name: str, data: dict[str, Any], key: str = "") -> None:
    """monitor_qapi_event_queue for a rate-limited event."""
    if graph is None:
        return
    slots = _THROTTLED.setdefault(graph, {})
    slot = (name, key)
    run = trio.lowlevel.current_trio_token()
    pending = slots.get(slot)
    if pending is not None and pending.run is run:
        pending.stored = data
        return
    emit_io_event(graph, name, data)
    pending = slots[slot] = _Throttled(trio.current_time() + EVENT_RATE, run)
    trio.lowlevel.spawn_system_task(_release, graph, name, slot, pending)


async def _release(
    graph: BlockGraph, name: str, slot: tuple[str, str], pending: _Throttled
) -> None:
    """monitor_qapi_event_handler: send what was held back, once a second."""
    while True:
        await trio.sleep_until(pending.deadline)
        if pending.stored is None:
            _THROTTLED.get(graph, {}).pop(slot, None)
            return
        emit_io_event(graph, name, pending.stored)
        pending.stored = None
        pending.deadline = trio.current_time() + EVENT_RATE


def _report_bad(
    node: Node, kind: str, offset: int, length: int, child: Node | None, *, err: int = 0
) -> None:
    """quorum_report_bad: QUORUM_REPORT_BAD for one child."""
    sector, count = _sectors(offset, length)
    data: dict[str, Any] = {"type": kind}
    if err:
        data["error"] = os.strerror(err)
    data["node-name"] = child.node_name if child is not None else ""
    data["sector-num"] = sector
    data["sectors-count"] = count
    _emit(_state(node).graph, "QUORUM_REPORT_BAD", data, data["node-name"])


def _report_failure(node: Node, offset: int, length: int) -> None:
    """quorum_report_failure: QUORUM_FAILURE for the whole request."""
    sector, count = _sectors(offset, length)
    _emit(
        _state(node).graph,
        "QUORUM_FAILURE",
        {"reference": node.node_name, "sector-num": sector, "sectors-count": count},
    )


def _vote_error(errors: list[tuple[int, int]]) -> int:
    """quorum_vote_error: the most common errno of the failed children."""
    votes: list[_Version] = []
    for index, err in errors:
        _count_vote(votes, err, index)
    return int(_winner(votes).value)


def _too_many_failed(
    node: Node, offset: int, length: int, successes: int, errors: list[tuple[int, int]]
) -> int:
    """quorum_has_too_much_io_failed: the error to return (0 when enough succeeded)."""
    if successes >= _state(node).threshold:
        return 0
    err = _vote_error(errors) if errors else errno.EIO
    _report_failure(node, offset, length)
    return err


class QuorumIO(IOHook):
    """quorum: voted reads, replicated writes (see the module docstring)."""

    flushes_children = True

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        state = _state(node)
        kids = quorum_children(node)
        if state.read_pattern == "fifo":
            return await self._read_fifo(node, kids, offset, length)
        results: list[bytes | None] = []
        errors: list[tuple[int, int]] = []
        for index, edge in enumerate(kids):
            try:
                results.append(await child_read(edge, offset, length))
            except BlockIOError as err:
                results.append(None)
                errors.append((index, err.errno))
                _report_bad(node, "read", offset, length, edge.child, err=err.errno)
        successes = sum(1 for r in results if r is not None)
        failed = _too_many_failed(node, offset, length, successes, errors)
        if failed:
            raise BlockIOError(failed)
        good = [(i, r) for i, r in enumerate(results) if r is not None]
        first = good[0][1]
        if all(r == first for _, r in good[1:]):
            return first
        if state.blkverify:
            self._blkverify_abort(offset, length, good)
        votes: list[_Version] = []
        for index, data in good:
            _count_vote(votes, data, index)
        winner = _winner(votes)
        if len(winner.items) < state.threshold:
            _report_failure(node, offset, length)
            raise BlockIOError(errno.EIO)
        bad = [i for v in votes if v is not winner for i in v.items]
        for index in bad:
            _report_bad(node, "read", offset, length, kids[index].child)
        if state.rewrite_corrupted:
            for index in bad:
                # A correction attempt only: QEMU ignores its errors.
                with contextlib.suppress(BlockIOError):
                    await child_write(kids[index], offset, winner.value)
        return bytes(winner.value)

    @staticmethod
    def _blkverify_abort(offset: int, length: int, good: list[tuple[int, bytes]]) -> None:
        """quorum_compare in blkverify mode: a mismatch ends the process."""
        a, b = good[0][1], good[1][1]
        at = next(i for i in range(len(a)) if a[i] != b[i])
        print(
            f"quorum: offset={offset} bytes={length} contents mismatch at offset {offset + at}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    async def _read_fifo(self, node: Node, kids: list[Edge], offset: int, length: int) -> bytes:
        """read_fifo_child: the next child after each failure."""
        err = errno.EIO
        for edge in kids:
            try:
                return await child_read(edge, offset, length)
            except BlockIOError as exc:
                err = exc.errno
                _report_bad(node, "read", offset, length, edge.child, err=err)
        raise BlockIOError(err)

    async def _replicate(
        self, node: Node, offset: int, length: int, data: bytes | None, flags: int
    ) -> None:
        """quorum_co_pwritev: every child; enough of them must succeed."""
        successes = 0
        errors: list[tuple[int, int]] = []
        for index, edge in enumerate(quorum_children(node)):
            try:
                if data is None:
                    await child_write_zeroes(edge, offset, length, flags)
                else:
                    await child_write(edge, offset, data, flags)
                successes += 1
            except BlockIOError as err:
                errors.append((index, err.errno))
                _report_bad(node, "write", offset, length, edge.child, err=err.errno)
        failed = _too_many_failed(node, offset, length, successes, errors)
        if failed:
            raise BlockIOError(failed)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await self._replicate(node, offset, len(data), data, flags)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        await self._replicate(node, offset, length, None, flags)

    async def flush(self, node: Node) -> None:
        """quorum_co_flush: all children; failures reported, voted below the threshold."""
        successes = 0
        errors: list[tuple[int, int]] = []
        for index, edge in enumerate(quorum_children(node)):
            child = edge.child
            if child is None:
                continue
            try:
                await flush_node(child)
                successes += 1
            except BlockIOError as err:
                _report_bad(node, "flush", 0, 0, child, err=err.errno)
                errors.append((index, err.errno))
        if successes < _state(node).threshold:
            raise BlockIOError(_vote_error(errors) if errors else errno.EIO)

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        """quorum_co_block_status: zero only where every child reads zeros."""
        pnum_zero, pnum_data = length, 0
        for edge in quorum_children(node):
            try:
                flags, n = await child_block_status(edge, offset, length)
            except BlockIOError as err:
                _report_bad(node, "read", offset, length, edge.child, err=err.errno)
                pnum_data = length
                break
            if flags & ZERO:
                pnum_zero = min(pnum_zero, n)
            else:
                pnum_data = max(pnum_data, n)
        if pnum_data:
            return DATA, pnum_data
        return ZERO, pnum_zero


register_hook("quorum", QuorumIO())
