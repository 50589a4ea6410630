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
from typing import Any

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))
sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))
sys.path.insert(0, str(Path(__file__).parent))

from cmdkit import Client  # tests/commands helper, put on sys.path above
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_backend_io import attach

from qmpgraph.drivers.qcow2_compress import deflate_cluster
from qmpgraph.graph.model import BlockBackend, Edge
from qmpgraph.graph.perms import Perm, Role
from qmpgraph.io import hooks
from qmpgraph.transactions.actions import add_root_parent, remove_root_parent
from qmpgraph.transactions.composite import detach_child, root_attach
from qmpgraph.transactions.engine import Transaction

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


@pytest.mark.qemu
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


# -- preallocate (in-process) ---------------------------------------------------
#
# A format driver writes past the end of its file through preallocate; here a
# BlockBackend holding WRITE|RESIZE plays it.  The writes and sizes replay what
# qemu-storage-daemon 7.2 did with a qcow2 node over preallocate
# (prealloc-size=1M, prealloc-align=64k) on a fresh 16M qcow2 (196616 bytes):
# "write 0 64k" (data cluster at 256k: the file became 1376256), "write 8M
# 64k" (within it), "write 2M 1M" (data at 512k..1.5M: 2621440), the filter's
# length 1572864, and 1572864 once blockdev-del closed the filter.  The qcow2
# test above cannot replay it: qmpgraph's qcow2 needs a file child.


def _attach_resizing(client: Client, node_name: str) -> tuple[BlockBackend, Edge]:
    graph = client.daemon.graph
    node = graph.lookup(node_name)
    assert node is not None
    tran = Transaction()
    bb = BlockBackend()
    add_root_parent(tran, graph, bb)
    perm = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    edge = root_attach(
        tran,
        graph,
        bb,
        node,
        "root",
        role=Role.FILTERED | Role.PRIMARY,
        perm=int(perm),
        shared=int(Perm.CONSISTENT_READ),
    )
    tran.commit()
    return bb, edge


def _detach(client: Client, bb: BlockBackend) -> None:
    graph = client.daemon.graph
    tran = Transaction()
    assert bb.root is not None
    detach_child(tran, graph, bb.root)
    remove_root_parent(tran, graph, bb)
    tran.commit()


async def test_preallocate_grows_and_truncates_like_qsd(tmp_path: Path) -> None:
    image = tmp_path / "img.bin"
    image.write_bytes(b"\x01" * 196616)
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
    c.ok(
        "blockdev-add",
        {
            "driver": "preallocate",
            "node-name": "p",
            "file": "f",
            "prealloc-size": 1 << 20,
            "prealloc-align": 65536,
        },
    )
    p = c.daemon.graph.lookup("p")
    assert p is not None and p.driver is not None
    bb, edge = _attach_resizing(c, "p")
    with trio.fail_after(10):
        await hooks.child_write(edge, 262144, b"\x22" * 65536)
        assert image.stat().st_size == 1376256
        await hooks.child_write(edge, 196608, b"\x33" * 65536)
        await hooks.child_write(edge, 327680, b"\x44" * 65536)
        assert image.stat().st_size == 1376256
        await hooks.child_write(edge, 524288, b"\x55" * (1 << 20))
        assert image.stat().st_size == 2621440
        assert p.driver.size(p) == 1572864
        await hooks.flush_node(p)  # a flush keeps the preallocation
        assert image.stat().st_size == 2621440
        # Preallocated bytes read as zeros; data below is intact.
        assert await hooks.child_read(edge, 1572864 - 4, 4) == b"\x55" * 4
    _detach(c, bb)
    c.ok("blockdev-del", {"node-name": "p"})
    assert image.stat().st_size == 1572864
    assert image.read_bytes()[196600:196616] == b"\x01" * 8 + b"\x33" * 8


async def test_preallocate_needs_write_and_resize(tmp_path: Path) -> None:
    """Without RESIZE from its parents (an NBD export's view) nothing is preallocated."""
    image = tmp_path / "img.bin"
    image.write_bytes(bytes(65536))
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
    c.ok("blockdev-add", {"driver": "preallocate", "node-name": "p", "file": "f"})
    io = attach(c, "p", writable=True)
    with trio.fail_after(10):
        await io.write(0, b"x" * 4096)
    assert image.stat().st_size == 65536


# -- blkverify (live) -----------------------------------------------------------

_BLKDEBUG_WRITE_EIO = {"inject-error": [{"event": "pwritev", "errno": 5}]}
BLKVERIFY: dict[str, tuple[list[str], bool, list[str]]] = {
    # name: (corruption of test, blkdebug on test, qemu-io commands)
    "agree": (
        [],
        False,
        ["read -P 0x11 0 64k", "write -P 0x22 0 4k", "read -P 0x22 0 4k", "flush"],
    ),
    "contents-mismatch": (["write -P 0x12 70000 10"], False, ["read 0 64k", "read 64k 64k"]),
    "return-value-mismatch": ([], True, ["read 0 4k", "write 0 4k"]),
    "write-zeroes-abort": ([], False, ["write -z 4k 4k"]),
}


def _blkverify_session(
    kind: str, d: Path, corrupt: list[str], debug: bool, cmds: list[str]
) -> tuple[Any, ...]:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        img = str(d / f"c{i}.raw")
        run("qemu-img", "create", "-f", "raw", img, "1M")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", img)
    for cmd in corrupt:
        run("qemu-io", "-f", "raw", "-c", cmd, str(d / "c1.raw"))
    test: dict[str, Any] = {"driver": "file", "filename": "c1.raw"}
    if debug:
        test = {"driver": "blkdebug", "image": test, **_BLKDEBUG_WRITE_EIO}
    daemon = LiveDaemon(kind, require_qemu(), d, [])
    try:
        daemon.ok(
            "blockdev-add",
            driver="blkverify",
            node_name="v",
            raw={"driver": "file", "filename": "c0.raw"},
            test=test,
        )
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="v", writable=True)
        args = [a for c in cmds for a in ("-c", c)]
        res = subprocess.run(
            ["qemu-io", "-f", "raw", daemon.uri("e"), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        try:
            status = daemon.proc.wait(2)
        except subprocess.TimeoutExpired:
            status = None  # still running: nothing ended it
    finally:
        daemon.stop()
    output = _TIMING.sub("", res.stdout + res.stderr).strip()
    images = [(d / f"c{i}.raw").read_bytes() for i in range(2)]
    return output, status, (d / "stderr.txt").read_text(), images


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(BLKVERIFY))
def test_blkverify_like_qsd(tmp_path: Path, name: str) -> None:
    """Same answers, the same end of the process (status, message), same images."""
    require_qemu()
    corrupt, debug, cmds = BLKVERIFY[name]
    want = _blkverify_session("qsd", tmp_path / "qsd", corrupt, debug, cmds)
    got = _blkverify_session("qmpgraph", tmp_path / "qmpgraph", corrupt, debug, cmds)
    assert got == want


# -- blklogwrites (live) --------------------------------------------------------

LOG_COMMANDS = [
    "write -P 0x11 0 4k",
    "write -P 0x22 1000 100",
    "write -z 64k 8k",
    "discard 128k 64k",
    "flush",
    "write -P 0x33 512k 1k",
    "read -P 0x22 1000 100",
]
BLKLOGWRITES: dict[str, list[dict[str, Any]]] = {
    # name: the options of each session (one daemon run each, same files)
    "default": [{}],
    "super-interval": [{"log-super-update-interval": 3}],
    "sector-4k": [{"log-sector-size": 4096}],
    "append": [{"log-super-update-interval": 2}, {"log-append": True}],
}


def _blklogwrites_session(kind: str, d: Path, sessions: list[dict[str, Any]]) -> tuple[Any, ...]:
    d.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-f", "raw", str(d / "data.raw"), "1M")
    run("qemu-img", "create", "-f", "raw", str(d / "log.raw"), "0")
    outputs = []
    for opts in sessions:
        daemon = LiveDaemon(kind, require_qemu(), d, [])
        try:
            daemon.ok(
                "blockdev-add",
                driver="blklogwrites",
                node_name="b",
                discard="unmap",
                file={"driver": "file", "filename": "data.raw"},
                log={"driver": "file", "filename": "log.raw"},
                **opts,
            )
            daemon.start_nbd()
            daemon.ok(
                "block-export-add", type="nbd", id="e", name="e", node_name="b", writable=True
            )
            for cmd in LOG_COMMANDS:
                res = subprocess.run(
                    ["qemu-io", "-f", "raw", daemon.uri("e"), "-c", cmd],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                    check=False,
                )
                outputs.append(_TIMING.sub("", res.stdout + res.stderr).strip())
        finally:
            daemon.stop()
    return outputs, (d / "data.raw").read_bytes(), (d / "log.raw").read_bytes()


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(BLKLOGWRITES))
def test_blklogwrites_like_qsd(tmp_path: Path, name: str) -> None:
    """The same answers, data file and log, byte for byte (dm-log-writes format)."""
    require_qemu()
    want = _blklogwrites_session("qsd", tmp_path / "qsd", BLKLOGWRITES[name])
    got = _blklogwrites_session("qmpgraph", tmp_path / "qmpgraph", BLKLOGWRITES[name])
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert got[2] == want[2]
    assert len(want[2]) > 512


async def test_preallocate_truncates_when_write_resize_go(tmp_path: Path) -> None:
    """qsd 7.2: with a named preallocate node under a qcow2 node, deleting the
    qcow2 node (its parents' WRITE|RESIZE gone) cut the file back to the end
    of the data at once while the filter stayed (preallocate_check_perm)."""
    image = tmp_path / "img.bin"
    image.write_bytes(b"\x01" * 196616)
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
    c.ok(
        "blockdev-add",
        {
            "driver": "preallocate",
            "node-name": "p",
            "file": "f",
            "prealloc-size": 1 << 20,
            "prealloc-align": 65536,
        },
    )
    bb, edge = _attach_resizing(c, "p")
    with trio.fail_after(10):
        await hooks.child_write(edge, 262144, b"\x22" * 65536)
    assert image.stat().st_size == 1376256
    _detach(c, bb)
    assert image.stat().st_size == 327680
    p = c.daemon.graph.lookup("p")
    assert p is not None and p.driver is not None and p.driver.size(p) == 327680
