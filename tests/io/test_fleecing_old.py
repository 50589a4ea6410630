"""Fleecing, the old scheme (QEMU-BLOCK-GRAPH.md 6.5 A; QEMU's image-fleecing
test), live: a ``blockdev-backup sync=none`` into a qcow2 temp node whose
backing is the active disk, the temp node exported over NBD.

The guest (a writable export of the source, which the backup's filter
moves onto itself) overwrites regions before and while ``nbdcopy`` reads
the fleecing export.  The copy must equal the disk as it was when the
backup started, the source must hold the new data, and both daemons must
send the same events (the job is cancelled at the end: BLOCK_JOB_CANCELLED,
the filter dropped, the guest export back on the source), drain bounces and
progress aside (see ``_significant``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_qcow2_export import _io, _need

pytestmark = pytest.mark.qemu

EARLY = ["write -P 0xa1 0 128k", "write -P 0xa2 1M 64k"]
DURING = [
    "write -P 0xb2 100000 300000",
    "write -P 0xc3 2M 1M",
    "write -z 3200k 4k",
    "write -P 0xd4 4000k 96k",
    "write -P 0xe5 5000 10",
    "flush",
]


def _make_source(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    src = d / "source.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    _io(src, "qcow2", "write -P 0x11 0 2M", "write -P 0x22 2M 1536k", "write -z 1536k 64k")
    shutil.copy(src, d / "orig.qcow2")


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    out = run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], daemon.uri("guest"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _fleece(kind: str, qsd: str, d: Path) -> tuple[list[Any], list[Any]]:
    """One run; (events, query-block-exports at the end)."""
    _make_source(d)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "fleece.qcow2"), "4M")
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    copy = d / "copy.raw"
    try:
        for name in ("source.qcow2", "fleece.qcow2"):
            (d / "run" / name).symlink_to(d / name)
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="source",
            file={"driver": "file", "filename": "source.qcow2"},
        )
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="temp",
            backing="source",
            file={"driver": "file", "filename": "fleece.qcow2"},
        )
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="source", name="guest", writable=True
        )
        daemon.ok("blockdev-backup", job_id="fleecing", device="source", target="temp", sync="none")
        daemon.ok("block-export-add", type="nbd", id="f", node_name="temp", name="fleece")
        _guest(daemon, EARLY)
        reader = subprocess.Popen(
            ["nbdcopy", daemon.uri("fleece"), str(copy)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _guest(daemon, DURING)
        _, err = reader.communicate(timeout=TIMEOUT)
        assert reader.returncode == 0, err
        daemon.ok("block-export-del", id="f")
        daemon.ok("block-job-cancel", device="fleecing")
        daemon.ok("query-jobs")
        exports = daemon.ok("query-block-exports")
        daemon.ok("block-export-del", id="g")
        daemon.ok("blockdev-del", node_name="temp")
    finally:
        daemon.stop()
    return _significant(daemon.events), exports


def _significant(events: list[dict[str, Any]]) -> list[Any]:
    """The events without drain bounces.

    qemu-storage-daemon also drains the exported node twice when an export
    is deleted (a paused/running pair each time), which qmpgraph does not
    replay; the offset counts the clusters the filter copied for the guest.
    """
    out: list[Any] = []
    for ev in events:
        data = dict(ev.get("data") or {})
        if ev["event"] == "JOB_STATUS_CHANGE" and data["status"] in ("paused", "running"):
            continue
        out.append((ev["event"], data))
    return out


def test_old_fleecing_copy_is_point_in_time(tmp_path: Path) -> None:
    qsd = require_qemu()
    _need("nbdcopy")
    ref = tmp_path / "ref"
    _make_source(ref)
    _io(ref / "source.qcow2", "qcow2", *EARLY, *DURING)
    results = {}
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        events, exports = _fleece(kind, qsd, d)
        assert [e["node-name"] for e in exports] == ["source"]
        run(
            "qemu-img",
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            str(d / "copy.raw"),
            str(d / "orig.qcow2"),
        )
        run("qemu-img", "compare", "-q", str(d / "source.qcow2"), str(ref / "source.qcow2"))
        run("qemu-img", "check", "-q", str(d / "source.qcow2"))
        results[kind] = events
    assert results["qmpgraph"] == results["qsd"]
