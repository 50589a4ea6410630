"""Quorum voting over NBD, against qemu-storage-daemon (live).

Three raw images hold the same data; qemu-io corrupts some of them (or
blkdebug makes a child fail), a quorum node over them is exported, and
qemu-io reads and writes through the export.  The QUORUM_REPORT_BAD and
QUORUM_FAILURE events (timestamps dropped), what qemu-io printed (timing
lines dropped) and the images afterwards must be the same for qmpgraph as
for qemu-storage-daemon.  The test waits (wall clock) for events QEMU's
monitor holds back by its rate limit; it asserts nothing about time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))
sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))
sys.path.insert(0, str(Path(__file__).parent))

from cmdkit import Client  # tests/commands helper, put on sys.path above
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_backend_io import attach

MiB = 1 << 20


def _child(i: int, rules: dict[str, Any] | None = None) -> dict[str, Any]:
    image: dict[str, Any] = {"driver": "file", "filename": f"c{i}.raw"}
    if rules is not None:
        image = {"driver": "blkdebug", "image": image, **rules}
    return {"driver": "raw", "node-name": f"c{i}", "file": image}


def _quorum(children: list[dict[str, Any]], **opts: Any) -> dict[str, Any]:
    return {"driver": "quorum", "node-name": "q", "children": children, "vote-threshold": 2, **opts}


_EIO_READ = {"inject-error": [{"event": "read_aio", "errno": 5}]}
_EIO_WRITE = {"inject-error": [{"event": "write_aio", "errno": 28}]}
_EIO_FLUSH = {"inject-error": [{"event": "flush_to_disk", "errno": 5, "iotype": "flush"}]}

# name: (corruptions per image, quorum options, qemu-io commands)
SCENARIOS: dict[str, tuple[dict[int, list[str]], dict[str, Any], list[str]]] = {
    "one-bad-version": (
        {2: ["write -P 0x99 64k 64k"]},
        _quorum([_child(0), _child(1), _child(2)]),
        ["read -P 0x11 0 1M", "read -P 0x11 64k 4k", "read -P 0x11 512k 4k"],
    ),
    "rewrite-corrupted": (
        {0: ["write -P 0x99 100k 8k"]},
        _quorum([_child(0), _child(1), _child(2)], **{"rewrite-corrupted": True}),
        ["read -P 0x11 96k 16k", "read -P 0x11 96k 16k"],
    ),
    "no-winner": (
        {0: ["write -P 0x77 0 4k"], 1: ["write -P 0x88 0 4k"]},
        _quorum([_child(0), _child(1), _child(2)]),
        ["read 0 4k"],
    ),
    "threshold-three": (
        {1: ["write -P 0x77 4k 4k"]},
        _quorum([_child(0), _child(1), _child(2)], **{"vote-threshold": 3}),
        ["read 4k 4k"],
    ),
    "read-error": (
        {},
        _quorum([_child(0), _child(1, _EIO_READ), _child(2)]),
        ["read -P 0x11 0 64k"],
    ),
    "read-errors-below-threshold": (
        {},
        _quorum([_child(0, _EIO_READ), _child(1, _EIO_READ), _child(2)]),
        ["read 0 64k"],
    ),
    "fifo": (
        {1: ["write -P 0x22 0 64k"]},
        _quorum([_child(0, _EIO_READ), _child(1), _child(2)], **{"read-pattern": "fifo"}),
        ["read -P 0x22 0 64k"],
    ),
    "write-errors": (
        {},
        _quorum([_child(0), _child(1, _EIO_WRITE), _child(2)]),
        ["write -P 0x33 0 64k", "read -P 0x33 0 64k"],
    ),
    "write-failure": (
        {},
        _quorum([_child(0, _EIO_WRITE), _child(1, _EIO_WRITE), _child(2)]),
        ["write -P 0x33 0 64k"],
    ),
    "flush-error": (
        {},
        _quorum([_child(0), _child(1), _child(2, _EIO_FLUSH)]),
        ["write -P 0x44 0 4k", "flush"],
    ),
}

_TIMING = re.compile(r"^.*(ops/sec|bytes, \d+ ops;).*$", re.M)


def _prepare(d: Path, corrupt: dict[int, list[str]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        img = str(d / f"c{i}.raw")
        run("qemu-img", "create", "-f", "raw", img, "1M")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", img)
        for cmd in corrupt.get(i, []):
            run("qemu-io", "-f", "raw", "-c", cmd, img)


def _session(kind: str, d: Path, spec: dict[str, Any], cmds: list[str]) -> dict[str, Any]:
    daemon = LiveDaemon(kind, require_qemu(), d, [])
    try:
        daemon.ok("blockdev-add", **spec)
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="q", writable=True)
        outputs = []
        for cmd in cmds:
            # One qemu-io per command: each read is one NBD request.
            res = subprocess.run(
                ["qemu-io", "-f", "raw", daemon.uri("e"), "-c", cmd],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            outputs.append(_TIMING.sub("", res.stdout + res.stderr).strip())
        # Quorum events are rate-limited to one a second (per node name):
        # what was held back comes within the second.  Scenarios raise at most
        # two events per key, so the result does not depend on the timing.
        time.sleep(1.3)
        daemon.ok("query-version")  # collects the events sent so far
        events = [{k: v for k, v in e.items() if k != "timestamp"} for e in daemon.events]
        events = [e for e in events if e["event"].startswith("QUORUM")]
    finally:
        daemon.stop()
    images = [(d / f"c{i}.raw").read_bytes() for i in range(3)]
    return {"outputs": outputs, "events": events, "images": images}


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_quorum_like_qsd(tmp_path: Path, name: str) -> None:
    require_qemu()
    corrupt, spec, cmds = SCENARIOS[name]
    results = {}
    for kind in ("qsd", "qmpgraph"):
        _prepare(tmp_path / kind, corrupt)
        results[kind] = _session(kind, tmp_path / kind, spec, cmds)
    want, got = results["qsd"], results["qmpgraph"]
    # Events held back by the rate limit of different keys leave in timer order.
    assert sorted(got["events"], key=json.dumps) == sorted(want["events"], key=json.dumps)
    assert got["outputs"] == want["outputs"]
    assert got["images"] == want["images"]


@pytest.mark.qemu
def test_blkverify_mismatch_ends_the_daemon(tmp_path: Path) -> None:
    """blkverify=on: QEMU 7.2 prints the mismatch and exits with status 1."""
    require_qemu()
    seen = {}
    for kind in ("qsd", "qmpgraph"):
        d = tmp_path / kind
        _prepare(d, {1: ["write -P 0x12 70000 10"]})
        daemon = LiveDaemon(kind, require_qemu(), d, [])
        try:
            spec = _quorum([_child(0), _child(1)], blkverify=True)
            daemon.ok("blockdev-add", **spec)
            daemon.start_nbd()
            daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="q")
            res = subprocess.run(
                [
                    "qemu-io",
                    "-r",
                    "-f",
                    "raw",
                    daemon.uri("e"),
                    "-c",
                    "read 0 64k",
                    "-c",
                    "read 64k 64k",
                ],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            status = daemon.proc.wait(TIMEOUT)
        finally:
            daemon.stop()
        seen[kind] = (
            _TIMING.sub("", res.stdout + res.stderr).strip(),
            status,
            (d / "stderr.txt").read_text(),
        )
    assert seen["qmpgraph"] == seen["qsd"]
    assert seen["qsd"][1] == 1


# -- in-process: the monitor's rate limit, in virtual time ---------------------


async def test_report_bad_rate_limit(tmp_path: Path, autojump_clock: Any) -> None:
    """QEMU's monitor: the first QUORUM_REPORT_BAD of a node goes out at once,
    later ones of the same second are held and only the last is sent when the
    second is over; another node's events are not held by this one's."""
    for i in range(3):
        (tmp_path / f"c{i}.raw").write_bytes(b"\x11" * 65536)
    with (tmp_path / "c2.raw").open("r+b") as f:
        f.write(b"\x99" * 4096)
    c = Client()
    c.ok(
        "blockdev-add",
        {
            "driver": "quorum",
            "node-name": "q",
            "vote-threshold": 2,
            "children": [
                {
                    "driver": "raw",
                    "node-name": f"c{i}",
                    "file": {"driver": "file", "filename": str(tmp_path / f"c{i}.raw")},
                }
                for i in range(3)
            ],
        },
    )
    seen: list[tuple[float, dict[str, Any]]] = []
    c.daemon.subscribe(lambda ev: seen.append((trio.current_time(), ev)))
    io = attach(c, "q", writable=False)
    start = trio.current_time()
    with trio.fail_after(100):
        for length in (512, 1024, 2048):
            assert await io.read(0, length) == b"\x11" * length
            await trio.sleep(0.2)
        await trio.sleep(2)
    got = [(round(t - start, 6), ev["data"]["sectors-count"]) for t, ev in seen]
    # 1, 2 and 4 sectors were reported at 0, 0.2 and 0.4 s: 1 at once, 4 at 1.0 s.
    assert got == [(0, 1), (1.0, 4)]
