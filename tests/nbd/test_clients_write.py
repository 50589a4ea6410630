"""Real NBD clients writing to qmpgraph's and qemu-storage-daemon's exports.

Each test gets fresh daemons over fresh copies of the images of
``test_clients.SETUP``, exported writable; the same client session runs
against both and must print the same thing (socket path normalised), and
once the daemons stopped, the images they wrote must hold the same guest
data (``qemu-img compare``) and the same allocation (``qemu-img map``,
host offsets left out: where a cluster lands in the file is not guest
visible).  Clients: the libnbd session of ``libnbd_transcript.py`` (FUA
write, flush, trim, write zeroes with and without NO_HOLE, FAST_ZERO,
cache, past-the-end write) and ``qemu-io -f raw`` on the NBD URI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from livekit import LiveDaemon, run
from test_clients import (
    SETUP,
    add_exports,
    guest_map,
    need,
    need_libnbd,
    start_pair,
    tool,
    transcript,
)

pytestmark = pytest.mark.qemu

# node -> (the image file it writes, its format); discard=unmap so trims
# and zero writes may punch holes, as they do in QEMU.
WRITABLE = {
    "disk": ("disk.raw", "raw"),
    "chain": ("top.qcow2", "qcow2"),
    "comp": ("comp.qcow2", "qcow2"),
    "fresh": ("fresh.qcow2", "qcow2"),
    "raw-chain": ("top.qcow2", "qcow2"),
    "cbw": ("active.qcow2", "qcow2"),
    "dz": ("dz.qcow2", "qcow2"),
    "window": ("disk.raw", "raw"),
    "null": ("", ""),
}
# An empty qcow2 without a backing file: zero writes mark its clusters.
FRESH = "qemu-img create -q -f qcow2 fresh.qcow2 4M\n"
# A copy of the chain's top written through detect-zeroes=unmap.
FRESH += "cp top.qcow2 dz.qcow2\n"
BLOCKDEVS = [
    "file,node-name=f-disk,filename=disk.raw,discard=unmap",
    "raw,node-name=disk,file=f-disk,discard=unmap",
    "raw,node-name=window,file=f-disk,offset=65536,size=1048576,discard=unmap",
    "qcow2,node-name=chain,file.driver=file,file.filename=top.qcow2,discard=unmap",
    "qcow2,node-name=comp,file.driver=file,file.filename=comp.qcow2,discard=unmap",
    "qcow2,node-name=fresh,file.driver=file,file.filename=fresh.qcow2,discard=unmap",
    "raw,node-name=raw-chain,file=chain,discard=unmap",
    "qcow2,node-name=active,file.driver=file,file.filename=active.qcow2,discard=unmap",
    "qcow2,node-name=fleece,file.driver=file,file.filename=fleece.qcow2",
    "copy-before-write,node-name=cbw,file=active,target=fleece,discard=unmap",
    "qcow2,node-name=dz,file.driver=file,file.filename=dz.qcow2,discard=unmap,detect-zeroes=unmap",
    "null-co,node-name=null,size=1048576,read-zeroes=on",
]


@pytest.fixture
def writable(tmp_path: Path) -> Iterator[tuple[LiveDaemon, LiveDaemon]]:
    """Both daemons exporting every ``WRITABLE`` node writable under its name."""
    qsd, ours = start_pair(tmp_path, SETUP + FRESH, BLOCKDEVS)
    try:
        for daemon in (qsd, ours):
            daemon.start_nbd()
            add_exports(daemon, [(n, n, None) for n in WRITABLE], writable=True)
        yield qsd, ours
    finally:
        qsd.stop()
        ours.stop()


def _images_equal(pair: tuple[LiveDaemon, LiveDaemon], tmp_path: Path, node: str) -> None:
    """After both daemons stopped: same guest data, same allocation."""
    image, fmt = WRITABLE[node]
    if image:
        _image_equal(pair, tmp_path, image, fmt)
    if node == "cbw":  # the old data copied to the fleecing target
        _image_equal(pair, tmp_path, "fleece.qcow2", "qcow2")


def _image_equal(pair: tuple[LiveDaemon, LiveDaemon], tmp_path: Path, image: str, fmt: str) -> None:
    files = [str(tmp_path / d.kind / image) for d in pair]
    run("qemu-img", "compare", "-f", fmt, "-F", fmt, *files)
    maps = []
    for f in files:
        maps.append(guest_map(run("qemu-img", "map", "-f", fmt, "--output=json", f)))
    assert maps[0] == maps[1]
    if fmt == "qcow2":
        for f in files:
            run("qemu-img", "check", "-f", fmt, f)


@pytest.mark.parametrize("node", list(WRITABLE))
def test_libnbd_writes_equal_qsd(
    writable: tuple[LiveDaemon, LiveDaemon], node: str, tmp_path: Path
) -> None:
    need_libnbd()
    qsd, ours = writable
    want = json.loads(transcript(qsd, node, "rw"))
    got = json.loads(transcript(ours, node, "rw"))
    assert got == want
    qsd.stop()
    ours.stop()
    _images_equal(writable, tmp_path, node)


QEMU_IO = [
    "write -q -P 0x5a 4096 65536",
    "read -q -P 0x5a 4096 65536",
    "write -q -P 0x66 100000 300000",
    "write -q -z 200k 128k",
    "write -q -z -u 512k 64k",
    "discard -q 320k 64k",
    "flush",
    "read -q -P 0 200k 128k",
    "read -q -v 99990 32",
    "write -q -P 0x77 900k 124k",
    "write -q -P 0 768k 192k",  # zeros as data: detect-zeroes turns them into zero writes
    "write -q -P 0 700k 1000",
    "aio_write -q -P 0x12 0 4k",
    "aio_flush",
    "read -q -P 0x12 0 4k",
]


@pytest.mark.parametrize("node", ["disk", "chain", "window", "fresh", "raw-chain", "cbw", "dz"])
def test_qemu_io_writes_equal_qsd(
    writable: tuple[LiveDaemon, LiveDaemon], node: str, tmp_path: Path
) -> None:
    qsd, ours = writable
    args = [a for cmd in QEMU_IO for a in ("-c", cmd)]
    want = tool(qsd, "qemu-io", "-f", "raw", *args, qsd.uri(node))
    got = tool(ours, "qemu-io", "-f", "raw", *args, ours.uri(node))
    assert got == want
    assert want[0] == 0 and "verification failed" not in want[1], want
    qsd.stop()
    ours.stop()
    _images_equal(writable, tmp_path, node)


SOURCE = (
    "truncate -s 1M in.raw; qemu-io -f raw -c 'write -P 0x61 0 100k'"
    " -c 'write -P 0x62 512k 4k' -c 'write -P 0 600k 64k' in.raw"
)


@pytest.mark.parametrize("how", ["nbdcopy", "qemu-img"])
@pytest.mark.parametrize("node", ["disk", "chain", "fresh", "cbw"])
def test_copy_into_export_equal_qsd(
    writable: tuple[LiveDaemon, LiveDaemon], node: str, how: str, tmp_path: Path
) -> None:
    """nbdcopy / qemu-img convert -n of a sparse raw file into the export
    (they zero the holes, with FAST_ZERO first where offered)."""
    if how == "nbdcopy":
        need("nbdcopy")
    src = tmp_path / "in.raw"
    subprocess.run(["sh", "-c", SOURCE], cwd=tmp_path, check=True, capture_output=True)
    said: list[tuple[int, str]] = []
    for daemon in writable:
        if how == "nbdcopy":
            said.append(tool(daemon, "nbdcopy", "--target-is-zero", str(src), daemon.uri(node)))
            said.append(tool(daemon, "nbdcopy", str(src), daemon.uri(node)))
        else:
            cmd = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src)]
            said.append(tool(daemon, *cmd, daemon.uri(node)))
    assert said[: len(said) // 2] == said[len(said) // 2 :]
    for daemon in writable:
        daemon.stop()
    _images_equal(writable, tmp_path, node)


def test_cache_is_copy_on_read_as_qsd(tmp_path: Path) -> None:
    """NBD_CMD_CACHE copies what the exported node does not allocate into it
    (zero clusters where it reads zeros), even through a read-only export of
    a writable node; on a read-only node it fails with EPERM.  Not covered:
    the cache of a read-only copy-before-write export (qemu-storage-daemon
    7.2 aborts on a permission assertion), and QEMU's read-only qcow2 nodes
    whose zero ranges were cached: QEMU marks them zero in its in-memory L2
    cache only, so its later block status differs from the file's."""
    need_libnbd()
    blockdevs = [
        "qcow2,node-name=ro,file.driver=file,file.filename=top.qcow2,read-only=on",
        "qcow2,node-name=rw,file.driver=file,file.filename=active.qcow2",
        "qcow2,node-name=fresh,file.driver=file,file.filename=fresh.qcow2",
    ]
    qsd, ours = start_pair(tmp_path, SETUP + FRESH, blockdevs)
    pair = (qsd, ours)
    try:
        for daemon in pair:
            daemon.start_nbd()
            add_exports(daemon, [("ro", "ro", None), ("rw", "rw-as-ro", None)])
            add_exports(daemon, [("fresh", "fresh", None)], writable=True, id_prefix="w")
        for name in ("ro", "rw-as-ro", "fresh"):
            want = json.loads(transcript(qsd, name, "cache"))
            got = json.loads(transcript(ours, name, "cache"))
            if name == "ro":  # QEMU's in-memory zero clusters (see above)
                del want["status_after"], got["status_after"]
            assert got == want, name
    finally:
        qsd.stop()
        ours.stop()
    for image in ("top.qcow2", "active.qcow2", "fresh.qcow2"):
        _image_equal(pair, tmp_path, image, "qcow2")
