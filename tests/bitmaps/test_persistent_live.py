"""Persistent bitmaps in qcow2 images, against qemu-storage-daemon 7.2.

Both daemons open an image that ``qemu-img bitmap --add`` gave two bitmaps
(one disabled), take the same NBD writes, add persistent bitmaps, merge, and
delete the node (which stores the bitmaps); then the image is reopened and
the bitmaps read back.  Compared with qsd, live: ``query-named-block-nodes``
(``dirty-bitmaps`` and the image's format-specific ``bitmaps`` with their
``in-use``/``auto`` flags), every sha256 before the store and after the
reload, and ``qemu-img info`` after a removal and after the daemon quits.
``qemu-img check`` must find each image clean.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

NAMES = ("q1", "q2", "p1", "p2")


def _info(img: Path) -> Any:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(img)))
    return info["format-specific"]["data"].get("bitmaps")


def _check(img: Path) -> None:
    out = run("qemu-img", "check", "--output=json", str(img))
    report = json.loads(out)
    assert not report.get("leaks") and not report.get("corruptions"), report


def _node(d: LiveDaemon) -> Any:
    for info in d.ok("query-named-block-nodes", flat=True):
        if info["node-name"] == "a":
            fmt = info["image"]["format-specific"]["data"]
            return [info.get("dirty-bitmaps"), fmt.get("bitmaps")]
    return None


def _shas(d: LiveDaemon) -> list[Any]:
    return [d.ok("x-debug-block-dirty-bitmap-sha256", node="a", name=n) for n in NAMES]


def _session(kind: str, qsd: str, work: Path) -> list[Any]:
    work.mkdir(parents=True)
    img = work / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-img", "bitmap", "--add", "-g", "4096", str(img), "q1")
    run("qemu-img", "bitmap", "--add", "--disable", str(img), "q2")
    spec = f"driver=qcow2,node-name=a,file.driver=file,file.filename={img},file.node-name=af"
    d = LiveDaemon(kind, qsd, work, [spec])
    seen: list[Any] = []
    try:
        seen += [_node(d), _info(img)]
        d.ok("block-dirty-bitmap-add", node="a", name="p1", persistent=True)
        d.ok("block-dirty-bitmap-add", node="a", name="p2", persistent=True,
             granularity=512, disabled=True)  # fmt: skip
        d.ok("block-dirty-bitmap-add", node="a", name="t1")
        d.start_nbd()
        d.ok("block-export-add", type="nbd", id="e", node_name="a", writable=True)
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1", "-c", "write -P 2 70000 200000",
            d.uri("a"))  # fmt: skip
        d.ok("block-dirty-bitmap-merge", node="a", target="p2", bitmaps=["q1"])
        seen += [_shas(d), _node(d), _info(img)]
        d.ok("block-export-del", id="e")
        for _ in range(100):  # the export goes once its clients are gone
            if not d.ok("query-block-exports"):
                break
            time.sleep(0.05)
        d.ok("blockdev-del", node_name="a")
        seen.append(_info(img))
        _check(img)
        d.ok("blockdev-add", driver="qcow2", node_name="a",
             file={"driver": "file", "filename": str(img)})  # fmt: skip
        seen += [_shas(d), _node(d), _info(img)]
        d.ok("block-dirty-bitmap-remove", node="a", name="q2")
        seen.append(_info(img))
    finally:
        d.stop()
    seen.append(_info(img))
    _check(img)
    return seen


def test_persistent_bitmaps_as_qsd(tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _session("qsd", qsd, tmp_path / "qsd")
    got = _session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want
    assert want[-1] and [b["name"] for b in want[-1]] == ["q1", "p2", "p1"]


def _killed(kind: str, qsd: str, work: Path) -> list[Any]:
    """Writes with a loaded bitmap, then SIGKILL: the image keeps it in use."""
    work.mkdir(parents=True)
    img = work / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M")
    run("qemu-img", "bitmap", "--add", str(img), "q1")
    spec = f"driver=qcow2,node-name=a,file.driver=file,file.filename={img}"
    d = LiveDaemon(kind, qsd, work, [spec])
    try:
        d.start_nbd()
        d.ok("block-export-add", type="nbd", id="e", node_name="a", writable=True)
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 300k", d.uri("a"))
        d.proc.kill()
        d.proc.wait(30)
    finally:
        d.stop()
    _check(img)
    return [_info(img)]


def test_a_killed_daemon_leaves_bitmaps_in_use(tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _killed("qsd", qsd, tmp_path / "qsd")
    assert _killed("qmpgraph", qsd, tmp_path / "qmpgraph") == want
    assert want == [[{"flags": ["in-use", "auto"], "name": "q1", "granularity": 65536}]]
