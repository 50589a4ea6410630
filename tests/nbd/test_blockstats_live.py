"""query-blockstats after writes over NBD: qmpgraph against qemu-storage-daemon.

The same images, graph and client requests go to both daemons (each its own
copy); after every client run both ``query-blockstats`` replies (with and
without ``query-nodes``) must be equal.  What they show is what QEMU 7.2
counts per node: ``wr_highest_offset`` (guest writes on the format node,
the format driver's data and metadata writes on its file node) and the file
nodes' discard counters.  Requests are sequential (one ``qemu-io`` command
at a time, or one nbdcopy into a raw export), so cluster allocation order,
and with it the file nodes' offsets, is deterministic.  Every process has a
timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import LiveDaemon, run

pytestmark = pytest.mark.qemu

KINDS = ("qsd", "qmpgraph")


def _blockdevs(work: Path) -> list[str]:
    return [
        f"driver=file,filename={work}/a.qcow2,node-name=af,discard=unmap",
        "driver=qcow2,file=af,node-name=top,discard=unmap",
        f"driver=file,filename={work}/r.raw,node-name=rf,discard=unmap",
        "driver=raw,file=rf,node-name=raw,discard=unmap",
        f"driver=file,filename={work}/o.qcow2,node-name=of",
        "driver=qcow2,file=of,node-name=ov,backing=top",
    ]


def _images(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "4M")
    run("qemu-img", "create", "-q", "-f", "raw", str(work / "r.raw"), "4M")
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
        str(work / "o.qcow2"), "4M",
    )  # fmt: skip


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, LiveDaemon]]:
    """Both daemons over their own copies of the images, all three exported."""
    qsd = require_qemu()
    started: dict[str, LiveDaemon] = {}
    try:
        for kind in KINDS:
            work = tmp_path / kind
            _images(work)
            daemon = started[kind] = LiveDaemon(kind, qsd, work, _blockdevs(work))
            daemon.start_nbd()
            daemon.ok("block-export-add", type="nbd", id="e1", node_name="raw", writable=True)
            daemon.ok("block-export-add", type="nbd", id="e2", node_name="ov", writable=True)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def _stats(daemon: LiveDaemon) -> tuple[Any, Any]:
    return daemon.ok("query-blockstats"), daemon.ok("query-blockstats", query_nodes=True)


def _qemu_io(daemon: LiveDaemon, export: str, *cmds: str) -> None:
    args: list[str] = []
    for cmd in cmds:
        args += ["-c", cmd]
    run("qemu-io", "-f", "raw", *args, daemon.uri(export))


def _same(daemons: dict[str, LiveDaemon]) -> dict[str, int]:
    """Both daemons' replies are equal; the nodes' wr_highest_offset."""
    ref, got = (_stats(daemons[k]) for k in KINDS)
    assert got == ref
    assert ref[0] == []
    return {e["node-name"]: e["stats"]["wr_highest_offset"] for e in ref[1]}


def test_fresh_daemons_agree(daemons: dict[str, LiveDaemon]) -> None:
    """Before any request every node reports 0."""
    assert set(_same(daemons).values()) == {0}


@pytest.mark.parametrize(
    ("export", "cmds"),
    [
        ("raw", ["write -P 1 0 4k", "write 100k 1k", "write -z 1M 64k"]),
        ("raw", ["write -z -u 2M 64k", "discard 0 64k", "discard 3M 1k", "flush"]),
        ("raw", ["write 4000k 96k", "write -f 10k 5"]),
        ("ov", ["write -P 2 0 4k", "write 100k 1k", "write 3M 10"]),
        ("ov", ["write -z 1M 64k", "write -z -u 2M 128k", "discard 0 64k", "flush"]),
        ("ov", ["write -P 3 65535 2", "write -P 4 4032k 64k", "discard 3M 1k"]),
    ],
)
def test_qemu_io_requests(daemons: dict[str, LiveDaemon], export: str, cmds: list[str]) -> None:
    """Writes, zero writes, discards and flushes, one command at a time."""
    for cmd in cmds:
        for kind in KINDS:
            _qemu_io(daemons[kind], export, cmd)
        _same(daemons)


def test_overlay_then_its_backing(daemons: dict[str, LiveDaemon]) -> None:
    """The overlay's writes count on ov and of only; then the backing node
    written through its own export counts on top and af."""
    for kind in KINDS:
        _qemu_io(daemons[kind], "ov", "write -P 5 0 64k")
    highest = _same(daemons)
    assert highest["ov"] == 65536 and highest["top"] == 0
    for kind in KINDS:
        daemons[kind].ok("block-export-add", type="nbd", id="e3", node_name="top", writable=True)
        _qemu_io(daemons[kind], "top", "write -P 6 1M 4k", "discard 1M 64k")
    highest = _same(daemons)
    assert highest["top"] == (1 << 20) + 4096


def test_nbdcopy_into_raw(daemons: dict[str, LiveDaemon], tmp_path: Path) -> None:
    """A whole-disk copy with parallel requests: the furthest end is the size."""
    if shutil.which("nbdcopy") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nbdcopy is required when CI=true (apt-get install libnbd-bin)")
        pytest.skip("nbdcopy not installed (libnbd-bin)")
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x07" * (1 << 20) + bytes(3 << 20))
    for kind in KINDS:
        run("nbdcopy", str(src), daemons[kind].uri("raw"))
    highest = _same(daemons)
    assert highest["raw"] == 4 << 20


@pytest.fixture
def fleecing(tmp_path: Path) -> Iterator[dict[str, LiveDaemon]]:
    """Both daemons with a copy-before-write filter over src (data in its
    first 2 MiB) into tgt, the filter exported writable."""
    qsd = require_qemu()
    started: dict[str, LiveDaemon] = {}
    try:
        for kind in KINDS:
            work = tmp_path / kind
            work.mkdir(parents=True)
            for name in ("a", "t"):
                run("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "4M")
            run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(work / "a.qcow2"))
            daemon = started[kind] = LiveDaemon(
                kind,
                qsd,
                work,
                [
                    f"driver=file,filename={work}/a.qcow2,node-name=af",
                    "driver=qcow2,file=af,node-name=src",
                    f"driver=file,filename={work}/t.qcow2,node-name=tf",
                    "driver=qcow2,file=tf,node-name=tgt",
                ],
            )
            daemon.ok("blockdev-add", driver="copy-before-write", node_name="cbw", file="src",
                      target="tgt")  # fmt: skip
            daemon.start_nbd()
            daemon.ok("block-export-add", type="nbd", id="w", node_name="cbw", writable=True)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def test_fleecing_copies_count_on_the_target(fleecing: dict[str, LiveDaemon]) -> None:
    """Guest writes through copy-before-write: the old data copied to the
    target counts on tgt and its file, the new data on src and its file."""
    for cmd in ("write -P 2 0 4k", "write -P 3 1M 64k", "write -z 3M 64k", "write 100k 200k"):
        for kind in KINDS:
            _qemu_io(fleecing[kind], "cbw", cmd)
        highest = _same(fleecing)
    assert highest["tgt"] > 0 and highest["cbw"] == 3 * (1 << 20) + 65536
