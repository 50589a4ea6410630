"""blockdev-backup end to end against qemu-storage-daemon, live.

A qcow2 source with patterned data is exported writable (the "guest").  A
``sync=full`` backup starts slowly (a speed limit: one cluster, then a long
sleep), the guest overwrites parts of the disk, then the limit is lifted and
the job completes.  The target must equal the source as it was when the
backup started (copy-before-write saved the old clusters first), the source
must hold the guest's writes, for qmpgraph and qemu-storage-daemon alike;
a grouped pair of full backups completes (in some order) with both targets
equal to the source.
"""

from __future__ import annotations

import shutil
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

DURING = [
    "write -P 0xb2 100000 300000",
    "write -z 2M 64k",
    "write -P 0xc3 3M 128k",
    "flush",
]


def _make_images(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    src = d / "source.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    _io(src, "qcow2", "write -P 0x11 0 2M", "write -P 0x22 2M 1536k", "write -z 1536k 64k")
    shutil.copy(src, d / "orig.qcow2")
    for name in ("target.qcow2", "target2.qcow2"):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(d / name), "4M")


def _jobs_gone(daemon: LiveDaemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while daemon.ok("query-jobs"):
        assert time.monotonic() < deadline, daemon.ok("query-jobs")
        time.sleep(0.02)


def _open(daemon: LiveDaemon, d: Path, *names: str) -> None:
    for name in names:
        (d / "run" / f"{name}.qcow2").symlink_to(d / f"{name}.qcow2")
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name=name,
            file={"driver": "file", "filename": f"{name}.qcow2"},
        )


def _events(daemon: LiveDaemon) -> list[tuple[str, Any]]:
    return [(ev["event"], ev.get("data", {}).get("status")) for ev in daemon.events]


def _backup(kind: str, qsd: str, d: Path) -> list[Any]:
    _make_images(d)
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    try:
        _open(daemon, d, "source", "target")
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="source", name="guest", writable=True
        )
        daemon.ok(
            "blockdev-backup", job_id="b", device="source", target="target", sync="full", speed=1
        )
        out = run(
            "qemu-io", "-f", "raw", *[a for c in DURING for a in ("-c", c)], daemon.uri("guest")
        )
        assert "failed" not in out.lower(), out
        daemon.ok("block-job-set-speed", device="b", speed=0)
        _jobs_gone(daemon)
        daemon.ok("block-export-del", id="g")
    finally:
        daemon.stop()
    return _events(daemon)


def test_backup_is_point_in_time(tmp_path: Path) -> None:
    qsd = require_qemu()
    ref = tmp_path / "ref"
    _make_images(ref)
    _io(ref / "source.qcow2", "qcow2", *DURING)
    results = {}
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        results[kind] = _backup(kind, qsd, d)
        run("qemu-img", "compare", "-q", str(d / "target.qcow2"), str(d / "orig.qcow2"))
        run("qemu-img", "compare", "-q", str(d / "source.qcow2"), str(ref / "source.qcow2"))
        run("qemu-img", "check", "-q", str(d / "target.qcow2"))
    assert results["qmpgraph"] == results["qsd"]
    assert ("BLOCK_JOB_COMPLETED", None) in results["qsd"]


def test_grouped_full_backups_complete(tmp_path: Path) -> None:
    qsd = require_qemu()
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        _make_images(d)
        daemon = LiveDaemon(kind, qsd, d / "run", [])
        try:
            _open(daemon, d, "source", "target", "target2")
            actions = [
                {
                    "type": "blockdev-backup",
                    "data": {"device": "source", "target": t, "sync": "full", "job-id": t},
                }
                for t in ("target", "target2")
            ]
            daemon.ok("transaction", actions=actions, properties={"completion-mode": "grouped"})
            _jobs_gone(daemon)
        finally:
            daemon.stop()
        done = sorted(
            ev["data"]["device"] for ev in daemon.events if ev["event"] == "BLOCK_JOB_COMPLETED"
        )
        assert done == ["target", "target2"], (kind, daemon.events)
        for t in ("target", "target2"):
            run("qemu-img", "compare", "-q", str(d / f"{t}.qcow2"), str(d / "orig.qcow2"))
