"""The internal bitmaps of a backup's copy-before-write filter, against qsd 7.2.

A ``sync=none`` backup (the fleecing job) puts its filter over an exported
disk; guest writes through the export then make the filter copy the old
data.  ``query-named-block-nodes`` must show what qsd shows, live: the
filter's access bitmap and its done bitmap (every cluster a guest write went
through, copied or not), block-copy's copy bitmap on the disk (what is left
to copy) and a user bitmap on the disk.  A ``sync=full`` backup held pending
shows its copy bitmap emptied by the job, and its done bitmap untouched by
the job's own copies.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu


def _bitmaps(d: LiveDaemon) -> list[Any]:
    # Auto node names end with two random digits.
    return [
        (re.sub(r"\d\d$", "RR", i["node-name"]), i.get("dirty-bitmaps"))
        for i in d.ok("query-named-block-nodes", flat=True)
    ]


def _settle(d: LiveDaemon, job: str, status: str) -> None:
    for _ in range(200):
        if any(j["id"] == job and j["status"] == status for j in d.ok("query-jobs")):
            return
        time.sleep(0.02)
    raise AssertionError((d.kind, job, status))


def _gone(d: LiveDaemon, job: str) -> None:
    for _ in range(200):
        if all(j["id"] != job for j in d.ok("query-jobs")):
            return
        time.sleep(0.02)
    raise AssertionError((d.kind, job))


def _session(kind: str, qsd: str, work: Path) -> list[Any]:
    work.mkdir(parents=True)
    for name in ("a", "t", "t2"):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "1M")
    run("qemu-io", "-c", "write -P 3 0 1M", str(work / "a.qcow2"))
    specs = [
        f"driver=qcow2,node-name={n},file.driver=file,file.filename={work}/{n}.qcow2"
        for n in ("a", "t", "t2")
    ]
    d = LiveDaemon(kind, qsd, work, specs)
    seen: list[Any] = []
    try:
        d.ok("block-dirty-bitmap-add", node="a", name="b", granularity=4096)
        d.start_nbd()
        d.ok("block-export-add", type="nbd", id="e", node_name="a", writable=True)
        d.ok("blockdev-backup", job_id="j", device="a", target="t", sync="none",
             filter_node_name="cbw")  # fmt: skip
        _settle(d, "j", "running")
        seen.append(_bitmaps(d))
        run("qemu-io", "-f", "raw", "-c", "write -P 1 64k 4k", "-c", "write -P 2 300k 70k",
            "-c", "write -z 1000k 24k", "-c", "write -P 4 64k 512", d.uri("a"))  # fmt: skip
        seen.append(_bitmaps(d))
        d.ok("job-cancel", id="j")
        _gone(d, "j")
        seen.append(_bitmaps(d))
        d.ok("blockdev-backup", job_id="k", device="a", target="t2", sync="full",
             filter_node_name="cbw2", auto_finalize=False)  # fmt: skip
        _settle(d, "k", "pending")
        run("qemu-io", "-f", "raw", "-c", "write -P 5 128k 64k", d.uri("a"))
        seen.append(_bitmaps(d))
        d.ok("job-finalize", id="k")
    finally:
        d.stop()
    return seen


def test_cbw_internal_bitmaps_as_qsd(tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _session("qsd", qsd, tmp_path / "qsd")
    got = _session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want
