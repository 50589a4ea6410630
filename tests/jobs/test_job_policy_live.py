"""Mirror and backup error policies, zeros and compression, live against qsd.

Each test runs the same steps on qemu-storage-daemon and on qmpgraph and
compares what QEMU makes visible: the job events, and the target images
(``qemu-img map``, the allocated size, the bytes of compressed qcow2 files).

* a mirror whose target fails one write (blkdebug) under
  on-target-error=stop pauses, resumes on block-job-resume and completes
  with the target equal to the source;
* a backup whose source fails one read under on-source-error=ignore
  retries and completes with the target equal to the source;
* a mirror into a raw target leaves holes where the source reads as zeros
  (same map and allocated size as qsd's target);
* a compressed backup gives a qcow2 file of the same size with the same
  clusters compressed, normal and zero (where qsd puts the normal ones
  depends on which of its parallel tasks finishes first).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _source(path: Path) -> None:
    """4 MiB raw: compressible runs, incompressible bytes, zeros, a hole."""
    rnd = random.Random(7)
    data = bytearray(4 * MiB)
    data[0 : 640 << 10] = b"\x11" * (640 << 10)
    data[MiB : MiB + (256 << 10)] = rnd.randbytes(256 << 10)
    data[2 * MiB + 4096 : 2 * MiB + 8192] = b"qmpgraph" * 512
    path.write_bytes(bytes(data[: 3 * MiB]))
    with path.open("r+b") as f:
        f.truncate(4 * MiB)


def _wait_event(daemon: LiveDaemon, name: str, status: str | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        for ev in daemon.events:
            if ev["event"] == name and (status is None or ev["data"].get("status") == status):
                return
        assert time.monotonic() < deadline, (name, status, daemon.events)
        daemon.qmp("query-jobs")  # reads the events that came meanwhile
        time.sleep(0.02)


def _jobs_gone(daemon: LiveDaemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while daemon.ok("query-jobs"):
        assert time.monotonic() < deadline, daemon.ok("query-jobs")
        time.sleep(0.02)


def _events(daemon: LiveDaemon) -> list[tuple[str, Any]]:
    keep = ("JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY")
    return [
        (ev["event"], ev["data"].get("status") or ev["data"].get("action"))
        for ev in daemon.events
        if ev["event"] in keep
    ]


def _add_raw(daemon: LiveDaemon, name: str, filename: str, **debug: Any) -> None:
    file: dict[str, Any] = {"driver": "file", "filename": filename}
    if debug:
        file = {"driver": "blkdebug", "image": file, "inject-error": debug["rules"]}
    daemon.ok("blockdev-add", driver="raw", node_name=name, file=file)


def _map(path: Path, fmt: str) -> Any:
    return json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, str(path)))


def _clusters(path: Path, fmt: str, cluster: int = 65536) -> list[tuple[bool, bool, bool]]:
    """The map per cluster: (data, zero, compressed-or-unmapped), offsets left out."""
    out = []
    for ext in _map(path, fmt):
        for _ in range(ext["length"] // cluster):
            out.append((ext["data"], ext["zero"], "offset" not in ext))
    return out


def _each(tmp_path: Path, body: Any) -> dict[str, Any]:
    qsd = require_qemu()
    results = {}
    for kind in ("qsd", "qmpgraph"):
        d = tmp_path / kind
        d.mkdir()
        _source(d / "src.img")
        daemon = LiveDaemon(kind, qsd, d, [])
        try:
            results[kind] = body(daemon, d)
        finally:
            daemon.stop()
    return results


def test_mirror_target_error_stop_then_resume(tmp_path: Path) -> None:
    def body(daemon: LiveDaemon, d: Path) -> Any:
        run("qemu-img", "create", "-q", "-f", "raw", str(d / "dst.img"), "4M")
        _add_raw(daemon, "src", "src.img")
        rule = {"event": "none", "iotype": "write", "errno": 28, "once": True, "sector": 2048}
        _add_raw(daemon, "dst", "dst.img", rules=[rule])
        daemon.ok(
            "blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
            on_target_error="enospc",
        )  # fmt: skip
        _wait_event(daemon, "JOB_STATUS_CHANGE", "paused")
        info = daemon.ok("query-block-jobs")[0]
        assert (info["io-status"], info["paused"]) == ("nospace", True)
        daemon.ok("block-job-resume", device="j")
        _wait_event(daemon, "BLOCK_JOB_READY")
        daemon.ok("block-job-complete", device="j")
        _jobs_gone(daemon)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(d / "src.img"),
            str(d / "dst.img"))  # fmt: skip
        return _events(daemon)

    results = _each(tmp_path, body)
    assert results["qmpgraph"] == results["qsd"]
    assert ("BLOCK_JOB_ERROR", "stop") in results["qsd"]


def test_backup_source_error_ignore_retries(tmp_path: Path) -> None:
    def body(daemon: LiveDaemon, d: Path) -> Any:
        run("qemu-img", "create", "-q", "-f", "raw", str(d / "dst.img"), "4M")
        rule = {"event": "none", "iotype": "read", "errno": 5, "once": True, "sector": 2048}
        _add_raw(daemon, "src", "src.img", rules=[rule])
        _add_raw(daemon, "dst", "dst.img")
        daemon.ok(
            "blockdev-backup", job_id="b", device="src", target="dst", sync="full",
            on_source_error="ignore",
        )  # fmt: skip
        _jobs_gone(daemon)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(d / "src.img"),
            str(d / "dst.img"))  # fmt: skip
        return _events(daemon)

    results = _each(tmp_path, body)
    assert results["qmpgraph"] == results["qsd"]
    assert ("BLOCK_JOB_ERROR", "ignore") in results["qsd"]


def test_mirror_leaves_holes_like_qsd(tmp_path: Path) -> None:
    def body(daemon: LiveDaemon, d: Path) -> Any:
        run("qemu-img", "create", "-q", "-f", "raw", str(d / "dst.img"), "4M")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4M", str(d / "dst.img"))
        _add_raw(daemon, "src", "src.img")
        _add_raw(daemon, "dst", "dst.img")
        daemon.ok("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
        _wait_event(daemon, "BLOCK_JOB_READY")
        daemon.ok("block-job-cancel", device="j")
        _jobs_gone(daemon)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(d / "src.img"),
            str(d / "dst.img"))  # fmt: skip
        return _map(d / "dst.img", "raw"), (d / "dst.img").stat().st_blocks

    results = _each(tmp_path, body)
    assert results["qmpgraph"] == results["qsd"]


def test_compressed_backup_writes_the_same_file(tmp_path: Path) -> None:
    def body(daemon: LiveDaemon, d: Path) -> Any:
        run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "t.qcow2"), "4M")
        _add_raw(daemon, "src", "src.img")
        daemon.ok(
            "blockdev-add", driver="qcow2", node_name="t",
            file={"driver": "file", "filename": "t.qcow2"},
        )  # fmt: skip
        daemon.ok("blockdev-backup", job_id="b", device="src", target="t", sync="full",
                  compress=True)  # fmt: skip
        _jobs_gone(daemon)
        daemon.ok("blockdev-del", node_name="t")
        run("qemu-img", "check", "-q", str(d / "t.qcow2"))
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(d / "src.img"),
            str(d / "t.qcow2"))  # fmt: skip
        return _clusters(d / "t.qcow2", "qcow2"), (d / "t.qcow2").stat().st_size

    results = _each(tmp_path, body)
    assert results["qmpgraph"] == results["qsd"]


def test_active_mirror_target_error_leaves_the_guest_write(tmp_path: Path) -> None:
    """write-blocking: the guest's write succeeds although its copy to the
    target fails; on-target-error=stop pauses the job, the resumed job copies
    the range again and the completed target equals the source."""

    def body(daemon: LiveDaemon, d: Path) -> Any:
        run("qemu-img", "create", "-q", "-f", "raw", str(d / "dst.img"), "4M")
        _add_raw(daemon, "src", "src.img")
        # Offset 3 MiB is a hole of the source: the initial copy zeroes it
        # (a write-zeroes request, not a write), only the guest's write hits.
        rule = {"event": "none", "iotype": "write", "errno": 5, "once": True, "sector": 6144}
        _add_raw(daemon, "dst", "dst.img", rules=[rule])
        daemon.ok(
            "blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
            copy_mode="write-blocking", on_target_error="stop", filter_node_name="mt",
        )  # fmt: skip
        _wait_event(daemon, "BLOCK_JOB_READY")
        daemon.start_nbd()
        # The guest writes through the mirror's filter (a write straight to
        # the source would bypass the job).
        daemon.ok("block-export-add", type="nbd", id="g", node_name="mt", writable=True)
        out = run("qemu-io", "-f", "raw", "-c", f"write -P 0x66 {3 * MiB} 4096", daemon.uri("mt"))
        assert "wrote" in out, out
        _wait_event(daemon, "JOB_STATUS_CHANGE", "standby")
        info = daemon.ok("query-block-jobs")[0]
        assert (info["io-status"], info["status"]) == ("failed", "standby")
        daemon.ok("block-export-del", id="g")
        daemon.ok("block-job-resume", device="j")
        daemon.ok("block-job-complete", device="j")
        _jobs_gone(daemon)
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(d / "src.img"),
            str(d / "dst.img"))  # fmt: skip
        return _events(daemon)

    results = _each(tmp_path, body)
    assert results["qmpgraph"] == results["qsd"]
    assert ("BLOCK_JOB_ERROR", "stop") in results["qsd"]
