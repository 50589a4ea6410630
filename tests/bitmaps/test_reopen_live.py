"""Persistent bitmaps across read-only and read-write reopens, against qsd 7.2.

libvirt's external snapshot: the disk's node has a bitmap from the image
and a new persistent one, takes NBD writes, then ``blockdev-snapshot`` puts
an overlay on it, which reopens it read-only.  QEMU stores the bitmaps then
(qcow2_reopen_bitmaps_ro): the image holds them clean (no ``in-use``) while
the daemon still runs, and ``qemu-img check`` finds it consistent.  A
``blockdev-reopen`` back to read-write marks them in use again
(qcow2_reopen_bitmaps_rw), and they are writable.  After the daemon quits
the image holds the final bitmaps.  Every picture is compared with qsd's,
taken live; images must check clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu


def _info(img: Path) -> Any:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(img)))
    return info["format-specific"]["data"].get("bitmaps")


def _check(img: Path) -> None:
    report = json.loads(run("qemu-img", "check", "-U", "--output=json", str(img)))
    assert not report.get("leaks") and not report.get("corruptions"), report


def _bitmaps(d: LiveDaemon, node: str) -> Any:
    for info in d.ok("query-named-block-nodes", flat=True):
        if info["node-name"] == node:
            return info.get("dirty-bitmaps")
    return None


def _session(kind: str, qsd: str, work: Path) -> list[Any]:
    work.mkdir(parents=True)
    disk, overlay = work / "disk.qcow2", work / "ov.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M")
    run("qemu-img", "bitmap", "--add", "-g", "4096", str(disk), "c0")
    run("qemu-io", "-c", "write -P 7 0 8k", str(disk))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(overlay), "1M")
    spec = f"driver=qcow2,node-name=d,file.driver=file,file.filename={disk},file.node-name=df"
    d = LiveDaemon(kind, qsd, work, [spec])
    seen: list[Any] = []
    try:
        d.ok("block-dirty-bitmap-add", node="d", name="c1", persistent=True, granularity=4096)
        d.start_nbd()
        d.ok("block-export-add", type="nbd", id="e", node_name="d", writable=True)
        run("qemu-io", "-f", "raw", "-c", "write -P 1 64k 100k", d.uri("d"))
        d.ok("block-export-del", id="e")
        seen += [_bitmaps(d, "d"), _info(disk)]
        d.ok("blockdev-add", driver="qcow2", node_name="o", backing=None,
             file={"driver": "file", "filename": str(overlay)})  # fmt: skip
        d.ok("transaction", actions=[
            {"type": "blockdev-snapshot", "data": {"node": "d", "overlay": "o"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "o", "name": "c1", "persistent": True, "granularity": 4096}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "d", "name": "c1"}},
        ])  # fmt: skip
        seen += [_bitmaps(d, "d"), _info(disk)]
        _check(disk)
        seen.append(d.qmp("block-dirty-bitmap-clear", node="d", name="c0"))
        d.ok("blockdev-reopen", options=[
            {"driver": "qcow2", "node-name": "d", "read-only": False, "file": "df"},
        ])  # fmt: skip
        seen += [_bitmaps(d, "d"), _info(disk)]
        d.ok("block-dirty-bitmap-clear", node="d", name="c0")
        d.ok("block-dirty-bitmap-add", node="d", name="c2", persistent=True)
        seen += [d.ok("x-debug-block-dirty-bitmap-sha256", node="d", name=n) for n in ("c0", "c1")]
    finally:
        d.stop()
    seen += [_info(disk), _info(overlay)]
    _check(disk)
    _check(overlay)
    return seen


def test_reopens_store_and_reclaim_bitmaps_as_qsd(tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _session("qsd", qsd, tmp_path / "qsd")
    got = _session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want
    # While read-only the image holds both bitmaps clean (flags as stored).
    assert want[3] == [
        {"flags": ["auto"], "name": "c0", "granularity": 4096},
        {"flags": [], "name": "c1", "granularity": 4096},
    ]
