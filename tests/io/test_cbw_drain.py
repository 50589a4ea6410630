"""A backup job drops its copy-before-write filter only after the guest writes
under way through it ended (QEMU drains the node first), checked live
against qemu-storage-daemon.

A raw source (1 MiB of 0x11) is exported writable; ``blockdev-backup
sync=none`` to a throttled target (16 KiB/s) puts a copy-before-write filter
under the export.  A first guest write fills the throttle bucket, so the
copy before the second one waits about 4 s; while that write is under way the
job is cancelled (its filter goes).  The write must succeed, its data must be
in the source and the old data it replaced in the target, exactly as with
qsd.  Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from livekit import TIMEOUT, LiveDaemon  # tests/nbd helpers, put on sys.path above
from test_clients import start_pair, tool

pytestmark = pytest.mark.qemu

SETUP = (
    "truncate -s 1M src.raw; qemu-io -f raw -c 'write -P 0x11 0 1M' src.raw; truncate -s 1M tgt.raw"
)


def _wait_no_jobs(daemon: LiveDaemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while daemon.ok("query-block-jobs"):
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)


def _session(daemon: LiveDaemon, work: Path) -> list[Any]:
    daemon.ok("blockdev-add", driver="file", node_name="src", filename="src.raw")
    daemon.ok("object-add", qom_type="throttle-group", id="tg", limits={"bps-write": 16384})
    daemon.ok(
        "blockdev-add",
        driver="throttle",
        node_name="tgt",
        throttle_group="tg",
        file={"driver": "file", "filename": "tgt.raw"},
    )
    daemon.start_nbd()
    daemon.ok("block-export-add", type="nbd", id="g", node_name="src", name="g", writable=True)
    daemon.ok("blockdev-backup", job_id="j", device="src", target="tgt", sync="none")
    steps: list[Any] = [
        tool(daemon, "qemu-io", "-f", "raw", "-c", "write -q -P 0x22 0 64k", daemon.uri("g"))
    ]
    slow = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "write -q -P 0x33 256k 4k", daemon.uri("g")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1)  # the write is in the filter, its copy waiting for the throttle
        daemon.ok("block-job-cancel", device="j")
        _wait_no_jobs(daemon)
        out, _ = slow.communicate(timeout=TIMEOUT)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait(TIMEOUT)
    steps.append([slow.returncode, out.replace(daemon.nbd_path, "SOCK")])
    nodes = daemon.ok("query-named-block-nodes", flat=True)
    steps.append(sorted("#auto" if n["node-name"][0] == "#" else n["node-name"] for n in nodes))
    steps.append([e["event"] for e in daemon.events if e["event"].startswith("BLOCK_JOB")])
    daemon.stop()
    src, tgt = (work / "src.raw").read_bytes(), (work / "tgt.raw").read_bytes()
    steps.append([src[:65536] == b"\x22" * 65536, src[256 << 10 : 260 << 10] == b"\x33" * 4096])
    steps.append([tgt[:65536] == b"\x11" * 65536, tgt[256 << 10 : 320 << 10] == b"\x11" * 65536])
    return steps


def test_filter_drop_waits_for_guest_write(tmp_path: Path) -> None:
    qsd, ours = start_pair(tmp_path, SETUP, [])
    try:
        want = _session(qsd, tmp_path / "qsd")
        got = _session(ours, tmp_path / "qmpgraph")
    finally:
        qsd.stop()
        ours.stop()
    assert got == want
    # QEMU's answers, as recorded by this very run against qsd: the write
    # succeeded and landed, the old data went to the target first.
    assert want[1] == [0, ""]
    assert want[-2] == [True, True] and want[-1] == [True, True]
