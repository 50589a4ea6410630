"""Freed qcow2 clusters discarded in the image file, live against qemu-storage-daemon.

The same images (made by ``qemu-img``/``qemu-io``) are served by qsd and by
qmpgraph over NBD with different discard options, the same guest requests
are sent by ``qemu-io`` to both, and then each file's allocation (SEEK_DATA /
SEEK_HOLE extents: where holes were punched) and ``qemu-img map`` of the
image must be equal.  ``actual-size`` itself is not compared: on ext4 the
extent tree of a file just punched may hold one more or one fewer block,
whichever daemon did it (the extents and maps are what QEMU decides).

Rules checked: a qcow2 node drops discards unless it has discard=unmap; its
freed clusters reach the file when pass-discard-request is on (default: the
node's discard=unmap) and the file node has discard=unmap (an inline file's
default); write-zeroes with unmap from the NBD client deallocates clusters
whatever the node's discard option (QEMU's BlockBackend keeps
BDRV_REQ_MAY_UNMAP), and raw and file nodes punch holes for it too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

# node name -> its --blockdev options besides the file
VARIANTS = {
    "u": "driver=qcow2,discard=unmap",
    "i": "driver=qcow2",
    "nr": "driver=qcow2,discard=unmap,pass-discard-request=off",
    "ig": "driver=qcow2,pass-discard-request=on",
    "r": "driver=raw",
}


def _extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
        return out
    finally:
        os.close(fd)


def _serve(kind: str, qsd: str, work: Path, requests: list[str]) -> dict[str, object]:
    work.mkdir(parents=True)
    specs = []
    for name, opts in VARIANTS.items():
        image = work / f"{name}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 3M", str(image))
        os.sync()
        specs.append(f"{opts},node-name={name},file.driver=file,file.filename={image}")
    daemon = LiveDaemon(kind, qsd, work, specs)
    try:
        daemon.start_nbd()
        for name in VARIANTS:
            daemon.ok("block-export-add", type="nbd", id=name, node_name=name, writable=True)
            args = [arg for req in requests for arg in ("-c", req)]
            run("qemu-io", "-f", "raw", *args, daemon.uri(name))
    finally:
        daemon.stop()
    out: dict[str, object] = {}
    for name, opts in VARIANTS.items():
        image = work / f"{name}.qcow2"
        fmt = "raw" if opts == "driver=raw" else "qcow2"
        mapping = json.loads(run("qemu-img", "map", "-f", fmt, "--output=json", str(image)))
        out[name] = (_extents(image), mapping)
    return out


@pytest.mark.parametrize(
    "requests",
    [
        ["discard 0 1M"],
        ["write -z -u 0 1M"],
        ["write -z -u 0 1M", "discard 2M 64k", "discard 3000k 100k", "write -z 1088k 128k"],
    ],
    ids=["discard", "zero-unmap", "mixed"],
)
def test_freed_clusters_match_qsd(tmp_path: Path, requests: list[str]) -> None:
    qsd = require_qemu()
    expected = _serve("qsd", qsd, tmp_path / "qsd", requests)
    got = _serve("qmpgraph", qsd, tmp_path / "qmpgraph", requests)
    for name in VARIANTS:
        assert got[name] == expected[name], name


@pytest.mark.parametrize("command", ["create", "delete"])
def test_internal_snapshot_on_sparse_file_as_qsd(tmp_path: Path, command: str) -> None:
    """A sparse copy of an image with a snapshot: the operation writes whole
    refcount blocks (QEMU's cache writes clusters) and discards the clusters
    it frees (the old snapshot table; for delete the snapshot's own clusters),
    so the file's extents equal qsd's."""
    qsd = require_qemu()
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", str(src))
    run("qemu-img", "snapshot", "-c", "s1", str(src))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 1M", str(src))
    extents = {}
    for kind in ("qsd", "qmpgraph"):
        work = tmp_path / kind
        work.mkdir()
        image = work / "a.qcow2"
        run("cp", "--sparse=always", str(src), str(image))
        spec = f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}"
        daemon = LiveDaemon(kind, qsd, work, [spec])
        try:
            if command == "create":
                daemon.ok("blockdev-snapshot-internal-sync", device="q", name="s2")
            else:
                daemon.ok("blockdev-snapshot-delete-internal-sync", device="q", name="s1")
        finally:
            daemon.stop()
        extents[kind] = _extents(image)
        run("qemu-img", "check", "-q", str(image))
    assert extents["qmpgraph"] == extents["qsd"]
