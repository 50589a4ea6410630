"""Images made by blockdev-create, checked with QEMU's own tools against qsd's.

The same blockdev-create jobs run on qemu-storage-daemon and on qmpgraph,
each daemon in a directory of its own.  For every qcow2 layout option
(version, cluster sizes from 512 bytes to 2 MiB, refcount widths, lazy
refcounts, extended L2, zstd, backing file and format, small clusters whose
L1 table needs refcount blocks of its own, sizes 0 and 2 PiB, preallocation
with extended L2 entries), ``qemu-img check`` must find both images clean,
``qemu-img info --output=json`` must report the same format-specific data,
cluster size, virtual size, dirty flag and backing file, and the files must
be equal byte for byte.  Jobs that fail (QEMU's truncate refusals,
encryption and backing file refusals after the image was sized) must fail
with the same error and leave the same bytes behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_create_datafile_live import _extents
from test_jobs_live import wait_concluded

pytestmark = pytest.mark.qemu

# (name, qcow2 options besides driver and file)
LAYOUTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {"size": 1073741824}),
    ("v2-4k", {"size": 3145728, "version": "v2", "cluster-size": 4096}),
    ("c512-1g", {"size": 1073741824, "cluster-size": 512}),
    ("c512-rc64", {"size": 268435456, "cluster-size": 512, "refcount-bits": 64}),
    ("c1k-rc1", {"size": 5368709120, "cluster-size": 1024, "refcount-bits": 1}),
    ("c2m", {"size": 10737418240, "cluster-size": 2097152, "refcount-bits": 8}),
    ("lazy-rc32", {"size": 1048576, "lazy-refcounts": True, "refcount-bits": 32}),
    ("extl2-zstd", {"size": 8388608, "extended-l2": True, "cluster-size": 131072,
                    "compression-type": "zstd"}),
    ("extl2-16k", {"size": 1099511627776, "extended-l2": True, "cluster-size": 16384}),
    ("backing", {"size": 2097152, "backing-file": "base.qcow2", "backing-fmt": "qcow2"}),
    ("backing-nofmt", {"size": 4194304, "backing-file": "base.qcow2", "cluster-size": 8192}),
    ("size0", {"size": 0, "cluster-size": 2097152, "refcount-bits": 2}),
    ("max-l1", {"size": 2251799813685248}),
    ("extl2-meta", {"size": 1000448, "extended-l2": True, "preallocation": "metadata"}),
    ("extl2-falloc-backing", {"size": 5243392, "cluster-size": 16384, "extended-l2": True,
                              "preallocation": "falloc", "backing-file": "base.qcow2",
                              "backing-fmt": "qcow2"}),
    ("extl2-full", {"size": 2097152, "cluster-size": 32768, "extended-l2": True,
                    "preallocation": "full"}),
]  # fmt: skip

# (name, options, the job's error): the image is left as QEMU leaves it.
FAILURES: list[tuple[str, dict[str, Any], str]] = [
    ("negative", {"size": -512}, "Could not resize image: Image size cannot be negative"),
    ("l1-too-big", {"size": 2251799813686272},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ("past-max", {"size": 9223372036854775296, "cluster-size": 4096},
     "Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ("no-key", {"size": 1048576, "encrypt": {"format": "luks"}},
     "Parameter 'encrypt.key-secret' is required for cipher"),
    ("bad-cipher", {"size": 2097152, "backing-file": "base.qcow2", "encrypt":
                    {"format": "luks", "key-secret": "s0", "cipher-alg": "3des"}},
     "Algorithm '3des' not supported"),
    ("long-backing", {"size": 1048576, "backing-file": "/" + "x" * 1023},
     f"Could not assign backing file '/{'x' * 1023}' with format '(null)': Invalid argument"),
    ("header-full", {"size": 1048576, "cluster-size": 512, "version": "v2",
                     "backing-file": "b" * 433, "backing-fmt": "raw"},
     f"Could not assign backing file '{'b' * 433}' with format 'raw': No space left on device"),
]  # fmt: skip


def _create_all(
    kind: str, qsd: str, work: Path, cases: list[tuple[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Create one image per case in ``work`` on a ``kind`` daemon; the jobs as concluded."""
    work.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(work / "base.qcow2"), "1M")
    d = LiveDaemon(kind, qsd, work, [])
    jobs = {}
    try:
        d.ok("object-add", qom_type="secret", id="s0", data="zero")
        for name, options in cases:
            image = work / f"{name}.qcow2"
            image.touch()
            d.ok("blockdev-add", driver="file", node_name=name, filename=str(image))
            opts = {"driver": "qcow2", "file": name, **options}
            d.ok("blockdev-create", job_id=f"j-{name}", options=opts)
            jobs[name] = wait_concluded(d, f"j-{name}")
            d.ok("job-dismiss", id=f"j-{name}")
            d.ok("blockdev-del", node_name=name)
    finally:
        d.stop()
    return jobs


def _info(image: Path) -> dict[str, Any]:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(image)))
    keys = ("format", "virtual-size", "cluster-size", "dirty-flag", "format-specific")
    out = {key: info.get(key) for key in keys}
    out["backing"] = (info.get("backing-filename"), info.get("backing-filename-format"))
    return out


def _check(image: Path) -> dict[str, Any]:
    res = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert res.returncode == 0, (image, res.stdout, res.stderr)
    report = json.loads(res.stdout)
    report.pop("filename")
    return dict(report)


def test_created_images_match_qsd(tmp_path: Path, qsd_path: str) -> None:
    """Every layout: both images clean and alike in qemu-img's eyes, and equal."""
    jobs = {k: _create_all(k, qsd_path, tmp_path / k, LAYOUTS) for k in ("qsd", "qmpgraph")}
    for name, _ in LAYOUTS:
        assert jobs["qsd"][name] == jobs["qmpgraph"][name], name
        assert "error" not in jobs["qsd"][name], (name, jobs["qsd"][name])
        images = [tmp_path / k / f"{name}.qcow2" for k in ("qsd", "qmpgraph")]
        checks = [_check(image) for image in images]
        assert checks[0] == checks[1], name
        assert checks[1]["check-errors"] == 0 and not checks[1].get("corruptions"), name
        assert _info(images[0]) == _info(images[1]), name
        assert images[0].read_bytes() == images[1].read_bytes(), name


def test_failed_creations_leave_what_qsd_leaves(tmp_path: Path, qsd_path: str) -> None:
    """QEMU's refusals after the image was started: same error, same bytes left."""
    cases = [(name, options) for name, options, _ in FAILURES]
    jobs = {k: _create_all(k, qsd_path, tmp_path / k, cases) for k in ("qsd", "qmpgraph")}
    for name, _, error in FAILURES:
        assert jobs["qsd"][name].get("error") == error, (name, jobs["qsd"][name])
        assert jobs["qmpgraph"][name] == jobs["qsd"][name], name
        images = [tmp_path / k / f"{name}.qcow2" for k in ("qsd", "qmpgraph")]
        assert images[0].read_bytes() == images[1].read_bytes(), name
        assert _info(images[0]) == _info(images[1]), name
        _check(images[1])


# (preallocation, size, the data file before: "" empty, "x" 5000 bytes, or a qemu-img size,
# and other options)
DATA_FILE_PREALLOC: list[tuple[Any, ...]] = [
    ("falloc", 1000448, ""),
    ("full", 1048576, ""),
    ("falloc", 1048576, "2M"),
    ("full", 3145728, "1M"),
    ("falloc", 1000448, "x"),
    ("full", 2097152, "x"),
    ("falloc", 2097152, "", {"data-file-raw": True}),
    ("full", 1000448, "1M", {"data-file-raw": True, "cluster-size": 4096}),
    ("metadata", 1000448, "", {"extended-l2": True}),
    ("metadata", 1001472, "x", {"extended-l2": True, "cluster-size": 32768}),
    ("falloc", 3146240, "1M", {"extended-l2": True, "data-file-raw": True}),
    ("off", 1000448, "", {"extended-l2": True, "data-file-raw": True}),
]


def test_data_file_preallocation_matches_qsd(tmp_path: Path, qsd_path: str) -> None:
    """Preallocation with an external data file (also data-file-raw and
    extended L2 entries): the image gets metadata preallocation only, the
    data file grows with the mode (after copy-on-write's zeros, per
    subcluster with extended L2): same image, data file length and extents."""
    works = {}
    for kind, name in (("qsd", "A"), ("qmpgraph", "B")):
        work = tmp_path / name
        work.mkdir()
        for i, (_, _, before, *_) in enumerate(DATA_FILE_PREALLOC):
            (work / f"{i}.qcow2").touch()
            data = work / f"{i}.data"
            if before == "x":
                data.write_bytes(b"\1" * 5000)
            elif before:
                run("qemu-img", "create", "-q", "-f", "raw", str(data), before)
            else:
                data.touch()
        d = LiveDaemon(kind, qsd_path, work, [])
        try:
            for i, (mode, size, _, *extra) in enumerate(DATA_FILE_PREALLOC):
                d.ok("blockdev-add", driver="file", node_name=f"f{i}",
                     filename=str(work / f"{i}.qcow2"))  # fmt: skip
                d.ok("blockdev-add", driver="file", node_name=f"d{i}",
                     filename=str(work / f"{i}.data"))  # fmt: skip
                opts = {"driver": "qcow2", "file": f"f{i}", "data-file": f"d{i}", "size": size,
                        "preallocation": mode, **(extra[0] if extra else {})}  # fmt: skip
                d.ok("blockdev-create", job_id=f"j{i}", options=opts)
                assert "error" not in wait_concluded(d, f"j{i}"), (kind, i)
        finally:
            d.stop()
        works[kind] = work
    for i, case in enumerate(DATA_FILE_PREALLOC):
        images = [
            (w / f"{i}.qcow2").read_bytes().replace(f"/{w.name}/".encode(), b"/X/")
            for w in works.values()
        ]
        assert images[0] == images[1], case
        data_files = [works[k] / f"{i}.data" for k in ("qsd", "qmpgraph")]
        assert data_files[0].stat().st_size == data_files[1].stat().st_size, case
        assert _extents(data_files[0]) == _extents(data_files[1]), case
        _check(works["qmpgraph"] / f"{i}.qcow2")
