"""Dirty bitmaps see every write path, checked live against qemu-storage-daemon.

* A bitmap on the ``file`` node under a qcow2 node sees what the qcow2
  driver writes there: guest data, and the metadata of cluster allocation
  (L2 tables, refcount blocks, L1 and header updates), and the discards of
  freed clusters.  (qemu-io's NBD client flushes when it closes, so QEMU's
  metadata cache has been written back when the counts are read.)
* A bitmap on the qcow2 node under a ``compress`` filter sees the filter's
  compressed writes (whole clusters), and one on the filter its requests.

The same NBD writes go through an export in both daemons; then
``x-debug-block-dirty-bitmap-sha256`` and the dirty counts of
``query-named-block-nodes`` must be the same for qmpgraph as for qsd.
Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from livekit import LiveDaemon  # tests/nbd helpers, put on sys.path above
from test_clients import start_pair, tool

pytestmark = pytest.mark.qemu

WRITES = [
    "write -P 0x11 0 4k",  # a new cluster: L2 table, refcount block, data
    "write -P 0x22 8k 4k",  # the same cluster again: data only
    "write -P 0x33 1M 100k",  # two new clusters
    "write -z 2M 64k",  # a zero cluster: L2 only
    "write -P 0x44 600M 64k",  # a second L2 table
    "write -P 0x55 2000M 4k",  # far away: one more L2 table
]


def _counts(daemon: LiveDaemon) -> list[Any]:
    out = []
    for node in daemon.ok("query-named-block-nodes", flat=True):
        for bm in node.get("dirty-bitmaps", []):
            out.append([node["node-name"], bm["name"], bm["count"], bm["granularity"]])
    return sorted(out)


def _sha(daemon: LiveDaemon, node: str, name: str) -> str:
    return str(daemon.ok("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"])


def _qcow2_session(daemon: LiveDaemon, granularity: int, writes: list[str]) -> list[Any]:
    daemon.ok("blockdev-add", driver="file", node_name="f", filename="img.qcow2")
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file="f")
    daemon.ok("block-dirty-bitmap-add", node="f", name="fb", granularity=granularity)
    daemon.ok("block-dirty-bitmap-add", node="q", name="qb", granularity=granularity)
    daemon.start_nbd()
    daemon.ok("block-export-add", type="nbd", id="e", node_name="q", name="q", writable=True)
    steps: list[Any] = []
    for cmd in writes:
        rc, _ = tool(daemon, "qemu-io", "-f", "raw", "-c", cmd, daemon.uri("q"))
        steps.append([cmd, rc, _counts(daemon), _sha(daemon, "f", "fb"), _sha(daemon, "q", "qb")])
    return steps


BACKED = (
    "qemu-img create -f qcow2 base.qcow2 4G >/dev/null;"
    " qemu-io -f qcow2 -c 'write -P 0x77 0 4M' -c 'write -P 0x78 600M 1M' base.qcow2 >/dev/null;"
    " qemu-img create -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 >/dev/null"
)


@pytest.mark.parametrize("backed", [False, True], ids=["alone", "backed"])
@pytest.mark.parametrize("granularity", [512, 65536])
def test_file_node_bitmap_sees_qcow2_writes(tmp_path: Path, granularity: int, backed: bool) -> None:
    # With a backing file, partial writes copy the rest of the cluster from it.
    setup = BACKED if backed else "qemu-img create -f qcow2 img.qcow2 4G >/dev/null"
    qsd, ours = start_pair(tmp_path, setup, [])
    try:
        want = _qcow2_session(qsd, granularity, WRITES)
        got = _qcow2_session(ours, granularity, WRITES)
    finally:
        qsd.stop()
        ours.stop()
    for w, g in zip(want, got, strict=True):
        assert g == w
    # QEMU's file-node bitmap grew with every allocating write (recorded above).
    assert want[0][2] != want[-1][2]


def _compress_session(daemon: LiveDaemon, granularity: int) -> list[Any]:
    daemon.ok("blockdev-add", driver="file", node_name="f", filename="img.qcow2")
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file="f")
    daemon.ok("blockdev-add", driver="compress", node_name="c", file="q")
    for node in ("f", "q", "c"):
        daemon.ok("block-dirty-bitmap-add", node=node, name=f"{node}b", granularity=granularity)
    daemon.start_nbd()
    daemon.ok("block-export-add", type="nbd", id="e", node_name="c", name="c", writable=True)
    steps: list[Any] = []
    for cmd in ("write -P 0x11 0 64k", "write -P 0x22 200k 10k", "write -P 0x33 1M 128k"):
        rc, _ = tool(daemon, "qemu-io", "-f", "raw", "-c", cmd, daemon.uri("c"))
        shas = [_sha(daemon, node, f"{node}b") for node in ("f", "q", "c")]
        steps.append([cmd, rc, _counts(daemon), shas])
    return steps


@pytest.mark.parametrize("granularity", [512, 65536])
def test_compressed_writes_mark_bitmaps(tmp_path: Path, granularity: int) -> None:
    setup = "qemu-img create -f qcow2 img.qcow2 16M >/dev/null"
    qsd, ours = start_pair(tmp_path, setup, [])
    try:
        want = _compress_session(qsd, granularity)
        got = _compress_session(ours, granularity)
    finally:
        qsd.stop()
        ours.stop()
    for w, g in zip(want, got, strict=True):
        assert g == w


def _discard_session(daemon: LiveDaemon) -> list[Any]:
    daemon.ok("blockdev-add", driver="file", node_name="f", filename="img.qcow2", discard="unmap")
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file="f", discard="unmap")
    daemon.ok("block-dirty-bitmap-add", node="f", name="fb", granularity=512)
    daemon.start_nbd()
    daemon.ok("block-export-add", type="nbd", id="e", node_name="q", name="q", writable=True)
    steps: list[Any] = []
    for cmd in ("discard 0 64k", "discard 128k 4k", "write -z -u 1M 128k", "write -z 2M 64k"):
        rc, _ = tool(daemon, "qemu-io", "-f", "raw", "-c", cmd, daemon.uri("q"))
        steps.append([cmd, rc, _counts(daemon), _sha(daemon, "f", "fb")])
    return steps


def test_file_node_bitmap_sees_qcow2_discards(tmp_path: Path) -> None:
    # Freed clusters are discarded in the file (both nodes discard=unmap):
    # the file node's bitmap sees those discards besides the metadata writes.
    setup = (
        "qemu-img create -f qcow2 img.qcow2 64M >/dev/null;"
        " qemu-io -f qcow2 -c 'write -P 1 0 4M' img.qcow2 >/dev/null"
    )
    qsd, ours = start_pair(tmp_path, setup, [])
    try:
        want = _discard_session(qsd)
        got = _discard_session(ours)
    finally:
        qsd.stop()
        ours.stop()
    assert got == want
