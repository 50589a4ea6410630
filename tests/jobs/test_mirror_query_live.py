"""What queries show of a mirror or active commit while guest writes land, live.

A qcow2 image is exported writable (the "guest") and a job copies it at
speed 1, so that it stays where its first iteration left it.  Guest writes
(qemu-io over NBD) then mark the job's own dirty bitmap, which
query-named-block-nodes lists on the source; the script records that
bitmap entry and the job's query-block-jobs fields after the start, after
the writes, while paused, at READY (after a speed change), after more
writes (copied at once: the job is ready and unlimited) and after the job
was cancelled.  The same script runs against
qemu-storage-daemon and qmpgraph and the two records must be equal:
background mirror (sync=full and sync=top), write-blocking mirror and
active block-commit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))
sys.path.insert(0, str(Path(__file__).parent.parent / "io"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_qcow2_export import _io  # tests/io helper

pytestmark = pytest.mark.qemu

WRITES = ["write -P 0xb2 100000 70000", "write -z 2M 64k", "write -P 0xc3 3M 128k"]
MORE = ["write -P 0xd4 1M 4k", "flush"]
JOB_KEYS = ("len", "offset", "paused", "ready", "status", "busy", "speed", "io-status")


def _make_images(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    base = d / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    _io(base, "qcow2", "write -P 0x11 0 1M")
    top = d / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    _io(top, "qcow2", "write -P 0x22 1M 512k", "write -P 0x33 3584k 256k")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "target.qcow2"), "4M")


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    out = run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], daemon.uri("guest"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _snapshot(daemon: LiveDaemon) -> dict[str, Any]:
    """``_query`` once the job's I/O under way has settled (the same answer
    twice in a row): a query right after a command may race with the copy
    in qemu-storage-daemon too."""
    prev = _query(daemon)
    deadline = time.monotonic() + TIMEOUT
    while True:
        time.sleep(0.3)
        cur = _query(daemon)
        if cur == prev:
            return cur
        assert time.monotonic() < deadline, cur
        prev = cur


def _query(daemon: LiveDaemon) -> dict[str, Any]:
    """The job bitmap entries of the top image and the job's fields."""
    nodes = daemon.ok("query-named-block-nodes", flat=True)
    top = next(n for n in nodes if n["node-name"] == "top")
    jobs = daemon.ok("query-block-jobs")
    return {
        "bitmaps": top.get("dirty-bitmaps"),
        "jobs": [{k: j.get(k) for k in JOB_KEYS} for j in jobs],
    }


def _wait_ready(daemon: LiveDaemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(j["ready"] for j in daemon.ok("query-block-jobs")):
        assert time.monotonic() < deadline, daemon.ok("query-block-jobs")
        time.sleep(0.02)


def _start(daemon: LiveDaemon, flow: str) -> None:
    if flow == "commit":
        daemon.ok("block-commit", job_id="j", device="top", speed=1)
        return
    args: dict[str, Any] = {"sync": "full", "buf_size": 65536}
    if flow == "top":
        args["sync"] = "top"
    if flow == "write-blocking":
        args["copy_mode"] = "write-blocking"
    daemon.ok("blockdev-mirror", job_id="j", device="top", target="target", speed=1, **args)


def _record(kind: str, qsd: str, d: Path, flow: str) -> list[Any]:
    _make_images(d)
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    out: list[Any] = []
    try:
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="base",
            file={"driver": "file", "filename": str(d / "base.qcow2")},
        )
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="top",
            backing="base",
            file={"driver": "file", "filename": str(d / "top.qcow2")},
        )
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="target",
            file={"driver": "file", "filename": str(d / "target.qcow2")},
        )
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="top", name="guest", writable=True
        )
        _start(daemon, flow)
        out.append(_snapshot(daemon))
        _guest(daemon, WRITES)
        out.append(_snapshot(daemon))
        daemon.ok("job-pause", id="j")
        out.append(_snapshot(daemon))
        daemon.ok("block-job-set-speed", device="j", speed=0)
        daemon.ok("job-resume", id="j")
        _wait_ready(daemon)
        out.append(_snapshot(daemon))
        _guest(daemon, MORE)
        out.append(_snapshot(daemon))
        daemon.ok("block-job-set-speed", device="j", speed=1)
        daemon.ok("block-job-cancel", device="j", force=True)
        deadline = time.monotonic() + TIMEOUT
        while daemon.ok("query-block-jobs"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out.append(_snapshot(daemon))
        daemon.ok("block-export-del", id="g")
    finally:
        daemon.stop()
    return out


@pytest.mark.parametrize("flow", ["full", "top", "write-blocking", "commit"])
def test_job_bitmap_and_fields_match_qsd(tmp_path: Path, flow: str) -> None:
    qsd = require_qemu()
    ref = _record("qsd", qsd, tmp_path / "qsd", flow)
    got = _record("qmpgraph", qsd, tmp_path / "qg", flow)
    assert got == ref
