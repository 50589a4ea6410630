"""The copy-on-read filter copies, checked live against qemu-storage-daemon.

Both daemons export a copy-on-read node over a qcow2 overlay (with and
without ``bottom``); the same reads are made through NBD with qemu-io and
nbdcopy; then the daemons stop and ``qemu-img map`` of each overlay (what
was copied, as data or zero clusters) and the overlay's contents must be the
same for qmpgraph as for qsd, and so must the dirty counts of bitmaps on
the filter, the overlay and the overlay's file (the copies are the
driver's own writes).  A write through the filter lands too, and
NBD_CMD_CACHE on the filter's export copies as in qsd.
Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_clients import SYSTEM_PYTHON, need_libnbd, tool

pytestmark = pytest.mark.qemu

READS = ("read 0 4k", "read 100k 50k", "read 1500k 200k", "read 3100k 300k", "read 4000k 96k")


def _io(image: Path, *cmds: str) -> None:
    args: list[str] = []
    for cmd in cmds:
        args += ["-c", cmd]
    run("qemu-io", "-f", "qcow2", *args, str(image))


def _chain(d: Path) -> None:
    """base <- mid <- top, 4 MiB, 64 KiB clusters: data, zeros and holes in each."""
    d.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    _io(d / "base.qcow2", "write -P 0x11 0 1M", "write -P 0x22 3M 1M", "write -z 1536k 64k")
    run(
        "qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "mid.qcow2")
    )
    _io(d / "mid.qcow2", "write -P 0x55 64k 64k", "write -z 3136k 64k", "write -P 0x66 1600k 8k")
    run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    _io(d / "top.qcow2", "write -P 0x33 512k 100k", "write -P 0x44 2M 4k")


def _session(kind: str, qsd: str, d: Path, cor: dict[str, Any], extra: list[str]) -> Any:
    daemon = LiveDaemon(kind, qsd, d / kind, [])
    try:
        backing: str | None = None
        for name in ("base", "mid", "top"):
            daemon.ok(
                "blockdev-add",
                driver="qcow2",
                node_name=name,
                backing=backing,
                file={
                    "driver": "file",
                    "filename": str(d / f"{name}.qcow2"),
                    "node-name": f"{name}-f",
                },
            )
            backing = name
        daemon.ok("blockdev-add", driver="copy-on-read", node_name="cor", file="top", **cor)
        # Copies are the driver's own writes: bitmaps of the node below do
        # not see them, those of its file do (QEMU's bdrv_driver_pwritev).
        for node in ("cor", "top", "top-f"):
            daemon.ok("block-dirty-bitmap-add", node=node, name="b", granularity=512)
        daemon.start_nbd()
        daemon.ok(
            "block-export-add", type="nbd", id="e", node_name="cor", name="cor", writable=True
        )
        args: list[str] = []
        for cmd in READS:
            args += ["-c", cmd]
        run("qemu-io", "-f", "raw", *args, daemon.uri("cor"))
        if extra:
            run("qemu-io", "-f", "raw", *[a for c in extra for a in ("-c", c)], daemon.uri("cor"))
        else:
            run("nbdcopy", "--", daemon.uri("cor"), str(d / kind / "copy.raw"))
        nodes = daemon.ok("query-named-block-nodes", flat=True)
        return sorted(
            [n["node-name"], b["count"]] for n in nodes for b in n.get("dirty-bitmaps", [])
        )
    finally:
        daemon.stop()


def _after(kind: str, qsd: str, tmp: Path, cor: dict[str, Any], extra: list[str]) -> Any:
    d = tmp / kind
    _chain(d)
    counts = _session(kind, qsd, d, cor, extra)
    run("qemu-img", "check", str(d / "top.qcow2"))
    raw = d / "top.raw"
    run("qemu-img", "convert", "-O", "raw", str(d / "top.qcow2"), str(raw))
    mapped = json.loads(run("qemu-img", "map", "--output=json", str(d / "top.qcow2")))
    return _merged(mapped), raw.read_bytes(), counts


def _merged(extents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The map without host offsets (they depend on the order clusters were
    allocated in), neighbours with the same flags joined."""
    out: list[dict[str, Any]] = []
    for ext in extents:
        ext.pop("offset", None)
        last = out[-1] if out else None
        key = {k: v for k, v in ext.items() if k not in ("start", "length")}
        if (
            last is not None
            and {k: v for k, v in last.items() if k not in ("start", "length")} == key
        ):
            last["length"] += ext["length"]
        else:
            out.append(ext)
    return out


@pytest.mark.parametrize(
    ("cor", "extra"),
    [
        ({}, []),
        ({"bottom": "mid"}, []),
        ({}, ["write -P 0x77 1520k 40k", "read 1400k 300k"]),
        ({"bottom": "mid"}, ["write -z 3100k 20k", "read 3000k 200k"]),
    ],
    ids=["plain-nbdcopy", "bottom-nbdcopy", "plain-write", "bottom-zero-write"],
)
def test_cor_overlay_map_equals_qsd(tmp_path: Path, cor: dict[str, Any], extra: list[str]) -> None:
    qsd = require_qemu()
    if not extra and shutil.which("nbdcopy") is None:
        pytest.fail("nbdcopy is required (libnbd-bin)")
    _chain(tmp_path / "fresh")
    fresh = json.loads(run("qemu-img", "map", "--output=json", str(tmp_path / "fresh/top.qcow2")))
    want = _after("qsd", qsd, tmp_path, cor, extra)
    assert want[0] != _merged(fresh)  # QEMU copied something: the test means something
    got = _after("qmpgraph", qsd, tmp_path, cor, extra)
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert got[2] == want[2]


CACHE_SCRIPT = """
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for off, n in ((0, 4096), (100000, 70000), (1500000, 200000), (3100000, 300000)):
    try:
        h.cache(n, off)
        print("ok", off)
    except nbd.Error as err:
        print("error", off, err.errno)
h.shutdown()
"""


def _cache_session(kind: str, qsd: str, d: Path) -> Any:
    _chain(d)
    daemon = LiveDaemon(kind, qsd, d / kind, [])
    try:
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="top",
            file={"driver": "file", "filename": str(d / "top.qcow2")},
        )
        daemon.ok("blockdev-add", driver="copy-on-read", node_name="cor", file="top")
        daemon.ok("block-dirty-bitmap-add", node="top", name="b", granularity=512)
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", node_name="cor", name="cor")
        out = run(SYSTEM_PYTHON, "-c", CACHE_SCRIPT, daemon.uri("cor"))
        nodes = daemon.ok("query-named-block-nodes", flat=True)
        counts = [b["count"] for n in nodes for b in n.get("dirty-bitmaps", [])]
    finally:
        daemon.stop()
    mapped = json.loads(run("qemu-img", "map", "--output=json", str(d / "top.qcow2")))
    return out, counts, _merged(mapped)


def test_nbd_cache_through_cor_equals_qsd(tmp_path: Path) -> None:
    # NBD_CMD_CACHE at a copy-on-read export: the prefetch reads through the
    # filter (which copies) and writes back through it, as QEMU does.
    qsd = require_qemu()
    need_libnbd()
    want = _cache_session("qsd", qsd, tmp_path / "qsd")
    got = _cache_session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want


async def test_copy_and_guest_write_are_serialised(tmp_path: Path) -> None:
    # A copy that reads slowly (the backing file sits under a throttle node)
    # and a guest write to the same cluster through the filter: QEMU makes
    # copy-on-read requests serialising, so the write waits and lands after
    # the copy, never under it (the old data must not win).
    sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))
    from cmdkit import Client
    from test_backend_io import attach

    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    _io(tmp_path / "base.qcow2", "write -P 0x11 0 1M")
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "top.qcow2"), "1M")
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": "g", "limits": {"bps-read": 262144}})
    c.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "base",
            "file": {"driver": "file", "filename": str(tmp_path / "base.qcow2")},
        },
    )
    c.ok(
        "blockdev-add",
        {"driver": "throttle", "node-name": "thr", "throttle-group": "g", "file": "base"},
    )
    c.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "top",
            "backing": "thr",
            "file": {"driver": "file", "filename": str(tmp_path / "top.qcow2")},
        },
    )
    c.ok("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"})
    with trio.fail_after(20):
        io = attach(c, "cor", writable=True)
        await io.read(512 << 10, 64 << 10)  # fills the throttle bucket
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.read, 0, 4096)
            await trio.testing.wait_all_tasks_blocked()  # the copy of cluster 0 waits
            nursery.start_soon(io.write, 0, b"\x99" * 4096)
        assert await io.read(0, 8192) == b"\x99" * 4096 + b"\x11" * 4096


def _event_session(kind: str, qsd: str, d: Path) -> Any:
    d.mkdir(parents=True)
    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    _io(d / "base.qcow2", "write -P 0x11 0 1M")
    run(
        "qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2")
    )
    daemon = LiveDaemon(kind, qsd, d / kind, [])
    try:
        top = {"driver": "file", "filename": str(d / "top.qcow2")}
        daemon.ok("blockdev-add", driver="qcow2", node_name="top", file=top)
        rule = {"event": "cor_write", "errno": 5, "once": True}
        daemon.ok(
            "blockdev-add", driver="blkdebug", node_name="dbg", image="top", inject_error=[rule]
        )
        daemon.ok("blockdev-add", driver="copy-on-read", node_name="cor", file="dbg")
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", node_name="cor", name="cor")
        out = []
        for cmd in ("read 0 4k", "read 0 4k", "read 200k 4k"):
            rc, text = tool(daemon, "qemu-io", "-r", "-f", "raw", "-c", cmd, daemon.uri("cor"))
            out.append([cmd, rc, text.splitlines()[0]])
    finally:
        daemon.stop()
    mapped = json.loads(run("qemu-img", "map", "--output=json", str(d / "top.qcow2")))
    return out, _merged(mapped)


def test_cor_write_event_reaches_blkdebug(tmp_path: Path) -> None:
    # The copy fires cor_write on the node below; blkdebug's rule fails the
    # copy's write (the read fails with EIO) once, then copies go through.
    qsd = require_qemu()
    want = _event_session("qsd", qsd, tmp_path / "qsd")
    got = _event_session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want
    assert want[0][0][1] == 1 and want[0][1][1] == 0


STREAM_CHAIN = (
    ("base", "write -P 0x11 0 1M", "write -z 2M 64k", "write -P 0x22 3M 4k"),
    ("top", "write -P 0x33 512k 4k"),
)


def _stream_chain(d: Path) -> None:
    d.mkdir(parents=True)
    run("qemu-img", "create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    _io(d / "base.qcow2", *STREAM_CHAIN[0][1:])
    run(
        "qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2")
    )
    _io(d / "top.qcow2", *STREAM_CHAIN[1][1:])


def _stream_result(d: Path, counts: list[Any]) -> Any:
    """The overlay's own clusters (its backing file is gone after qsd's
    stream, not after the emulated loop: depths are left out) and the count
    of the overlay's bitmap.  The file node's bitmap is not compared: QEMU
    writes the overlay's L2 and refcount tables only when its metadata
    cache is flushed, which nothing here does, and its stream rewrites the
    header."""
    mapped = json.loads(run("qemu-img", "map", "--output=json", str(d / "top.qcow2")))
    for ext in mapped:
        ext.pop("depth")
    return counts, _merged(mapped)


def _qsd_stream(qsd: str, d: Path) -> Any:
    _stream_chain(d)
    daemon = LiveDaemon("qsd", qsd, d / "qsd", [])
    try:
        top = {"driver": "file", "filename": str(d / "top.qcow2"), "node-name": "top-f"}
        daemon.ok("blockdev-add", driver="qcow2", node_name="top", file=top)
        daemon.ok("block-dirty-bitmap-add", node="top", name="b", granularity=512)
        daemon.ok("block-stream", job_id="s", device="top")
        deadline = time.monotonic() + 30
        while daemon.ok("query-block-jobs"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        nodes = daemon.ok("query-named-block-nodes", flat=True)
        counts = sorted(
            [n["node-name"], b["count"]] for n in nodes for b in n.get("dirty-bitmaps", [])
        )
    finally:
        daemon.stop()
    return _stream_result(d, counts)


async def test_populate_copies_as_block_stream(tmp_path: Path) -> None:
    # COR_IO.populate is stream_populate (a prefetch read through the filter
    # with ``bottom``); QEMU's stream loop over it leaves the overlay as
    # qsd's block-stream does, its bitmap untouched (the copies are the
    # driver's own writes).
    sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))
    from cmdkit import Client

    from qmpgraph.io.cor_io import COR_IO
    from qmpgraph.jobs.dataplane import allocated_above, layer_allocated

    want = _qsd_stream(require_qemu(), tmp_path / "qsd")
    d = tmp_path / "ours"
    _stream_chain(d)
    c = Client()
    top = {"driver": "file", "filename": str(d / "top.qcow2"), "node-name": "top-f"}
    c.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": top})
    c.ok("block-dirty-bitmap-add", {"node": "top", "name": "b", "granularity": 512})
    graph = c.daemon.graph
    node, cor_top = graph.lookup("top"), None
    assert node is not None and node.backing is not None and node.backing.child is not None
    base = node.backing.child
    c.ok(
        "blockdev-add",
        {"driver": "copy-on-read", "node-name": "cor", "file": "top", "bottom": base.node_name},
    )
    cor_top = graph.lookup("cor")
    assert cor_top is not None
    with trio.fail_after(20):
        offset, size = 0, 4 << 20
        while offset < size:
            allocated, n = await layer_allocated(node, offset, min(512 << 10, size - offset))
            if not allocated:
                copy, n = await allocated_above(base, base, True, offset, n)
                if not copy and n == 0:
                    n = size - offset
                if copy:
                    await COR_IO.populate(cor_top, offset, n)
            offset += n
    result = c.ok("query-named-block-nodes", {"flat": True})
    counts = sorted(
        [n["node-name"], b["count"]] for n in result for b in n.get("dirty-bitmaps", [])
    )
    c.ok("blockdev-del", {"node-name": "cor"})
    c.ok("blockdev-del", {"node-name": "top"})
    assert _stream_result(d, counts) == want
