"""The data path of the ``throttle`` filter: QEMU 7.2's throttle groups.

Accounting (util/throttle.c): a group holds six leaky buckets (bps/iops x
total/read/write).  Each has a level that leaks at ``avg`` units per second;
a request must wait while a bucket's level is above its size (``avg/10``
without a burst rate, ``max * burst_length`` with one), and, for bursts
longer than a second, while a second "burst" level leaking at ``max`` is
above ``max/10``.  A request is accounted when it runs: its bytes on the
bps buckets, its units (1, or ``size / iops-size`` for larger requests) on
the iops buckets.  Reconfiguring the group (``qom-set`` of ``limits``)
empties the buckets.

Scheduling (block/throttle-groups.c): each member (a throttle node) queues
its throttled requests per direction; a group arms at most one timer per
direction, owned by the member whose turn it is (``tokens``).  When a timer
fires, the owner's next queued request runs, and after each request runs the
next member with queued requests, round robin, gets its turn.  Reads are
one direction; writes, write-zeroes and discards the other; flushes and
block status are not throttled.  Time is trio's clock, so a test drives it
with ``trio.testing.MockClock``.

A node that moves to another group (``blockdev-reopen``) leaves its old
group on its next request; requests still queued there are let through, as
QEMU's drain before a reopen does.

What does not live here: the group object and its validation
(``qmpgraph.objects.throttle_group``), the driver's open and reopen rules
(``qmpgraph.drivers.throttle``).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field

import trio

from qmpgraph.drivers.throttle import ThrottleState
from qmpgraph.graph.model import Node
from qmpgraph.io.hooks import PassThroughIO, register_hook
from qmpgraph.objects.throttle_group import BUCKETS, Config, ThrottleGroup

NS = 1_000_000_000
READ, WRITE = 0, 1
# The buckets a request of each direction must fit in (throttle_compute_wait_for).
_CHECKED = (
    ("bps-total", "iops-total", "bps-read", "iops-read"),
    ("bps-total", "iops-total", "bps-write", "iops-write"),
)
# The buckets it fills: (bytes, units) pairs (throttle_account).
_FILLED = (
    (("bps-total", "iops-total"), ("bps-read", "iops-read")),
    (("bps-total", "iops-total"), ("bps-write", "iops-write")),
)


@dataclass(slots=True)
class Bucket:
    """One LeakyBucket: its limits and its two levels."""

    avg: int
    max: int
    burst_length: int
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        """throttle_leak_bucket: what ``delta_ns`` lets through."""
        self.level = max(self.level - self.avg * float(delta_ns) / NS, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * float(delta_ns) / NS, 0.0)

    def wait_ns(self) -> int:
        """throttle_compute_wait: ns until a request fits, 0 if it does now."""
        if not self.avg:
            return 0
        if not self.max:
            # Short bursts still pass without a burst rate (a tenth of a second's worth).
            size, burst_size = self.avg / 10, 0.0
        else:
            size, burst_size = float(self.max * self.burst_length), self.max / 10
        extra = self.level - size
        if extra > 0:
            return int(extra * NS / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NS / self.max)
        return 0

    def fill(self, amount: float) -> None:
        """Account ``amount`` units."""
        self.level += amount
        if self.burst_length > 1:
            self.burst_level += amount


def now_ns() -> int:
    """The throttle clock (trio's, in ns)."""
    return round(trio.current_time() * NS)


@dataclass(eq=False, slots=True)
class Member:
    """ThrottleGroupMember: one throttle node's queues and timers."""

    node: Node
    pending: list[int] = field(default_factory=lambda: [0, 0])
    queues: tuple[deque[trio.Event], deque[trio.Event]] = field(
        default_factory=lambda: (deque(), deque())
    )
    # A timer is "pending" while its generation matches; bumping it cancels.
    timer_gen: list[int] = field(default_factory=lambda: [0, 0])
    timer_pending: list[bool] = field(default_factory=lambda: [False, False])
    released: bool = False


class GroupIO:
    """The run-time state of one group: buckets, members, tokens, armed timers."""

    def __init__(self, group: ThrottleGroup) -> None:
        self.group = group
        self.config: Config | None = None
        self.buckets: dict[str, Bucket] = {}
        self.op_size = 0
        self.previous_leak = 0
        self.members: list[Member] = []
        self.tokens: list[Member | None] = [None, None]
        self.any_timer_armed = [False, False]

    # -- util/throttle.c ---------------------------------------------------

    def sync_config(self) -> None:
        """throttle_config when the group's limits changed: empty buckets."""
        cfg = self.group.config
        if cfg is self.config:
            return
        self.config = cfg
        self.buckets = {b: Bucket(int(cfg[b][0]), int(cfg[b][1]), int(cfg[b][2])) for b in BUCKETS}
        self.op_size = int(cfg["op-size"])
        self.previous_leak = now_ns()

    def compute_timer(self, direction: int, now: int) -> int:
        """throttle_compute_timer: leak up to ``now``; the wait of ``direction``."""
        self.sync_config()
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta > 0:
            for bucket in self.buckets.values():
                bucket.leak(delta)
        return max(self.buckets[b].wait_ns() for b in _CHECKED[direction])

    def account(self, direction: int, size: int) -> None:
        """throttle_account: ``size`` bytes, and its units, in ``direction``."""
        self.sync_config()
        units = size / self.op_size if self.op_size and size > self.op_size else 1.0
        for bps, iops in _FILLED[direction]:
            self.buckets[bps].fill(size)
            self.buckets[iops].fill(units)

    # -- block/throttle-groups.c -------------------------------------------

    def register(self, member: Member) -> None:
        """throttle_group_register_tgm: new members go to the list's head."""
        self.members.insert(0, member)
        for direction in (READ, WRITE):
            if self.tokens[direction] is None:
                self.tokens[direction] = member

    def unregister(self, member: Member) -> None:
        """Leave the group: cancel its timers, let its queued requests go."""
        for direction in (READ, WRITE):
            if self.tokens[direction] is member:
                rest = [m for m in self.members if m is not member]
                self.tokens[direction] = self._next(member) if rest else None
            if member.timer_pending[direction]:
                member.timer_gen[direction] += 1
                member.timer_pending[direction] = False
                self.any_timer_armed[direction] = False
        self.members.remove(member)
        member.released = True
        for queue in member.queues:
            while queue:
                queue.popleft().set()

    def _next(self, member: Member) -> Member:
        index = self.members.index(member) + 1
        return self.members[index % len(self.members)]

    def next_token(self, member: Member, direction: int) -> Member:
        """next_throttle_token: the next member (round robin) with queued requests."""
        start = token = self.tokens[direction] or member
        if start not in self.members:
            start = token = member
        token = self._next(token)
        while token is not start and not token.pending[direction]:
            token = self._next(token)
        if token is start and not token.pending[direction]:
            token = member
        return token

    def schedule_timer(self, member: Member, direction: int) -> bool:
        """throttle_group_schedule_timer: True if ``member`` must wait."""
        if self.any_timer_armed[direction]:
            return True
        now = now_ns()
        wait = self.compute_timer(direction, now)
        if not wait:
            return False
        if not member.timer_pending[direction]:
            self._arm(member, direction, now + wait)
        self.tokens[direction] = member
        self.any_timer_armed[direction] = True
        return True

    def _arm(self, member: Member, direction: int, deadline_ns: int) -> None:
        member.timer_gen[direction] += 1
        member.timer_pending[direction] = True
        trio.lowlevel.spawn_system_task(
            self._timer, member, direction, member.timer_gen[direction], deadline_ns
        )

    async def _timer(self, member: Member, direction: int, gen: int, deadline_ns: int) -> None:
        """timer_cb: the owner's next queued request runs."""
        await trio.sleep_until(deadline_ns / NS)
        if member.timer_gen[direction] != gen:
            return
        member.timer_pending[direction] = False
        self.any_timer_armed[direction] = False
        if not self.restart_queue(member, direction):
            self.schedule_next(member, direction)

    @staticmethod
    def restart_queue(member: Member, direction: int) -> bool:
        """Wake the member's oldest queued request of ``direction``, if any."""
        queue = member.queues[direction]
        if not queue:
            return False
        queue.popleft().set()
        return True

    def schedule_next(self, member: Member, direction: int, in_request: bool = False) -> None:
        """schedule_next_request: give the next member with queued requests its turn."""
        token = self.next_token(member, direction)
        if not token.pending[direction]:
            return
        if self.schedule_timer(token, direction):
            return
        if in_request and self.restart_queue(member, direction):
            token = member
        else:
            # Fire the token's timer at once.
            self._arm(token, direction, now_ns())
            self.any_timer_armed[direction] = True
        self.tokens[direction] = token

    async def intercept(self, member: Member, size: int, direction: int) -> None:
        """throttle_group_co_io_limits_intercept: wait for the turn, then account."""
        token = self.next_token(member, direction)
        must_wait = self.schedule_timer(token, direction)
        if must_wait or member.pending[direction]:
            member.pending[direction] += 1
            event = trio.Event()
            member.queues[direction].append(event)
            try:
                await event.wait()
            finally:
                member.pending[direction] -= 1
            if member.released:
                return
        self.account(direction, size)
        self.schedule_next(member, direction, in_request=True)


_GROUPS: weakref.WeakKeyDictionary[ThrottleGroup, GroupIO] = weakref.WeakKeyDictionary()
_MEMBERS: dict[int, Member] = {}


def group_io(group: ThrottleGroup) -> GroupIO:
    """The run-time state of ``group`` (created on first use)."""
    gio = _GROUPS.get(group)
    if gio is None:
        gio = _GROUPS[group] = GroupIO(group)
    return gio


def _member(node: Node) -> tuple[GroupIO, Member] | None:
    """The node's membership, moved to its current group if a reopen changed it."""
    state = node.state
    if not isinstance(state, ThrottleState):
        return None
    gio = group_io(state.group)
    member = _MEMBERS.get(node.id)
    if member is not None and member not in gio.members:
        for other in _GROUPS.values():
            if member in other.members:
                other.unregister(member)
        member = None
    if member is None:
        member = _MEMBERS[node.id] = Member(node)
        gio.register(member)
    return gio, member


async def throttle(node: Node, size: int, direction: int) -> None:
    """Wait until the node's group lets a request of ``size`` bytes through."""
    found = _member(node)
    if found is not None:
        gio, member = found
        await gio.intercept(member, size, direction)


class ThrottleIO(PassThroughIO):
    """throttle: reads and writes wait for their group's limits, then pass on."""

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        await throttle(node, length, READ)
        return await super().read(node, offset, length)

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        await throttle(node, len(data), WRITE)
        await super().write(node, offset, data, flags)

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        await throttle(node, length, WRITE)
        await super().write_zeroes(node, offset, length, flags)

    async def discard(self, node: Node, offset: int, length: int) -> None:
        await throttle(node, length, WRITE)
        await super().discard(node, offset, length)


register_hook("throttle", ThrottleIO())
