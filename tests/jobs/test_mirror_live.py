"""blockdev-mirror end to end against qemu-storage-daemon, live.

A qcow2 source with patterned data is exported writable (the "guest").  The
mirror starts slowly (a speed limit) so that guest writes land while it
copies, is sped up, goes ready, gets more guest writes, then is completed
(the export moves onto the target) or cancelled after ready (the export
stays on the source).  Either way the target must equal the source image,
which must hold every guest write: checked with ``qemu-img compare`` for
qmpgraph and for qemu-storage-daemon, and the two daemons' events must be
the same sequence.
"""

from __future__ import annotations

import subprocess
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

DURING = ["write -P 0xb2 100000 300000", "write -z 2M 64k", "write -P 0xc3 3M 128k"]
AFTER_READY = ["write -P 0xd4 1M 64k", "write -P 0xe5 4000k 96k", "flush"]


def _make_images(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    src = d / "source.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    _io(src, "qcow2", "write -P 0x11 0 2M", "write -P 0x22 2M 1536k", "write -z 1536k 64k")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "target.qcow2"), "4M")


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    out = run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], daemon.uri("guest"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _wait(daemon: LiveDaemon, pred: Any) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred(daemon.ok("query-block-jobs")):
        assert time.monotonic() < deadline, daemon.ok("query-block-jobs")
        time.sleep(0.02)


def _events(daemon: LiveDaemon) -> list[tuple[str, Any]]:
    out = []
    for ev in daemon.events:
        data = dict(ev.get("data", {}))
        for key in ("len", "offset"):  # progress depends on timing
            data.pop(key, None)
        out.append((ev["event"], data))
    return out


def _mirror(kind: str, qsd: str, d: Path, finish: str) -> tuple[list[Any], str]:
    """One run; (its events, the export's node afterwards)."""
    _make_images(d)
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    try:
        for name in ("source.qcow2", "target.qcow2"):
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
            node_name="target",
            file={"driver": "file", "filename": "target.qcow2"},
        )
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="g", node_name="source", name="guest", writable=True
        )
        daemon.ok(
            "blockdev-mirror", job_id="m", device="source", target="target", sync="full", speed=1
        )
        _guest(daemon, DURING)
        daemon.ok("block-job-set-speed", device="m", speed=0)
        _wait(daemon, lambda jobs: jobs and jobs[0]["ready"])
        _guest(daemon, AFTER_READY)
        if finish == "complete":
            daemon.ok("block-job-complete", device="m")
        else:
            daemon.ok("block-job-cancel", device="m")
        _wait(daemon, lambda jobs: not jobs)
        node = daemon.ok("query-block-exports")[0]["node-name"]
        daemon.ok("block-export-del", id="g")
    finally:
        daemon.stop()
    return _events(daemon), node


@pytest.mark.parametrize("finish", ["complete", "cancel"])
def test_mirror_target_equals_source(tmp_path: Path, finish: str) -> None:
    qsd = require_qemu()
    ref = tmp_path / "ref"
    _make_images(ref)
    _io(ref / "source.qcow2", "qcow2", *DURING, *AFTER_READY)
    results = {}
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        events, node = _mirror(kind, qsd, d, finish)
        assert node == ("target" if finish == "complete" else "source")
        run(
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            str(d / "source.qcow2"),
            str(ref / "source.qcow2"),
        )
        run(
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            str(d / "target.qcow2"),
            str(d / "source.qcow2"),
        )
        run("qemu-img", "check", "-q", "-f", "qcow2", str(d / "target.qcow2"))
        results[kind] = events
    assert results["qmpgraph"] == results["qsd"]


# Many small writes from one client, in order: the guest's view at the end is
# the original with all of them applied, whenever the pivot happened.
BUSY = [f"write -P {0x30 + i % 64} {(i * 37 % 60) * 65536 + i * 512} 4k" for i in range(300)]


def test_complete_while_the_guest_writes(tmp_path: Path) -> None:
    """block-job-complete while a guest keeps writing: every write reaches the
    disk the guest sees afterwards (the target), none is lost in the pivot."""
    qsd = require_qemu()
    ref = tmp_path / "ref"
    _make_images(ref)
    _io(ref / "source.qcow2", "qcow2", *BUSY)
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        _make_images(d)
        daemon = LiveDaemon(kind, qsd, d / "run", [])
        try:
            for name in ("source.qcow2", "target.qcow2"):
                (d / "run" / name).symlink_to(d / name)
            for name in ("source", "target"):
                daemon.ok(
                    "blockdev-add",
                    driver="qcow2",
                    node_name=name,
                    file={"driver": "file", "filename": f"{name}.qcow2"},
                )
            daemon.start_nbd()
            daemon.ok(
                "block-export-add",
                type="nbd",
                id="g",
                node_name="source",
                name="guest",
                writable=True,
            )
            daemon.ok("blockdev-mirror", job_id="m", device="source", target="target", sync="full")
            _wait(daemon, lambda jobs: jobs and jobs[0]["ready"])
            writer = subprocess.Popen(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    *[a for c in BUSY for a in ("-c", c)],
                    daemon.uri("guest"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.05)
            daemon.ok("block-job-complete", device="m")
            _wait(daemon, lambda jobs: not jobs)
            _, err = writer.communicate(timeout=TIMEOUT)
            assert writer.returncode == 0, err
            assert daemon.ok("query-block-exports")[0]["node-name"] == "target"
            daemon.ok("block-export-del", id="g")
        finally:
            daemon.stop()
        run("qemu-img", "compare", "-q", str(d / "target.qcow2"), str(ref / "source.qcow2"))
