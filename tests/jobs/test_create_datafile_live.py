"""blockdev-create of qcow2 images with an external data file (also
data-file-raw and metadata preallocation) or with preallocation (metadata,
falloc, full), against qsd.

The same creation runs on qemu-storage-daemon and on qmpgraph, each in a
directory of its own whose path has the same length (the header records the
data file's path): the images must be equal byte for byte once the
directory is masked, the data files equal in size and allocated blocks, and
``qemu-img check`` must accept qmpgraph's image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_jobs_live import wait_concluded

pytestmark = pytest.mark.qemu

CASES = [
    ({"size": 1048576}, "2M"),
    ({"size": 3145728, "cluster-size": 4096, "lazy-refcounts": True}, ""),
    ({"size": 1048576, "extended-l2": True, "compression-type": "zstd"}, "3000"),
    ({"size": 2097152, "backing-file": "b.qcow2", "backing-fmt": "qcow2", "refcount-bits": 1}, ""),
    ({"size": 1048576, "data-file-raw": True}, ""),
    ({"size": 5242880, "cluster-size": 4096, "data-file-raw": True}, "8M"),
    ({"size": 1000448, "preallocation": "metadata"}, ""),
    ({"size": 5243392, "cluster-size": 4096, "preallocation": "metadata"}, "8M"),
]


@pytest.mark.parametrize(("options", "data_size"), CASES, ids=str)
def test_create_with_data_file_matches_qsd(
    tmp_path: Path, qsd_path: str, options: dict[str, Any], data_size: str
) -> None:
    works = []
    for kind, name in (("qsd", "A"), ("qmpgraph", "B")):
        work = tmp_path / name
        work.mkdir()
        data = work / "a.data"
        if data_size:
            run("qemu-img", "create", "-q", "-f", "raw", str(data), data_size)
        else:
            data.touch()
        (work / "a.qcow2").touch()
        run("qemu-img", "create", "-q", "-f", "qcow2", str(work / "b.qcow2"), "2M")
        d = LiveDaemon(kind, qsd_path, work, [])
        try:
            d.ok("blockdev-add", driver="file", node_name="f", filename=str(work / "a.qcow2"))
            d.ok("blockdev-add", driver="file", node_name="d", filename=str(data))
            opts = {"driver": "qcow2", "file": "f", "data-file": "d", **options}
            d.ok("blockdev-create", job_id="c", options=opts)
            assert "error" not in wait_concluded(d, "c")
        finally:
            d.stop()
        works.append(work)
    images = [(w / "a.qcow2").read_bytes().replace(f"/{w.name}/".encode(), b"/X/") for w in works]
    assert images[0] == images[1]
    sizes = [(os.stat(w / "a.data").st_size, os.stat(w / "a.data").st_blocks) for w in works]
    assert sizes[0] == sizes[1]
    assert _extents(works[0] / "a.data") == _extents(works[1] / "a.data")
    image = str(works[1] / "a.qcow2")
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", image))
    assert info["format-specific"]["data"]["data-file"] == str(works[1] / "a.data")
    subprocess.run(["qemu-img", "check", "-q", image], check=True, timeout=TIMEOUT)


PREALLOC_CASES = [
    ("metadata", {"size": 1048576}),
    ("metadata", {"size": 1000448}),
    ("metadata", {"size": 5243392, "cluster-size": 4096}),
    ("metadata", {"size": 1073741824}),
    ("metadata", {"size": 3145728, "cluster-size": 4096, "version": "v2"}),
    ("metadata", {"size": 2097152, "lazy-refcounts": True, "refcount-bits": 1}),
    ("metadata", {"size": 1048576, "cluster-size": 2097152, "compression-type": "zstd"}),
    ("metadata", {"size": 4194304, "cluster-size": 512}),
    ("metadata", {"size": 3221225472}),
    ("metadata", {"size": 8388608, "cluster-size": 1024, "refcount-bits": 8}),
    ("falloc", {"size": 1048576}),
    ("falloc", {"size": 5242880, "cluster-size": 4096}),
    ("falloc", {"size": 1073741824, "lazy-refcounts": True}),
    ("falloc", {"size": 4194304, "cluster-size": 512}),
    ("full", {"size": 8388608, "cluster-size": 1024, "refcount-bits": 8}),
    ("full", {"size": 1000448}),
    ("full", {"size": 5243392, "cluster-size": 4096, "version": "v2"}),
    ("full", {"size": 2097152, "cluster-size": 16384, "refcount-bits": 8}),
]


@pytest.mark.parametrize(("mode", "options"), PREALLOC_CASES, ids=str)
def test_create_preallocated_matches_qsd(
    tmp_path: Path, qsd_path: str, mode: str, options: dict[str, Any]
) -> None:
    """preallocation metadata/falloc/full: the same bytes, length and data
    extents (metadata: data clusters are holes but the zeros after the
    image's end; falloc/full: the data clusters allocated)."""
    files = []
    for kind in ("qsd", "qmpgraph"):
        work = tmp_path / kind
        work.mkdir()
        image = work / "a.qcow2"
        image.touch()
        d = LiveDaemon(kind, qsd_path, work, [])
        try:
            d.ok("blockdev-add", driver="file", node_name="f", filename=str(image))
            opts = {"driver": "qcow2", "file": "f", "preallocation": mode, **options}
            d.ok("blockdev-create", job_id="c", options=opts)
            assert "error" not in wait_concluded(d, "c")
        finally:
            d.stop()
        files.append(image)
    assert files[0].read_bytes() == files[1].read_bytes()
    assert _extents(files[0]) == _extents(files[1])
    subprocess.run(["qemu-img", "check", "-q", str(files[1])], check=True, timeout=TIMEOUT)


def _extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, offset, end = [], 0, os.fstat(fd).st_size
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, offset))
        return out
    finally:
        os.close(fd)
