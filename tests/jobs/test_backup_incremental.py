"""Incremental backup with a dirty bitmap, end to end (docs/interop/bitmaps.rst),
live against qemu-storage-daemon.

A bitmap is added and a full backup taken; the guest (a writable export of
the source) writes; an incremental backup (``sync=incremental``) goes into a
qcow2 image whose backing file is the full backup.  The incremental image,
read through its backing file, must equal the disk; it holds only the
clusters the guest dirtied; the bitmap is clean afterwards and records the
next writes.  Both daemons must send the same events and end with the same
bitmap (count and SHA-256).
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

ORIGINAL = ["write -P 0x11 0 2M", "write -P 0x22 2M 1536k", "write -z 1536k 64k"]
WRITES = ["write -P 0xb2 100000 300000", "write -z 2M 64k", "write -P 0xc3 3M 128k", "flush"]
LATER = ["write -P 0xd4 1M 4k", "flush"]


def _jobs_gone(daemon: LiveDaemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while daemon.ok("query-jobs"):
        assert time.monotonic() < deadline, daemon.ok("query-jobs")
        time.sleep(0.02)


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    out = run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], daemon.uri("guest"))
    assert "failed" not in out.lower(), out


def _bitmap(daemon: LiveDaemon) -> tuple[Any, str]:
    nodes = daemon.ok("query-named-block-nodes")
    info = next(n for n in nodes if n["node-name"] == "source")
    sha = daemon.ok("x-debug-block-dirty-bitmap-sha256", node="source", name="bm0")["sha256"]
    return info.get("dirty-bitmaps"), sha


def _session(kind: str, qsd: str, d: Path) -> list[Any]:
    d.mkdir(parents=True)
    src = d / "source.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    _io(src, "qcow2", *ORIGINAL)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "full.qcow2"), "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2",
        str(d / "inc.qcow2"))  # fmt: skip
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    seen: list[Any] = []
    try:
        for name in ("source", "full", "inc"):
            (d / "run" / f"{name}.qcow2").symlink_to(d / f"{name}.qcow2")
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="source",
            file={"driver": "file", "filename": "source.qcow2"},
        )
        for name in ("full", "inc"):
            daemon.ok(
                "blockdev-add",
                driver="qcow2",
                node_name=name,
                backing=None,
                file={"driver": "file", "filename": f"{name}.qcow2"},
            )
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="source", name="guest", writable=True
        )
        daemon.ok(
            "transaction",
            actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": "source", "name": "bm0"}},
                {
                    "type": "blockdev-backup",
                    "data": {"device": "source", "target": "full", "sync": "full", "job-id": "f"},
                },
            ],
        )
        _jobs_gone(daemon)
        _guest(daemon, WRITES)
        seen.append(_bitmap(daemon))
        daemon.ok(
            "blockdev-backup",
            device="source",
            target="inc",
            sync="incremental",
            bitmap="bm0",
            job_id="i",
        )
        _jobs_gone(daemon)
        seen.append(_bitmap(daemon))
        _guest(daemon, LATER)
        seen.append(_bitmap(daemon))
        daemon.ok("block-export-del", id="g")
    finally:
        daemon.stop()
    seen.append([(ev["event"], ev.get("data")) for ev in daemon.events])
    # Restore: the incremental image over the full one is the disk as it was
    # when the incremental backup started (the later write is not in it).
    ref = d / "ref.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(ref), "4M")
    _io(ref, "qcow2", *ORIGINAL, *WRITES)
    run("qemu-img", "compare", "-q", str(d / "inc.qcow2"), str(ref))
    _io(ref, "qcow2", *LATER)
    run("qemu-img", "compare", "-q", str(src), str(ref))
    # Only the dirtied clusters are in the incremental image itself.
    out = run("qemu-img", "map", "--output=json", "-f", "qcow2", str(d / "inc.qcow2"))
    return [*seen, out.count('"depth": 0, "present": true')]


def test_incremental_backup_restores_the_disk(tmp_path: Path) -> None:
    qsd = require_qemu()
    got = _session("qmpgraph", qsd, tmp_path / "g")
    want = _session("qsd", qsd, tmp_path / "q")
    assert got == want
