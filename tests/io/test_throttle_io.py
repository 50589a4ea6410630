"""Throttle groups on the data path, in virtual time (trio's MockClock, autojump).

The expected times follow from QEMU's leaky-bucket rules (util/throttle.c),
worked out by hand in each test from the limits alone: a bucket without a
burst rate lets ``avg/10`` units through at once, then one request per
``1/avg`` second; a request waits until the level minus the bucket's size
has leaked away.  Nodes are null-co under throttle filters, so no thread or
disk makes time pass.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))
sys.path.insert(0, str(Path(__file__).parent))

from cmdkit import Client  # tests/commands helper, put on sys.path above
from test_backend_io import attach

from qmpgraph.io.backend import BackendIO

TOL = 1e-6
BOUND = 1000  # virtual seconds: fail_after runs on the mock clock


def _setup(
    limits: dict[str, Any], nodes: int = 1, group: str = "tg0"
) -> tuple[Client, list[BackendIO]]:
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": group, "limits": limits})
    ios = []
    for i in range(nodes):
        c.ok("blockdev-add", {"driver": "null-co", "node-name": f"null{i}", "size": 1 << 30})
        c.ok(
            "blockdev-add",
            {
                "driver": "throttle",
                "node-name": f"thr{i}",
                "file": f"null{i}",
                "throttle-group": group,
            },
        )
        ios.append(attach(c, f"thr{i}", writable=True))
    return c, ios


async def _sequential(io: BackendIO, count: int, size: int, *, write: bool) -> list[float]:
    """Completion times of ``count`` back-to-back requests."""
    start = trio.current_time()
    times = []
    for i in range(count):
        if write:
            await io.write(i * size, b"x" * size)
        else:
            await io.read(i * size, size)
        times.append(trio.current_time() - start)
    return times


async def test_iops_total_without_burst(autojump_clock: trio.testing.MockClock) -> None:
    # iops-total=10: bucket size 1 (avg/10), so two requests pass at once and
    # each later one waits 0.1 s: 50 requests end at 4.8 s.
    _, (io,) = _setup({"iops-total": 10})
    with trio.fail_after(BOUND):
        times = await _sequential(io, 50, 512, write=False)
    assert times[0] == times[1] == 0
    for k, t in enumerate(times[2:], start=1):
        assert abs(t - 0.1 * k) < TOL, (k, t)
    assert abs(times[-1] - 4.8) < TOL


async def test_concurrent_requests_share_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    # 50 concurrent reads through one node take as long as 50 sequential ones.
    _, (io,) = _setup({"iops-total": 10})
    done: list[float] = []

    async def one(i: int) -> None:
        await io.read(i * 512, 512)
        done.append(trio.current_time())

    start = trio.current_time()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert abs(max(done) - start - 4.8) < TOL
    assert sorted(done)[2] - start > 0.1 - TOL


async def test_bps_write_limits_writes_only(autojump_clock: trio.testing.MockClock) -> None:
    # bps-write=640 KiB/s with 64 KiB writes: bucket size 64 KiB, so two writes
    # pass, then one per 0.1 s.  Reads are not limited at all.
    _, (io,) = _setup({"bps-write": 655360})
    with trio.fail_after(BOUND):
        writes = await _sequential(io, 12, 65536, write=True)
        reads = await _sequential(io, 100, 65536, write=False)
    assert abs(writes[-1] - 1.0) < TOL
    assert reads[-1] == 0


async def test_iops_size_counts_units(autojump_clock: trio.testing.MockClock) -> None:
    # iops-size=4096, iops-total=10: a 16 KiB request is 4 units.  The first
    # passes (level 4), the second waits for 3 units to leak (0.3 s), every
    # later one for 4 (0.4 s).
    _, (io,) = _setup({"iops-total": 10, "iops-size": 4096})
    with trio.fail_after(BOUND):
        times = await _sequential(io, 6, 16384, write=True)
    expected = [0, 0.3, 0.7, 1.1, 1.5, 1.9]
    assert all(abs(t - e) < TOL for t, e in zip(times, expected, strict=True)), times


async def test_burst_then_average(autojump_clock: trio.testing.MockClock) -> None:
    # iops-total=10, -max=50, -max-length=2: the burst bucket (size max/10 = 5)
    # lets 6 requests through at once, then one per 1/50 s while the main
    # level (filled at 50/s, leaking at 10/s, size max*length = 100) is below
    # 100; after that one per 1/10 s.
    _, (io,) = _setup({"iops-total": 10, "iops-total-max": 50, "iops-total-max-length": 2})
    with trio.fail_after(BOUND):
        times = await _sequential(io, 140, 512, write=False)
    assert times[5] == 0 and times[6] > 0
    for k in range(6, 100):
        assert abs(times[k] - (k - 5) * 0.02) < TOL, (k, times[k])
    # The sustained rate at the end is the average.
    assert abs((times[-1] - times[-11]) - 1.0) < TOL
    # Over 2 s no more than max * length + avg * 2 requests went through.
    assert sum(1 for t in times if t <= 2.0) <= 100 + 20 + 1


async def test_members_share_a_group_round_robin(autojump_clock: trio.testing.MockClock) -> None:
    # Two nodes of one iops-total=10 group, 25 concurrent reads each: 50
    # requests in 4.8 s, served in turns (neither node finishes early).
    _, ios = _setup({"iops-total": 10}, nodes=2)
    finish: dict[int, list[float]] = {0: [], 1: []}

    async def one(n: int, i: int) -> None:
        await ios[n].read(i * 512, 512)
        finish[n].append(trio.current_time())

    start = trio.current_time()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            for i in range(25):
                for n in (0, 1):
                    nursery.start_soon(one, n, i)
    last = max(finish[0] + finish[1]) - start
    assert abs(last - 4.8) < TOL
    # Without turns one node would be done by ~2.4 s.
    assert min(max(finish[0]), max(finish[1])) - start > 4.4


async def test_other_nodes_are_not_delayed(autojump_clock: trio.testing.MockClock) -> None:
    # While a throttled node is saturated, a node outside the group runs freely.
    c, (io,) = _setup({"iops-total": 10})
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "free", "size": 1 << 20})
    free = attach(c, "free", writable=True)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(_sequential, io, 30, 512, write=False))
            await trio.sleep(0.5)
            before = trio.current_time()
            await _sequential(free, 200, 4096, write=True)
            assert trio.current_time() == before


async def test_qom_set_limits_take_effect(autojump_clock: trio.testing.MockClock) -> None:
    c, (io,) = _setup({"iops-total": 10})
    with trio.fail_after(BOUND):
        assert abs((await _sequential(io, 12, 512, write=False))[-1] - 1.0) < TOL
        # Faster limits, levels emptied: bucket size 10, so 11 pass, then 0.01 s each.
        c.ok("qom-set", {"path": "tg0", "property": "limits", "value": {"iops-total": 100}})
        times = await _sequential(io, 22, 512, write=False)
        assert times[10] == 0 and abs(times[-1] - 0.11) < TOL
        # No limits at all.
        c.ok("qom-set", {"path": "tg0", "property": "limits", "value": {"iops-total": 0}})
        assert (await _sequential(io, 100, 512, write=False))[-1] == 0


async def test_reopen_to_another_group(autojump_clock: trio.testing.MockClock) -> None:
    c, (io,) = _setup({"iops-total": 10})
    c.ok("object-add", {"qom-type": "throttle-group", "id": "fast", "limits": {"iops-total": 1000}})
    with trio.fail_after(BOUND):
        assert abs((await _sequential(io, 12, 512, write=False))[-1] - 1.0) < TOL
        c.ok(
            "blockdev-reopen",
            {
                "options": [
                    {
                        "driver": "throttle",
                        "node-name": "thr0",
                        "file": "null0",
                        "throttle-group": "fast",
                    }
                ]
            },
        )
        # bucket size 100: 101 requests at once, then 1 ms each.
        times = await _sequential(io, 111, 512, write=False)
    assert times[100] == 0
    assert abs(times[-1] - 0.01) < TOL
