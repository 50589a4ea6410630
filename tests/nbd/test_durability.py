"""Nothing acknowledged is lost, and a misbehaving client harms no one else.

Each test starts ``qmpgraph daemon`` (and, as the oracle, qemu-storage-daemon)
as a subprocess with qsd's command line: a raw image behind ``file`` and
``raw`` nodes, ``--nbd-server`` on a Unix socket and a writable
``--export``, readiness by ``--pidfile``.

* Durability: a real client (python ``nbd`` from python3-libnbd, run by the
  system python; or ``qemu-io``) writes with FUA, or writes and flushes; the
  daemon is SIGKILLed as soon as the acknowledgement arrives, and the image
  must hold every acknowledged byte (``qemu-img compare`` against the
  expected image).
* Misbehaving clients (a write cut off mid-payload, a bad request magic, a
  range past the end): the replies equal qsd's on the same image, and a
  witness client connected throughout keeps reading and writing, and new
  clients are still served.

Every process and socket is bounded by a timeout and killed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli.helpers import QMPGRAPH, wait_for_pidfile
from conftest import require_qemu
from nbdwire import RawClient, name_payload, request

pytestmark = pytest.mark.qemu

MiB = 1 << 20
TIMEOUT = 30
SYSTEM_PYTHON = "/usr/bin/python3"
READ, WRITE, FLUSH = 0, 1, 3
FLAG_FUA = 1
OFFSET_DATA, OFFSET_HOLE = 1, 2

# The client run by the system python (python3-libnbd is not in the venv):
# argv = uri, mode ("fua" or "flush"), daemon pid.  It kills the daemon the
# moment the last acknowledgement is in, while still connected.
LIBNBD_WRITER = """
import os, signal, sys
import nbd
uri, mode, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
for i, off in enumerate((0, 4096, 65536 + 17, 1048576 - 512)):
    buf = bytes([0x41 + i]) * 512
    if mode == "fua":
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
    else:
        h.pwrite(buf, off)
if mode == "flush":
    h.flush()
os.kill(pid, signal.SIGKILL)
"""
LIBNBD_OFFSETS = (0, 4096, 65536 + 17, MiB - 512)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is required when CI=true")
        pytest.skip(f"{tool} not installed")


def _need_libnbd() -> None:
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, timeout=TIMEOUT, check=False
    )
    if probe.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("python3-libnbd is required when CI=true")
        pytest.skip("python3-libnbd not installed for /usr/bin/python3")


def _make_image(path: Path) -> bytearray:
    """A 1 MiB raw image with some data; its expected contents."""
    content = bytearray(MiB)
    content[8192:12288] = b"\x11" * 4096
    path.write_bytes(content)
    return content


@contextmanager
def _daemon(kind: str, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A daemon exporting ``workdir/img.raw`` writable as ``r0``: the process
    and its NBD socket path.  Killed on exit."""
    cmd = [require_qemu()] if kind == "qsd" else QMPGRAPH
    sock, pidfile = workdir / "n.sock", workdir / "pid"
    argv = [
        *cmd,
        "--blockdev",
        f"file,node-name=f0,filename={workdir / 'img.raw'}",
        "--blockdev",
        "raw,file=f0,node-name=r0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=r0,writable=on",
        "--pidfile",
        str(pidfile),
    ]
    proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_pidfile(proc, pidfile, TIMEOUT)
        yield proc, str(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()


def _compare(image: Path, expected: bytearray, tmp: Path) -> None:
    want = tmp / "want.raw"
    want.write_bytes(expected)
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(want)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert image.read_bytes() == expected


@pytest.mark.parametrize("kind", ["qmpgraph", "qsd"])
@pytest.mark.parametrize("mode", ["fua", "flush"])
def test_acknowledged_writes_survive_sigkill_libnbd(kind: str, mode: str, tmp_path: Path) -> None:
    _need_libnbd()
    _need("qemu-img")
    expected = _make_image(tmp_path / "img.raw")
    with _daemon(kind, tmp_path) as (proc, sock):
        uri = f"nbd+unix:///r0?socket={sock}"
        res = subprocess.run(
            [SYSTEM_PYTHON, "-c", LIBNBD_WRITER, uri, mode, str(proc.pid)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
    for i, off in enumerate(LIBNBD_OFFSETS):
        expected[off : off + 512] = bytes([0x41 + i]) * 512
    _compare(tmp_path / "img.raw", expected, tmp_path)


@pytest.mark.parametrize("kind", ["qmpgraph", "qsd"])
@pytest.mark.parametrize("mode", ["fua", "flush"])
def test_acknowledged_writes_survive_sigkill_qemu_io(kind: str, mode: str, tmp_path: Path) -> None:
    _need("qemu-io")
    _need("qemu-img")
    expected = _make_image(tmp_path / "img.raw")
    cmds = ["-c", "write -f -P 0x5a 4096 65536"] if mode == "fua" else []
    if mode == "flush":
        cmds = ["-c", "write -P 0x5a 4096 65536", "-c", "flush"]
    with _daemon(kind, tmp_path) as (proc, sock):
        res = subprocess.run(
            ["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///r0?socket={sock}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        # qemu-io exits once its last request is acknowledged; kill at once.
        proc.kill()
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert "wrote 65536/65536" in res.stdout
        proc.wait(TIMEOUT)
    expected[4096 : 4096 + 65536] = b"\x5a" * 65536
    _compare(tmp_path / "img.raw", expected, tmp_path)


# --- misbehaving clients ---------------------------------------------------


def _connect(sock: str) -> RawClient:
    """A raw client past the handshake, with structured replies, on ``r0``."""
    client = RawClient(sock, timeout=TIMEOUT)
    client.handshake()
    assert client.opt(8)[-1].type == 1
    assert client.opt(7, name_payload(b"r0"))[-1].type == 1
    return client


def _read(client: RawClient, offset: int, length: int, cookie: int) -> bytes:
    """A structured read, reassembled (data and hole chunks)."""
    client.send(request(READ, offset, length, cookie=cookie))
    out = bytearray(length)
    for ch in client.chunks():
        assert ch.cookie == cookie
        if ch.type == OFFSET_DATA:
            (start,) = struct.unpack(">Q", ch.payload[:8])
            out[start - offset : start - offset + len(ch.payload) - 8] = ch.payload[8:]
        elif ch.type == OFFSET_HOLE:
            start, size = struct.unpack(">QI", ch.payload)
            out[start - offset : start - offset + size] = bytes(size)
        else:
            assert ch.type == 0, (ch.type, ch.payload)
    return bytes(out)


def _write_check(client: RawClient, offset: int, data: bytes, cookie: int) -> None:
    """A FUA write then a read of it back, through ``client``."""
    client.send(request(WRITE, offset, len(data), flags=FLAG_FUA, cookie=cookie) + data)
    ch = client.reply()
    # QEMU answers a write with a simple reply even after STRUCTURED_REPLY.
    assert (ch.flags, ch.type, ch.cookie) == (0, -1, cookie)
    assert _read(client, offset, len(data), cookie + 1) == data


def _is_closed(client: RawClient) -> bool:
    """Whether the server hung up (after any bytes still pending: none expected)."""
    try:
        extra = client.sock.recv(1)
    except ConnectionResetError:
        return True
    return extra == b""


def _misbehave(sock: str) -> list[object]:
    """Bad clients next to a witness; the transcript of what the bad ones got."""
    out: list[object] = []
    witness = _connect(sock)
    _write_check(witness, 0, b"w0" * 256, 100)

    # A write whose payload stops short, then a hang-up.
    bad = _connect(sock)
    bad.send(request(WRITE, 4096, 4096, cookie=7) + b"\xee" * 100)
    bad.close()
    _write_check(witness, 512, b"w1" * 256, 110)
    # Nothing of the cut-off write reached the disk.
    assert _read(witness, 4096, 4096, 120) == bytes(4096)

    # Half a request header, then a hang-up; a big read never collected.
    bad = _connect(sock)
    bad.send(request(WRITE, 0, 512, cookie=8)[:13])
    bad.close()
    bad = _connect(sock)
    bad.send(request(READ, 0, MiB, cookie=8) * 8)
    bad.close()
    _write_check(witness, 768, b"wh" * 256, 140)

    # A request with a bad magic: an error reply, then the server hangs up.
    bad = _connect(sock)
    bad.send(struct.pack(">IHHQQI", 0x12345678, 0, READ, 9, 0, 512))
    ch = bad.reply()
    out.append(("bad magic", ch.flags, ch.type, ch.cookie, ch.payload, _is_closed(bad)))
    bad.close()
    _write_check(witness, 1024, b"w2" * 256, 130)

    # Ranges past the end: an error each, and the connection stays usable.
    bad = _connect(sock)
    for cookie, hdr in enumerate(
        [
            request(READ, MiB - 512, 1024),
            request(READ, MiB, 1),
            request(WRITE, MiB - 512, 1024) + b"\xdd" * 1024,
            request(WRITE, 2**63, 512) + b"\xdd" * 512,
            request(READ, 2**64 - 512, 1024),
        ],
        start=20,
    ):
        bad.send(hdr[:8] + struct.pack(">Q", cookie) + hdr[16:])
        ch = bad.reply()
        out.append(("past end", ch.flags, ch.type, ch.cookie, ch.payload))
        _write_check(witness, 1536, bytes([cookie]) * 512, 200 + 2 * cookie)
    _write_check(bad, 2048, b"b3" * 256, 300)
    out.append(_read(bad, MiB - 512, 512, 310))
    bad.close()

    # The witness and new clients are still served.
    _write_check(witness, 2560, b"w4" * 256, 400)
    fresh = _connect(sock)
    out.append(_read(fresh, 0, 4096, 500))
    fresh.close()
    witness.close()
    return out


def test_misbehaving_clients_answered_as_qemu_and_others_unharmed(tmp_path: Path) -> None:
    transcripts = []
    for kind in ("qsd", "qmpgraph"):
        workdir = tmp_path / kind
        workdir.mkdir()
        _make_image(workdir / "img.raw")
        with _daemon(kind, workdir) as (proc, sock):
            transcripts.append(_misbehave(sock))
            assert proc.poll() is None, f"{kind} died"
    assert transcripts[1] == transcripts[0]
