"""Dirty bitmaps tracked by the data path, against qemu-storage-daemon 7.2.

Both daemons open the same images (a qcow2 and a raw over a file), get the
same bitmaps (several granularities, one disabled), export the nodes over
NBD and take the same qemu-io writes, write-zeroes and discards; then every
bitmap's ``x-debug-block-dirty-bitmap-sha256`` and the ``dirty-bitmaps`` of
``query-named-block-nodes`` must be equal.  The expected values are qsd's,
computed live.  (Bitmaps on the file node *under* a qcow2 node are left out:
qmpgraph's qcow2 data path writes its file without the generic path.)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

BITMAPS: list[tuple[str, str, dict[str, Any]]] = [
    ("a", "b0", {}),
    ("a", "b512", {"granularity": 512}),
    ("a", "off", {"disabled": True}),
    ("r", "r0", {"granularity": 4096}),
    ("r", "big", {"granularity": 1 << 20}),
    ("rf", "f0", {"granularity": 4096}),
]

WRITES = [
    "write -P 1 0 1",
    "write -P 2 70000 200000",
    "write -z 600000 5000",
    "write -z -u 700000 70000",
    "discard 900000 3000",
    "write -P 0 950000 512",
    "write -P 3 999000 1000",
]


def _start(kind: str, qsd: str, work: Path) -> LiveDaemon:
    work.mkdir(parents=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "1M")
    run("qemu-img", "create", "-q", "-f", "raw", str(work / "r.raw"), "1000000")
    return LiveDaemon(
        kind,
        qsd,
        work,
        [
            f"driver=qcow2,node-name=a,discard=unmap,file.driver=file,"
            f"file.filename={work}/a.qcow2,file.node-name=af",
            f"driver=raw,node-name=r,discard=unmap,detect-zeroes=unmap,file.driver=file,"
            f"file.filename={work}/r.raw,file.node-name=rf,file.discard=unmap",
        ],
    )


def _observe(d: LiveDaemon) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for node, name, _ in BITMAPS:
        seen[f"{node}/{name}"] = d.ok("x-debug-block-dirty-bitmap-sha256", node=node, name=name)
    for info in d.ok("query-named-block-nodes"):
        seen[info["node-name"]] = info.get("dirty-bitmaps")
    return seen


def _session(d: LiveDaemon) -> list[dict[str, Any]]:
    for node, name, extra in BITMAPS:
        d.ok("block-dirty-bitmap-add", node=node, name=name, **extra)
    d.start_nbd()
    d.ok("block-export-add", type="nbd", id="ea", node_name="a", writable=True)
    d.ok("block-export-add", type="nbd", id="er", node_name="r", writable=True)
    states = [_observe(d)]
    for export in ("a", "r"):
        args: list[str] = []
        for cmd in WRITES:
            args += ["-c", cmd]
        run("qemu-io", "-f", "raw", *args, d.uri(export))
        states.append(_observe(d))
    d.ok("block-dirty-bitmap-clear", node="a", name="b0")
    d.ok("block-dirty-bitmap-enable", node="a", name="off")
    d.ok("block-dirty-bitmap-merge", node="a", target="b0", bitmaps=["b512"])
    d.ok("block-dirty-bitmap-merge", node="r", target="r0", bitmaps=["big"])
    states.append(_observe(d))
    run("qemu-io", "-f", "raw", "-c", "write -P 9 300000 4096", d.uri("a"))
    states.append(_observe(d))
    return states


def test_same_writes_same_bitmaps_as_qsd(tmp_path: Path) -> None:
    qsd = require_qemu()
    results = {}
    for kind in ("qsd", "qmpgraph"):
        d = _start(kind, qsd, tmp_path / kind)
        try:
            results[kind] = _session(d)
        finally:
            d.stop()
    for want, got in zip(results["qsd"], results["qmpgraph"], strict=True):
        got["af"] = want["af"] = None  # see the module docstring
        assert got == want
    # The writes did dirty something, so the comparison is not vacuous.
    assert results["qsd"][1]["a/b0"] != results["qsd"][0]["a/b0"]


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is required when CI=true (apt-get install libnbd-bin)")
        pytest.skip(f"{tool} not installed (libnbd-bin)")


def _nbd_session(d: LiveDaemon) -> list[str]:
    d.ok("block-dirty-bitmap-add", node="a", name="b0")
    d.ok("block-dirty-bitmap-add", node="a", name="b512", granularity=512)
    d.ok("block-dirty-bitmap-add", node="a", name="frozen", disabled=True)
    d.start_nbd()
    d.ok("block-export-add", type="nbd", id="w", node_name="a", name="w", writable=True)
    run("qemu-io", "-f", "raw", *[a for w in WRITES for a in ("-c", w)], d.uri("w"))
    d.ok("block-dirty-bitmap-merge", node="a", target="frozen", bitmaps=["b512"])
    d.ok("block-export-add", type="nbd", id="e", node_name="a", name="e",
         bitmaps=["frozen", {"node": "a", "name": "b0"}])  # fmt: skip
    d.ok("block-export-add", type="nbd", id="e2", node_name="a", name="e2",
         bitmaps=["b512"], writable=True)  # fmt: skip
    out = [
        run("nbdinfo", "--map=qemu:dirty-bitmap:frozen", d.uri("e")),
        run("nbdinfo", "--map=qemu:dirty-bitmap:b0", d.uri("e")),
        run("nbdinfo", "--map=qemu:dirty-bitmap:b512", d.uri("e2")),
        run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={d.nbd_path}").replace(
            d.nbd_path, "SOCK"
        ),
        run(
            "qemu-img",
            "map",
            "--output=json",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={d.nbd_path},export=e,"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0",
        ),
    ]
    d.ok("block-export-del", id="e")
    out.append(str(d.ok("query-named-block-nodes")[-1].get("dirty-bitmaps")))
    return out


def test_bitmaps_over_nbd_as_qsd(tmp_path: Path) -> None:
    """qemu:dirty-bitmap:NAME contexts (listing, maps, qemu-img's x-dirty-bitmap)."""
    qsd = require_qemu()
    _need("nbdinfo")
    results = {}
    for kind in ("qsd", "qmpgraph"):
        d = _start(kind, qsd, tmp_path / kind)
        try:
            results[kind] = _nbd_session(d)
        finally:
            d.stop()
    assert results["qmpgraph"] == results["qsd"]
    assert "dirty" in results["qsd"][0]
