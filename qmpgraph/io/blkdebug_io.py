"""The data path of ``blkdebug``: error injection by rules (QEMU 7.2).

Rules come from the node's ``BlkdebugState`` (config file sections, then
the ``inject-error`` and ``set-state`` options).  Nothing fires at open:

* an *event* (``debug_event``, QEMU's ``BLKDBG_EVENT`` on this node: raw
  fires ``read_aio``/``write_aio`` on its file child, a flush fires
  ``flush_to_os``/``flush_to_disk`` on the flushed node's primary child, a
  write fires ``pwritev``/``pwritev_zero`` and ``pwritev_done`` on the node
  written) runs that event's rules whose ``state`` is 0 or the current
  state: ``set-state`` rules pick the state the node moves to once all ran;
  the first ``inject-error`` rule of the event replaces the list of active
  error rules, and each one is put first in it;
* a *request* on the node (``rule_check``) fails with the first active rule
  whose I/O type matches (default: all but block-status) and whose
  ``sector`` lies in the request (or has none; flushes match only rules
  without one), with its ``errno`` (EIO by default).  A ``once`` rule is
  then dropped for good.

The geometry follows QEMU's block layer on the blkdebug node: requests are
widened to ``align`` (an unaligned write reads its head and tail first),
split at ``max-transfer``/``max-write-zero``/``max-discard``, write-zeroes
pieces smaller than ``opt-write-zero`` become writes of zeros and discard
pieces (split at ``opt-discard``) smaller than ``align`` are dropped.  A flush reaches the rules
only if a write came since the last successful flush (QEMU's write
generation).  The ``suspend`` action (breakpoints) is not modelled.

What does not live here: option parsing and the rules' validation
(``qmpgraph.drivers.blkdebug``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from qmpgraph.drivers.base import node_alignment
from qmpgraph.drivers.blkdebug import BlkdebugState
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io.hooks import (
    IOHook,
    child_block_status,
    child_discard,
    child_read,
    child_write,
    child_write_zeroes,
    register_hook,
    turn_wait,
)
from qmpgraph.io.request import REQ_FUA, BlockIOError

# BlkdebugIOType bits; an inject-error rule without ``iotype`` matches all but block-status.
IO_BITS = {"read": 1, "write": 2, "write-zeroes": 4, "discard": 8, "flush": 16, "block-status": 32}
_DEFAULT_MASK = 1 | 2 | 4 | 8 | 16


@dataclass(eq=False, slots=True)
class Rule:
    """One BlkdebugRule (``error`` is 0 for set-state rules)."""

    event: str
    inject: bool
    state: int
    error: int = errno.EIO
    once: bool = False
    offset: int = -1
    iotype_mask: int = _DEFAULT_MASK
    new_state: int = 0
    immediately: bool = False


def _make_rule(group: str, opts: dict[str, Any]) -> Rule:
    """add_rule: defaults as QEMU's (errno EIO, sector -1, state 0)."""
    rule = Rule(str(opts["event"]), group == "inject-error", int(opts.get("state", 0)))
    if rule.inject:
        rule.error = int(opts.get("errno", errno.EIO))
        rule.once = bool(opts.get("once", False))
        rule.immediately = bool(opts.get("immediately", False))
        sector = int(opts.get("sector", -1))
        rule.offset = -1 if sector == -1 else sector * 512
        if "iotype" in opts:
            rule.iotype_mask = IO_BITS[str(opts["iotype"])]
    else:
        rule.new_state = int(opts.get("new_state", 0))
    return rule


@dataclass(eq=False, slots=True)
class Runtime:
    """BDRVBlkdebugState's moving parts for one node."""

    source: BlkdebugState
    # Per event, in QEMU's list order (each rule was inserted at the head).
    rules: dict[str, list[Rule]] = field(default_factory=dict)
    active: list[Rule] = field(default_factory=list)
    state: int = 1
    write_gen: int = 0
    flushed_gen: int = 0


_RUNTIMES: dict[int, Runtime] = {}


def runtime(node: Node) -> Runtime | None:
    """The node's rules and state (rebuilt when the node's parsed state changes)."""
    source = node.state
    if not isinstance(source, BlkdebugState):
        return None
    rt = _RUNTIMES.get(node.id)
    if rt is None or rt.source is not source:
        rt = _RUNTIMES[node.id] = Runtime(source)
        for group, opts in source.rules:
            rule = _make_rule(group, opts)
            rt.rules.setdefault(rule.event, []).insert(0, rule)
        # blkdebug_open ends by firing the "none" event on the node itself,
        # so rules with event=none are active (or have moved the state)
        # before the first request.
        _process(rt, "none")
    return rt


def fire_event(node: Node, event: str) -> None:
    """blkdebug_debug_event: run ``event``'s rules for the current state."""
    rt = runtime(node)
    if rt is not None:
        _process(rt, event)


def _process(rt: Runtime, event: str) -> None:
    new_state = rt.state
    injected = False
    for rule in list(rt.rules.get(event, ())):
        if rule.state and rule.state != rt.state:
            continue
        if rule.inject:
            if not injected:
                rt.active.clear()
                injected = True
            rt.active.insert(0, rule)
        else:
            new_state = rule.new_state
    rt.state = new_state


def _failing_rule(node: Node, offset: int, length: int, iotype: str) -> Rule | None:
    """The first matching active rule that fails the request (a ``once`` one is dropped)."""
    rt = runtime(node)
    if rt is None:
        return None
    bit = IO_BITS[iotype]
    for rule in rt.active:
        hit = rule.offset == -1 or (length and offset <= rule.offset < offset + length)
        if hit and rule.iotype_mask & bit:
            break
    else:
        return None
    if not rule.error:
        return None
    if rule.once:
        rt.active.remove(rule)
        event_rules = rt.rules.get(rule.event, [])
        if rule in event_rules:
            event_rules.remove(rule)
    return rule


def rule_check(node: Node, offset: int, length: int, iotype: str) -> None:
    """Fail the request as the first matching active rule says (if one does)."""
    rule = _failing_rule(node, offset, length, iotype)
    if rule is not None:
        raise BlockIOError(rule.error)


async def rule_check_co(node: Node, offset: int, length: int, iotype: str) -> None:
    """rule_check of a request: unless the rule says ``immediately``, the
    request yields for one main-loop turn before it fails (as QEMU's)."""
    rule = _failing_rule(node, offset, length, iotype)
    if rule is None:
        return
    if not rule.immediately:
        await turn_wait()
    raise BlockIOError(rule.error)


def _image(node: Node) -> Edge:
    edge = node.file
    if edge is None:
        raise BlockIOError(errno.ENOMEDIUM)
    return edge


def _opt(node: Node, key: str) -> int:
    return int(node.options.get(key, 0) or 0)


def _chunks(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    if not limit:
        return [(offset, length)]
    return [
        (pos, min(limit, offset + length - pos)) for pos in range(offset, offset + length, limit)
    ]


class BlkdebugIO(IOHook):
    """blkdebug: requests pass to ``image`` unless an active rule fails them."""

    handles_fua = True

    def debug_event(self, node: Node, event: str) -> None:
        """An event fired on this node by a parent or the generic path."""
        fire_event(node, event)

    async def _read_aligned(self, node: Node, offset: int, length: int) -> bytes:
        out = []
        for pos, n in _chunks(offset, length, _opt(node, "max-transfer")):
            await rule_check_co(node, pos, n, "read")
            out.append(await child_read(_image(node), pos, n))
        return b"".join(out)

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        align = node_alignment(node)
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        data = await self._read_aligned(node, start, end - start)
        return data[offset - start : offset - start + length]

    async def _write_aligned(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        view = memoryview(data)
        for pos, n in _chunks(offset, len(data), _opt(node, "max-transfer")):
            await rule_check_co(node, pos, n, "write")
            chunk = bytes(view[pos - offset : pos - offset + n])
            await child_write(_image(node), pos, chunk, flags)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        rt = runtime(node)
        if rt is not None:
            rt.write_gen += 1
        align = node_alignment(node)
        start = offset - offset % align
        end = -(-(offset + len(data)) // align) * align
        if start != offset or end != offset + len(data):
            # Read-modify-write of the head and tail blocks, as bdrv_co_pwritev does.
            head = await self._read_aligned(node, start, align) if start != offset else b""
            tail_start = end - align
            tail = b""
            if end != offset + len(data):
                if tail_start == start and head:
                    tail = head
                else:
                    tail = await self._read_aligned(node, tail_start, align)
            buf = bytearray(head[: offset - start])
            buf += data
            if tail:
                buf += tail[offset + len(data) - tail_start :]
            data, offset = bytes(buf), start
        fire_event(node, "pwritev")
        try:
            await self._write_aligned(node, offset, data, flags)
        finally:
            fire_event(node, "pwritev_done")

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        rt = runtime(node)
        if rt is not None:
            rt.write_gen += 1
        fire_event(node, "pwritev_zero")
        try:
            align = max(node_alignment(node), _opt(node, "opt-write-zero"))
            for pos, n in _split(offset, length, align, _opt(node, "max-write-zero")):
                if n < align:
                    # blkdebug refuses it (ENOTSUP); the block layer writes zeros instead.
                    await self._write_aligned(node, pos, bytes(n), flags & REQ_FUA)
                    continue
                await rule_check_co(node, pos, n, "write-zeroes")
                await child_write_zeroes(_image(node), pos, n, flags)
        finally:
            fire_event(node, "pwritev_done")

    async def discard(self, node: Node, offset: int, length: int) -> None:
        rt = runtime(node)
        if rt is not None:
            rt.write_gen += 1
        request_align = node_alignment(node)
        align = max(request_align, _opt(node, "opt-discard"))
        for pos, n in _split(offset, length, align, _opt(node, "max-discard")):
            if n < request_align:
                continue  # ENOTSUP from blkdebug: a discard may do nothing
            await rule_check_co(node, pos, n, "discard")
            await child_discard(_image(node), pos, n)

    async def flush(self, node: Node) -> None:
        rt = runtime(node)
        if rt is None or rt.write_gen == rt.flushed_gen:
            return
        current = rt.write_gen
        await rule_check_co(node, 0, 0, "flush")
        rt.flushed_gen = current

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        await rule_check_co(node, offset, length, "block-status")
        return await child_block_status(_image(node), offset, length)


def _split(offset: int, length: int, align: int, limit: int) -> list[tuple[int, int]]:
    """Head up to ``align``, aligned middle in ``limit`` pieces, tail."""
    out: list[tuple[int, int]] = []
    end = offset + length
    head_end = min(end, -(-offset // align) * align)
    if head_end > offset:
        out.append((offset, head_end - offset))
    mid_end = max(head_end, end - end % align)
    step = limit - limit % align if limit else 0
    out += _chunks(head_end, mid_end - head_end, step) if mid_end > head_end else []
    if end > mid_end:
        out.append((mid_end, end - mid_end))
    return out


register_hook("blkdebug", BlkdebugIO())
