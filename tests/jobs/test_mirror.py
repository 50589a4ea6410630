"""The mirror job at library level: failed commands leave nothing behind,
the filter's graph and permissions while the job runs, the copy, the pivot,
the dirty map, guest writes tracked by mirror_top's I/O hook.

Messages and event orders are QEMU's (recorded live from qemu-storage-daemon
7.2; tests/differential/scripts/mirror-*.qmp compare the real daemons).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from jobkit import JobClient

from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io.backend import BackendIO
from qmpgraph.io.mirror_hook import DirtyMap, MirrorTopState
from qmpgraph.transactions.actions import add_root_parent
from qmpgraph.transactions.composite import root_attach

SIZE = 1 << 20
FILTERED = int(Role.FILTERED | Role.PRIMARY)


def _client(tmp_path: Path, virtual: bool = True) -> JobClient:
    c = JobClient(virtual=virtual)
    for name, fill in (("src", b"\x5a"), ("dst", b"\0"), ("small", b"\0")):
        path = tmp_path / f"{name}.img"
        path.write_bytes(fill * (SIZE // 2 if name == "small" else SIZE))
        c.ok(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": name,
                "file": {"driver": "file", "node-name": f"{name}f", "filename": str(path)},
            },
        )
    return c


def _node(c: JobClient, name: str) -> Node:
    node = c.daemon.graph.lookup(name)
    assert node is not None
    return node


def _guest(c: JobClient, node: Node) -> BackendIO:
    """A guest device on ``node``: a BlockBackend that writes (as an export would)."""
    graph = c.daemon.graph
    bb = BlockBackend()
    with c.daemon.graph_transaction("test-guest", {}) as tran:
        add_root_parent(tran, graph, bb)
        root_attach(
            tran, graph, bb, node, "root", role=Role.FILTERED | Role.PRIMARY,
            perm=int(Perm.WRITE | Perm.CONSISTENT_READ), shared=PERM_ALL,
        )  # fmt: skip
    return BackendIO(bb)


def test_failed_mirror_commands_change_nothing(tmp_path: Path) -> None:
    c = _client(tmp_path)
    base: dict[str, Any] = {"device": "src", "target": "dst", "sync": "full"}
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"device": "srcf"}, "Need a root block node"),
        ({"target": "src"}, "Can't mirror node into itself"),
        ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
        ({"granularity": 1000}, "Parameter 'granularity' expects a power of 2"),
        ({"buf-size": -1}, "Invalid parameter 'buf-size'"),
        ({"replaces": "small"}, None),
        ({}, "Invalid job ID ''"),
        ({"job-id": "j", "filter-node-name": "dst"}, "Duplicate nodes with node-name='dst'"),
        ({"job-id": "j", "target": "srcf"}, None),
    ]
    for extra, desc in cases:
        if desc is None:
            reply = c.run("blockdev-mirror", {**base, **extra})
            assert "error" in reply
            continue
        c.fails("blockdev-mirror", {**base, **extra}, desc)
    assert c.ok("query-jobs") == []
    assert check_invariants(c.daemon.graph) == []


async def test_mirror_filter_then_pivot(tmp_path: Path) -> None:
    c = _client(tmp_path)
    guest = _guest(c, _node(c, "src"))
    with trio.fail_after(10):
        await c.aok(
            "blockdev-mirror",
            {
                "job-id": "m",
                "device": "src",
                "target": "dst",
                "sync": "full",
                "filter-node-name": "mt",
            },
        )
        top = _node(c, "mt")
        edge = top.backing
        assert edge is not None and edge.child is _node(c, "src")
        # The filter passes on what its parents need: the guest writes, the job reads.
        assert edge.perm == Perm.WRITE | Perm.CONSISTENT_READ
        assert edge.shared == Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
        info = c.ok("query-block-jobs")[0]
        assert info["ready"] and info["offset"] == info["len"] == SIZE
        assert c.events("BLOCK_JOB_READY")
        await c.aok("block-job-complete", {"device": "m"})
        await c.wait_status("m", None)
    assert "mt" not in c.daemon.graph
    assert guest.node is _node(c, "dst")  # the pivot moved the guest
    assert (tmp_path / "dst.img").read_bytes() == (tmp_path / "src.img").read_bytes()
    assert [e for e, _ in c.events("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")] == [
        "BLOCK_JOB_COMPLETED"
    ]
    assert check_invariants(c.daemon.graph) == []


async def test_guest_writes_after_ready_reach_the_target(tmp_path: Path) -> None:
    c = _client(tmp_path, virtual=False)
    guest = _guest(c, _node(c, "src"))
    with trio.fail_after(10):
        await c.aok(
            "blockdev-mirror",
            {
                "job-id": "m",
                "device": "src",
                "target": "dst",
                "sync": "full",
                "filter-node-name": "mt",
            },
        )
        await c.wait_status("m", "ready")
        top = _node(c, "mt")
        state = top.state
        assert isinstance(state, MirrorTopState) and state.dirty is not None
        # The guest's device now sits on the filter: its write marks a chunk dirty.
        assert guest.node is top
        await guest.write(70000, b"\xab" * 5000)
        await c.aok("block-job-cancel", {"device": "m"})  # after ready: complete, no pivot
        await c.wait_status("m", None)
    assert guest.node is _node(c, "src")  # no pivot after a cancel
    data = (tmp_path / "dst.img").read_bytes()
    assert data[70000:75000] == b"\xab" * 5000
    assert data == (tmp_path / "src.img").read_bytes()
    assert "mt" not in c.daemon.graph
    assert guest.node is _node(c, "src")


def test_mirror_top_takes_nothing_once_stopped(tmp_path: Path) -> None:
    c = _client(tmp_path)
    c.ok(
        "blockdev-mirror",
        {"job-id": "m", "device": "src", "target": "dst", "sync": "none", "filter-node-name": "mt"},
    )
    top = _node(c, "mt")
    drv = top.driver
    assert drv is not None
    state = top.state
    assert isinstance(state, MirrorTopState)
    assert drv.child_perm(top, top.backing, FILTERED, int(Perm.WRITE), 0, queue=None)[0]
    state.stop = True
    assert drv.child_perm(top, top.backing, FILTERED, int(Perm.WRITE), 0, queue=None) == (
        0,
        PERM_ALL,
    )
    state.stop = False


def test_dirty_map_runs() -> None:
    woken: list[int] = []
    m = DirtyMap(10 * 65536 + 100, 65536)
    m.on_dirty = lambda: woken.append(1)
    assert m.chunks == 11 and m.next_run(0, 16) is None
    m.mark(65536 * 2 + 5, 65536)  # touches chunks 2 and 3
    m.mark(65536 * 10, 1)
    assert woken and m.dirty_chunk_count() == 3 and m.dirty_bytes() == 3 * 65536
    assert m.next_run(0, 16) == (2, 4)
    assert m.next_run(0, 1) == (2, 3)
    assert m.next_run(5, 16) == (10, 11)
    m.clear_chunks(10, 11)
    assert m.next_run(5, 16) == (2, 4)  # wraps round
    m.clear_chunks(0, 11)
    assert m.next_run(0, 16) is None and m.dirty_bytes() == 0


def test_dirty_map_is_the_job_bitmap() -> None:
    """The map's bits are the job bitmap's (what query-named-block-nodes counts):
    clearing runs that start and end inside a byte keeps the other bits."""
    m = DirtyMap(40 * 4096, 4096)
    m.mark(0, 40 * 4096)
    m.clear_chunks(3, 5)  # inside one byte
    m.clear_chunks(7, 21)  # across bytes
    dirty = [i for i in range(40) if m.bitmap.get(i * 4096)]
    assert dirty == [0, 1, 2, 5, 6, *range(21, 40)]
    assert m.bitmap.count() == m.dirty_bytes() == len(dirty) * 4096
    assert m.is_dirty(5 * 4096 + 100) and not m.is_dirty(4 * 4096)


async def test_write_blocking_copies_guest_writes_at_once(tmp_path: Path) -> None:
    c = _client(tmp_path, virtual=False)
    guest = _guest(c, _node(c, "src"))
    with trio.fail_after(10):
        await c.aok(
            "blockdev-mirror",
            {
                "job-id": "m",
                "device": "src",
                "target": "dst",
                "sync": "none",
                "copy-mode": "write-blocking",
                "filter-node-name": "mt",
            },
        )
        await c.wait_status("m", "ready")
        state = _node(c, "mt").state
        assert isinstance(state, MirrorTopState) and state.dirty is not None
        await guest.write(4096, b"\x77" * 512)
        # Written to the target by the guest's request itself: nothing is dirty.
        assert state.dirty.dirty_bytes() == 0
        assert (tmp_path / "dst.img").read_bytes()[4096:4608] == b"\x77" * 512
        await c.aok("block-job-cancel", {"device": "m", "force": True})
        await c.wait_status("m", None)
    assert [e for e, _ in c.events("BLOCK_JOB_CANCELLED")] == ["BLOCK_JOB_CANCELLED"]
