"""libvirt's pull-mode backup, as virtnbdbackup reads it, live against both daemons.

The disk has a checkpoint bitmap and a guest (a writable NBD export of the
disk).  One transaction makes the backup bitmap (disabled, merged from the
checkpoint), starts blockdev-backup sync=none into a scratch qcow2 backed by
the disk, and opens the next checkpoint; the scratch node is exported
read-only with the backup bitmap, which block-export-add finds down the
scratch node's backing chain.  The guest then overwrites data; the reader
must still see the disk as it was at the transaction, and the bitmap's
context (``qemu:dirty-bitmap:NAME``) must map what was written before it.
``nbdinfo --map`` and ``nbdcopy`` read it, as a backup tool would.  The
expected values are what qemu-storage-daemon shows, and qmpgraph must
show the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import require_qemu
from livekit import LiveDaemon, run

pytestmark = pytest.mark.qemu

BEFORE = ["write -P 0x31 64k 64k", "write -P 0x32 1M 4k"]
AFTER = ["write -P 0x41 0 128k", "write -P 0x42 1M 64k", "write -P 0x43 3M 64k"]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is required (libnbd-bin)")


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    out = run("qemu-io", "-f", "raw", *args, daemon.uri("guest"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _pull(kind: str, qsd: str, d: Path) -> tuple[str, str, bytes, list[str]]:
    """One backup on one daemon: (bitmap map, allocation map, data read, events)."""
    d.mkdir(parents=True)
    disk, scratch = d / "disk.qcow2", d / "scratch.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(disk))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(scratch), "4M")
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    try:
        daemon.ok("blockdev-add", driver="file", node_name="disk-file", filename=str(disk))
        daemon.ok("blockdev-add", driver="qcow2", node_name="disk", file="disk-file")
        daemon.ok("block-dirty-bitmap-add", node="disk", name="c1", persistent=True)
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="disk", name="guest", writable=True
        )
        _guest(daemon, BEFORE)
        daemon.ok("blockdev-add", driver="file", node_name="scratch-file", filename=str(scratch))
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="scratch",
            file="scratch-file",
            backing="disk",
        )
        bitmap = {"node": "disk", "name": "backup-disk", "persistent": False, "disabled": True}
        merge = {"node": "disk", "target": "backup-disk", "bitmaps": ["c1"]}
        backup = {
            "device": "disk",
            "job-id": "backup-disk",
            "target": "scratch",
            "sync": "none",
            "auto-dismiss": False,
        }
        actions = [
            {"type": "block-dirty-bitmap-add", "data": bitmap},
            {"type": "block-dirty-bitmap-merge", "data": merge},
            {"type": "blockdev-backup", "data": backup},
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "c2"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "c1"}},
        ]
        daemon.ok("transaction", actions=actions)
        daemon.ok(
            "block-export-add",
            type="nbd",
            id="b",
            node_name="scratch",
            name="backup",
            bitmaps=["backup-disk"],
        )
        _guest(daemon, AFTER)
        uri = daemon.uri("backup")
        dirty = run("nbdinfo", "--map=qemu:dirty-bitmap:backup-disk", uri)
        alloc = run("nbdinfo", "--map", uri)
        copy = d / "copy.raw"
        run("nbdcopy", uri, str(copy))
        daemon.ok("block-export-del", id="b")
        daemon.ok("block-job-cancel", device="backup-disk", force=True)
        daemon.ok("job-dismiss", id="backup-disk")
        daemon.ok("blockdev-del", node_name="scratch")
        daemon.ok("block-dirty-bitmap-remove", node="disk", name="backup-disk")
        events = [e["event"] for e in daemon.events if e["event"] != "JOB_STATUS_CHANGE"]
        return dirty, alloc, copy.read_bytes(), events
    finally:
        daemon.stop()


def test_pull_backup_reads_point_in_time_with_bitmap(tmp_path: Path) -> None:
    qsd = require_qemu()
    _need("nbdinfo")
    _need("nbdcopy")
    results = {kind: _pull(kind, qsd, tmp_path / kind) for kind in ("qsd", "qmpgraph")}
    dirty, _, data, events = results["qsd"]
    assert results["qmpgraph"] == results["qsd"]
    # Sanity of the oracle itself: the dirty map names what BEFORE wrote.
    assert "dirty" in dirty, dirty
    expected = bytearray(b"\x11" * (4 << 20))
    expected[64 << 10 : 128 << 10] = b"\x31" * (64 << 10)
    expected[1 << 20 : (1 << 20) + 4096] = b"\x32" * 4096
    assert data == bytes(expected)
    assert "BLOCK_EXPORT_DELETED" in events
