"""qcow2 nodes exported over NBD by a qmpgraph daemon, checked with QEMU's tools.

Images are made by ``qemu-img`` and written by ``qemu-io``; what the export
serves is compared with ``qemu-img convert -O raw`` of the same chain, and
after writes over NBD ``qemu-img check`` must find the image clean and
``qemu-img compare`` must match a reference written the same way by qemu-io.
Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is required when CI=true (apt-get install libnbd-bin)")
        pytest.skip(f"{tool} not installed (libnbd-bin)")


def _io(image: Path, fmt: str, *cmds: str, unmap: bool = False) -> None:
    args: list[str] = ["-d", "unmap"] if unmap else []
    for cmd in cmds:
        args += ["-c", cmd]
    run("qemu-io", "-f", fmt, *args, str(image))


def make_chain(d: Path) -> Path:
    """base.qcow2 <- top.qcow2 (4 MiB, 64 KiB clusters), data in both layers."""
    d.mkdir(parents=True, exist_ok=True)
    base, top = d / "base.qcow2", d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), "4M")
    _io(base, "qcow2", "write -P 0x11 0 1M", "write -P 0x22 3M 512k", "write -z 1536k 64k")
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    _io(top, "qcow2", "write -P 0x33 512k 100k", "write -z 3200k 64k", "write -P 0x44 2M 4k")
    return top


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[LiveDaemon, Path]]:
    """A qmpgraph daemon serving top.qcow2 (and its backing file) over NBD."""
    qsd = require_qemu()
    work = tmp_path / "d"
    top = make_chain(work)
    daemon = LiveDaemon("qmpgraph", qsd, work, [])
    try:
        daemon.start_nbd()
        yield daemon, top
    finally:
        daemon.stop()


def _add_top(daemon: LiveDaemon, *, read_only: bool) -> None:
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        node_name="q0",
        read_only=read_only,
        discard="unmap",
        file={"driver": "file", "filename": "top.qcow2"},
    )


def test_read_only_export_equals_convert(chain: tuple[LiveDaemon, Path], tmp_path: Path) -> None:
    _need("nbdcopy")
    daemon, top = chain
    _add_top(daemon, read_only=True)
    daemon.ok("block-export-add", type="nbd", id="e0", node_name="q0", name="ro")
    got, want = tmp_path / "got.raw", tmp_path / "want.raw"
    run("nbdcopy", daemon.uri("ro"), str(got))
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(top), str(want))
    assert got.read_bytes() == want.read_bytes()
    assert got.stat().st_size == 4 * MiB


WRITES = [
    "write -P 0x5a 4096 65536",  # over the top layer's and the backing's data
    "write -P 0x66 1000000 300000",  # partial clusters: copy-on-write from backing
    "write -z 2M 128k",
    "write -z 100 1000",
    "discard 3M 64k",  # a backing cluster: reads zeros afterwards (v3)
    "write -P 0x77 4000k 96k",  # the end of the image
    "flush",
    "read -P 0x5a 4096 65536",
]


def test_writable_export_then_check_and_compare(
    chain: tuple[LiveDaemon, Path], tmp_path: Path
) -> None:
    daemon, top = chain
    ref = make_chain(tmp_path / "ref")
    _add_top(daemon, read_only=False)
    daemon.ok("block-export-add", type="nbd", id="e0", node_name="q0", name="rw", writable=True)
    out = run("qemu-io", "-f", "raw", *[a for w in WRITES for a in ("-c", w)], daemon.uri("rw"))
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    daemon.stop()
    _io(ref, "qcow2", *WRITES, unmap=True)
    run("qemu-img", "check", "-f", "qcow2", str(top))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(ref))
