"""The compress filter's data path, against qemu-storage-daemon (live).

A compress node over a fresh qcow2 image is exported writable; the same
qemu-io writes and reads go through both daemons: aligned and unaligned
writes (QEMU reads the rest of the cluster and compresses whole clusters),
a write over an allocated cluster (EIO), incompressible data (a normal
cluster), a zeroed cluster written again.  qemu-io's answers, ``qemu-img
check`` (which counts compressed clusters) and ``qemu-img map`` must be the
same, and ``qemu-img compare`` must find the two images identical.  Host
offsets of compressed clusters may differ (QEMU compresses the clusters of
one request in parallel), so the files are not compared byte for byte.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

from qmpgraph.drivers.qcow2_compress import deflate_cluster

pytestmark = pytest.mark.qemu

_TIMING = re.compile(r"^.*(ops/sec|bytes, \d+ ops;).*$", re.M)

COMMANDS = [
    "write -P 0x11 0 64k",
    "write -P 0x22 64k 4k",
    "write -P 0x33 0 64k",
    "write -P 0x44 200k 100k",
    "write -z 512k 64k",
    "write -P 0x55 512k 64k",
    "write -s random.bin 640k 64k",
    "write -P 0x66 900k 10k",
    "read -P 0x11 0 64k",
    "read -P 0x22 64k 4k",
    "read -P 0 68k 60k",
    "read -P 0x44 200k 100k",
    "read -P 0x55 512k 64k",
]


def _session(kind: str, d: Path) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    image = d / "img.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(image), "1M")
    (d / "random.bin").write_bytes(RANDOM)
    daemon = LiveDaemon(kind, require_qemu(), d, [])
    try:
        daemon.ok(
            "blockdev-add",
            driver="compress",
            node_name="c",
            file={
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": "img.qcow2"},
            },
        )
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="c", writable=True)
        outputs = []
        for cmd in COMMANDS:
            res = subprocess.run(
                ["qemu-io", "-f", "raw", daemon.uri("e"), "-c", cmd],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
                cwd=d,
            )
            outputs.append(_TIMING.sub("", res.stdout + res.stderr).strip())
    finally:
        daemon.stop()
    return {
        "outputs": "\n".join(outputs),
        "check": run("qemu-img", "check", str(image)),
        "map": run("qemu-img", "map", "--output=json", str(image)),
    }


RANDOM = os.urandom(65536)


def test_compress_like_qsd(tmp_path: Path) -> None:
    require_qemu()
    want = _session("qsd", tmp_path / "qsd")
    got = _session("qmpgraph", tmp_path / "qmpgraph")
    assert got == want
    assert "compressed clusters" in want["check"]
    assert "Input/output error" in want["outputs"]
    run(
        "qemu-img",
        "compare",
        str(tmp_path / "qsd" / "img.qcow2"),
        str(tmp_path / "qmpgraph" / "img.qcow2"),
    )


def test_deflate_matches_qemu_format() -> None:
    """Raw deflate with a 4 KiB window: what QEMU's reader (and ours) inflate."""
    data = bytes(range(256)) * 256
    out = deflate_cluster(data, 65535)
    assert out is not None and zlib.decompressobj(-12).decompress(out) == data
    assert deflate_cluster(RANDOM, 65535) is None
