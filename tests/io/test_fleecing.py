"""Fleecing without a job (QEMU-BLOCK-GRAPH.md 6.5, schemes B and C), live.

A source qcow2 with known data sits under a copy-before-write filter whose
writable NBD export plays the guest; a reader copies the point-in-time
view (scheme C: a snapshot-access node over the cbw, with a raw temp
target; scheme B: the qcow2 temp target itself, backed by the source) with
``nbdcopy`` while ``qemu-io`` overwrites regions through the guest export.
The copy must equal the original image and the source must hold the new
data, for qmpgraph and for qemu-storage-daemon alike.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_qcow2_export import _io, _need

pytestmark = pytest.mark.qemu

# Before the copy starts: the first write makes the cbw copy old data to the target.
EARLY = ["write -P 0xa1 0 128k", "write -P 0xa2 1M 64k"]
# While nbdcopy reads: partial clusters, zeroes, a discard and the image's end.
DURING = [
    "write -P 0xb2 100000 300000",
    "write -P 0xc3 2M 1M",
    "write -z 3200k 4k",
    "discard 3M 64k",
    "write -P 0xd4 4000k 96k",
    "write -P 0xe5 5000 10",
    "flush",
]


def _make_source(d: Path) -> Path:
    """source.qcow2, 4 MiB of patterned data (with a zero run), and pristine orig.qcow2."""
    d.mkdir(parents=True, exist_ok=True)
    src = d / "source.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(src), "4M")
    _io(src, "qcow2", "write -P 0x11 0 2M", "write -P 0x22 2M 1536k", "write -z 1536k 64k")
    shutil.copy(src, d / "orig.qcow2")
    return src


def _setup(daemon: LiveDaemon, scheme: str) -> str:
    """The fleecing graph of ``scheme``; the name of the export to copy."""
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        node_name="source",
        discard="unmap",
        file={"driver": "file", "filename": "source.qcow2"},
    )
    if scheme == "C":
        daemon.ok("blockdev-add", driver="file", node_name="temp", filename="fleece.raw")
    else:
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="temp",
            backing="source",
            file={"driver": "file", "filename": "fleece.qcow2"},
        )
    daemon.ok(
        "blockdev-add",
        driver="copy-before-write",
        node_name="fl-cbw",
        discard="unmap",
        file="source",
        target="temp",
    )
    daemon.start_nbd()
    daemon.ok(
        "block-export-add", type="nbd", id="g", node_name="fl-cbw", name="guest", writable=True
    )
    if scheme == "C":
        daemon.ok("blockdev-add", driver="snapshot-access", node_name="fl-access", file="fl-cbw")
        daemon.ok("block-export-add", type="nbd", id="f", node_name="fl-access", name="fleece")
    else:
        daemon.ok("block-export-add", type="nbd", id="f", node_name="temp", name="fleece")
    return "fleece"


def _guest(daemon: LiveDaemon, cmds: list[str]) -> None:
    out = run("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], daemon.uri("guest"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def _fleece(kind: str, qsd: str, d: Path, scheme: str) -> tuple[Path, Path]:
    """Run one scheme on one daemon; (the copy, the source image) after it stopped."""
    src = _make_source(d)
    if scheme == "C":
        run("qemu-img", "create", "-f", "raw", str(d / "fleece.raw"), "4M")
    else:
        run("qemu-img", "create", "-f", "qcow2", str(d / "fleece.qcow2"), "4M")
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    copy = d / "copy.raw"
    try:
        # The daemon runs in d/run: point its relative file names at d.
        for name in ("source.qcow2", "fleece.raw", "fleece.qcow2"):
            if (d / name).exists():
                (d / "run" / name).symlink_to(d / name)
        export = _setup(daemon, scheme)
        _guest(daemon, EARLY)
        reader = subprocess.Popen(
            ["nbdcopy", daemon.uri(export), str(copy)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _guest(daemon, DURING)
        _, err = reader.communicate(timeout=TIMEOUT)
        assert reader.returncode == 0, err
    finally:
        daemon.stop()
    return copy, src


def _differ(copy: Path, orig: str) -> bool:
    """Whether ``qemu-img compare`` finds the raw copy unequal to the qcow2 original."""
    cmd = ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(copy), orig]
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False).returncode != 0


@pytest.mark.parametrize("scheme", ["C", "B"])
def test_fleecing_copy_is_point_in_time(tmp_path: Path, scheme: str) -> None:
    qsd = require_qemu()
    _need("nbdcopy")
    ref = _make_source(tmp_path / "ref")
    _io(ref, "qcow2", *EARLY, *DURING, unmap=True)
    results = {}
    for kind in ("qmpgraph", "qsd"):
        d = tmp_path / kind
        copy, src = _fleece(kind, qsd, d, scheme)
        orig = str(d / "orig.qcow2")
        if kind == "qsd" and _differ(copy, orig):
            # qsd 7.2 once copied a discarded region wrongly on a machine at
            # load 17 (a race of its own); the reference gets one more try.
            d = tmp_path / "qsd-again"
            copy, src = _fleece(kind, qsd, d, scheme)
            orig = str(d / "orig.qcow2")
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(copy), orig)
        run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(ref))
        run("qemu-img", "check", "-f", "qcow2", str(src))
        results[kind] = copy.read_bytes()
    assert results["qmpgraph"] == results["qsd"]


# Requests on a writable export of a snapshot-access node, after the guest wrote 0..256k.
ACCESS = [
    "read -P 0x11 0 64k",  # copied: from the target
    "read -P 0x11 1M 64k",  # not copied: from the source
    "write -P 0x55 2M 4k",
    "write -z 2M 4k",
    "discard 64k 64k",
    "read 64k 4k",
    "read -P 0x11 0 64k",
    "read -P 0x11 128k 64k",
]


def _access_session(kind: str, qsd: str, d: Path, cmds: list[str]) -> list[str]:
    """qemu-io results on a writable export of a snapshot-access node (discard=unmap)."""
    _make_source(d)
    run("qemu-img", "create", "-f", "raw", str(d / "fleece.raw"), "4M")
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    try:
        for name in ("source.qcow2", "fleece.raw"):
            (d / "run" / name).symlink_to(d / name)
        _setup(daemon, "C")
        daemon.ok(
            "blockdev-add",
            driver="snapshot-access",
            node_name="fl-rw",
            discard="unmap",
            file="fl-cbw",
        )
        daemon.ok(
            "block-export-add", type="nbd", id="w", node_name="fl-rw", name="rw", writable=True
        )
        _guest(daemon, ["write -P 0x99 0 256k"])
        outs = []
        for cmd in cmds:
            res = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", cmd, daemon.uri("rw")],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            text = res.stdout + res.stderr
            outs.append(text.split("\n")[0] if "failed" in text else "ok")
    finally:
        daemon.stop()
    return outs


def test_snapshot_access_requests_as_qsd(tmp_path: Path) -> None:
    qsd = require_qemu()
    got = _access_session("qmpgraph", qsd, tmp_path / "g", ACCESS)
    want = _access_session("qsd", qsd, tmp_path / "q", ACCESS)
    assert got == want, (got, want)
    assert want[2].endswith("Operation not supported") and want[5].endswith("Invalid argument")
