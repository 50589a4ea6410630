"""Real NBD clients against qmpgraph's exports, compared with qemu-storage-daemon's.

The same image is exported by qemu-storage-daemon 7.2 and by qmpgraph, and
``nbdinfo`` (--json, --list, --map), raw protocol probes, ``nbdcopy``,
``qemu-io`` and ``qemu-img compare`` must see the same thing.  Every tool
and socket has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_qemu
from livekit import LiveDaemon, run
from nbdwire import RawClient, meta_payload, name_payload, option, request

MiB = 1 << 20

pytestmark = pytest.mark.qemu


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is required when CI=true (apt-get install libnbd-bin)")
        pytest.skip(f"{tool} not installed (libnbd-bin)")


def make_image(path: Path) -> None:
    """A sparse 1 MiB raw image with data at 0 and at 64 KiB."""
    with path.open("wb") as f:
        f.truncate(MiB)
        f.write(b"\x11" * 4096)
        f.seek(65536)
        f.write(b"hello")


def both(tmp_path: Path, blockdevs: list[str]) -> Iterator[tuple[LiveDaemon, LiveDaemon]]:
    qsd = require_qemu()
    daemons = []
    try:
        for kind in ("qsd", "qmpgraph"):
            daemons.append(LiveDaemon(kind, qsd, tmp_path / kind, blockdevs))
        yield daemons[0], daemons[1]
    finally:
        for d in daemons:
            d.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[LiveDaemon, LiveDaemon]]:
    """qsd and qmpgraph, each exporting its own copy of the same raw image."""
    _need("nbdinfo")
    for kind in ("qsd", "qmpgraph"):
        (tmp_path / kind).mkdir()
        make_image(tmp_path / kind / "img.raw")
    specs = ["file,filename=img.raw,node-name=f0", "raw,file=f0,node-name=r0"]
    for d in both(tmp_path, specs):
        for daemon in d:
            daemon.start_nbd()
            daemon.ok("block-export-add", type="nbd", id="e0", node_name="r0", name="ro")
            daemon.ok(
                "block-export-add",
                type="nbd",
                id="e1",
                node_name="r0",
                name="rw",
                writable=True,
                description="writable one",
            )
        yield d


def _norm(text: str, daemon: LiveDaemon) -> str:
    return text.replace(daemon.nbd_path, "SOCK")


def test_nbdinfo_json_list_map_equal_qsd(pair: tuple[LiveDaemon, LiveDaemon]) -> None:
    qsd, ours = pair
    for args in (["--json"], ["--map"], ["--map", "--totals"]):
        for name in ("ro", "rw"):
            want = _norm(run("nbdinfo", *args, qsd.uri(name)), qsd)
            got = _norm(run("nbdinfo", *args, ours.uri(name)), ours)
            assert got == want, (args, name)
    want = _norm(run("nbdinfo", "--list", "--json", qsd.uri("")), qsd)
    assert _norm(run("nbdinfo", "--list", "--json", ours.uri("")), ours) == want


def _probe(path: str) -> list[object]:
    """A transcript of protocol probes (errors, flags, chunk shapes)."""
    out: list[object] = []
    c = RawClient(path)
    c.handshake()
    out.append([(r.type, r.payload) for r in c.opt(8)])
    out.append([(r.type, r.payload) for r in c.opt(9, meta_payload(b"ro", []))])
    out.append([(r.type, r.payload) for r in c.opt(10, meta_payload(b"ro", [b"base:allocation"]))])
    out.append([(r.type, r.payload) for r in c.opt(6, name_payload(b"nope"))])
    out.append([(r.type, r.payload) for r in c.opt(7, name_payload(b"ro", [1, 3]))])
    probes = [
        request(1, 0, 4) + b"abcd",
        request(0, MiB - 512, 1024),
        request(0, 0, 33554433),
        request(3, 0, 0, flags=2),
        request(9, 0, 0),
        request(7, 0, 0),
        request(0, 0, 0),
    ]
    for data in probes:
        c.send(data)
        ch = c.reply()
        out.append((ch.flags, ch.type, ch.payload))
    c.send(request(0, 0, 8192))
    out.append([(ch.flags, ch.type, len(ch.payload), ch.payload[:12]) for ch in c.chunks()])
    c.send(request(7, 0, MiB))
    out.append([(ch.flags, ch.type, ch.payload) for ch in c.chunks()])
    c.send(request(7, 0, MiB, flags=8))
    out.append([(ch.flags, ch.type, ch.payload) for ch in c.chunks()])
    c.send(struct.pack(">IHHQQI", 0x1234, 0, 0, 5, 0, 0))
    ch = c.reply()
    out.append((ch.flags, ch.type, ch.cookie, ch.payload))
    c.close()
    c = RawClient(path)
    c.handshake(1)
    c.send(option(1, b"rw"))
    out.append(c.recv_exact(134))
    c.send(request(0, 0, 16))
    ch = c.reply(16)
    out.append((ch.flags, ch.payload))
    c.close()
    return out


def test_protocol_probes_equal_qsd(pair: tuple[LiveDaemon, LiveDaemon]) -> None:
    qsd, ours = pair
    assert _probe(ours.nbd_path) == _probe(qsd.nbd_path)


def test_nbdcopy_out_and_in(pair: tuple[LiveDaemon, LiveDaemon], tmp_path: Path) -> None:
    _need("nbdcopy")
    _, ours = pair
    out = tmp_path / "copy.raw"
    run("nbdcopy", ours.uri("ro"), str(out))
    run(
        "qemu-img",
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "raw",
        str(out),
        str(tmp_path / "qmpgraph/img.raw"),
    )
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(256 * 1024) + bytes(512 * 1024) + os.urandom(256 * 1024))
    run("nbdcopy", str(src), ours.uri("rw"))
    ours.stop()
    run(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        str(src),
        str(tmp_path / "qmpgraph/img.raw"),
    )


def test_qemu_io_over_nbd(pair: tuple[LiveDaemon, LiveDaemon]) -> None:
    qsd, ours = pair
    cmds = ["-c", "write -P 0x5a 4096 65536", "-c", "read -P 0x5a 4096 65536", "-c", "flush"]
    cmds += ["-c", "write -z 0 4096", "-c", "read -P 0 0 4096", "-c", "discard 0 4096"]
    out = run("qemu-io", "-f", "raw", *cmds, ours.uri("rw"))
    assert "Pattern verification failed" not in out
    assert out.count("wrote") == 2 and out.count("read") == 2
    # A write to the read-only export: whatever qemu-io says, it says it for both.
    said = []
    for daemon in (qsd, ours):
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 512", daemon.uri("ro")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        said.append((res.returncode, _norm(res.stdout + res.stderr, daemon)))
    assert said[0] == said[1]


def test_null_co_map_equal_qsd(tmp_path: Path) -> None:
    _need("nbdinfo")
    specs = [
        "null-co,node-name=n0,size=1048576",
        "null-co,node-name=n1,size=1048576,read-zeroes=on",
    ]
    for qsd, ours in both(tmp_path, specs):
        for daemon in (qsd, ours):
            daemon.start_nbd()
            daemon.ok("nbd-server-add", device="n0")
            daemon.ok("nbd-server-add", device="n1", writable=True)
        for name in ("n0", "n1"):
            for args in (["--map"], ["--json"]):
                want = _norm(run("nbdinfo", *args, qsd.uri(name)), qsd)
                assert _norm(run("nbdinfo", *args, ours.uri(name)), ours) == want
