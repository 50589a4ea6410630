"""Several NBD requests in flight on one connection.

* Pipelined reads and writes (distinct cookies, sent at once by a writer
  thread) against qemu-storage-daemon and qmpgraph alike: every request gets
  exactly one complete, well-framed reply, in whatever order the server
  chose, and reads return the right bytes; reads sent after the writes were
  acknowledged see the new data (the only ordering the NBD spec promises).
* A client that floods requests without reading replies: the server stops
  receiving once its requests in flight are all stuck on sending, so the
  client's socket fills and stays full (observed with trio's
  ``wait_all_tasks_blocked``, not with a clock), and the server serves
  another client meanwhile.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import require_qemu
from livekit import LiveDaemon
from nbdwire import RawClient, name_payload, option, request

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

MiB = 1 << 20
SIZE = 4 * MiB
BLOCK = 64 * 1024
CMD_READ, CMD_WRITE, CMD_FLUSH = 0, 1, 3
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE = 0, 1, 2


def _image(path: Path) -> bytes:
    """A 4 MiB raw image: random data with a hole and a zero block; its bytes."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(SIZE))
    data[MiB : MiB + 4 * BLOCK] = bytes(4 * BLOCK)
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.write(data[:MiB])
        f.seek(MiB + 4 * BLOCK)
        f.write(data[MiB + 4 * BLOCK :])
    return bytes(data)


@pytest.fixture(params=["qsd", "qmpgraph"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LiveDaemon, bytes]]:
    qsd = require_qemu()
    content = _image(tmp_path / "img.raw")
    blockdevs = [
        f"driver=file,filename={tmp_path / 'img.raw'},node-name=f0",
        "driver=raw,file=f0,node-name=r0",
    ]
    d = LiveDaemon(request.param, qsd, tmp_path / request.param, blockdevs)
    try:
        d.start_nbd()
        d.ok("block-export-add", type="nbd", id="e0", node_name="r0", name="w", writable=True)
        yield d, content
    finally:
        d.stop()


def _connect(path: str, *, structured: bool) -> RawClient:
    client = RawClient(path, timeout=30.0)
    client.handshake()
    if structured:
        assert client.opt(OPT_STRUCTURED_REPLY)[-1].type == 1
    assert client.opt(OPT_GO, name_payload(b"w"))[-1].type == 1
    return client


def _exchange(
    client: RawClient, requests: list[bytes], reads: dict[int, tuple[int, int]]
) -> dict[int, bytes]:
    """Send ``requests`` at once (writer thread), read every reply; bytes per cookie.

    ``reads`` maps a read's cookie to (offset, length); other cookies get
    an empty payload and must succeed.  Chunks of one structured reply must
    tile its range exactly, each cookie must finish once, and no stray
    cookie may appear.
    """
    writer = threading.Thread(target=client.send, args=(b"".join(requests),), daemon=True)
    writer.start()
    pending = {struct.unpack(">Q", r[8:16])[0] for r in requests}
    got: dict[int, bytearray] = {}
    covered: dict[int, int] = {}
    while pending:
        (magic,) = struct.unpack(">I", client.recv_exact(4))
        if magic == 0x67446698:  # simple reply
            error, cookie = struct.unpack(">IQ", client.recv_exact(12))
            assert error == 0 and cookie in pending, (error, cookie)
            length = reads[cookie][1] if cookie in reads else 0
            got[cookie] = bytearray(client.recv_exact(length))
            pending.discard(cookie)
            continue
        assert magic == 0x668E33EF, hex(magic)
        flags, typ, cookie, length = struct.unpack(">HHQI", client.recv_exact(16))
        payload = client.recv_exact(length)
        assert cookie in pending, cookie
        offset, total = reads[cookie]
        buf = got.setdefault(cookie, bytearray(total))
        if typ == REPLY_OFFSET_DATA:
            (at,) = struct.unpack(">Q", payload[:8])
            chunk = payload[8:]
        else:
            assert typ == REPLY_OFFSET_HOLE, typ
            at, n = struct.unpack(">QI", payload)
            chunk = bytes(n)
        assert offset <= at and at + len(chunk) <= offset + total
        buf[at - offset : at - offset + len(chunk)] = chunk
        covered[cookie] = covered.get(cookie, 0) + len(chunk)
        if flags & 1:
            assert covered[cookie] == total, (cookie, covered[cookie], total)
            pending.discard(cookie)
    writer.join(30)
    return {k: bytes(v) for k, v in got.items()}


@pytest.mark.qemu
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_pipelined_reads_and_writes(daemon: tuple[LiveDaemon, bytes], structured: bool) -> None:
    d, content = daemon
    expect = bytearray(content)
    client = _connect(d.nbd_path, structured=structured)
    try:
        rng = random.Random(11)
        blocks = list(range(SIZE // BLOCK))
        rng.shuffle(blocks)
        written, read = blocks[:24], blocks[24:56]
        requests, reads = [], {}
        cookie = 100
        for i in range(24):
            # Writes and reads of other blocks, interleaved on the wire.
            w = written[i] * BLOCK
            data = rng.randbytes(BLOCK)
            expect[w : w + BLOCK] = data
            requests.append(request(CMD_WRITE, w, BLOCK, cookie=cookie) + data)
            cookie += 1
            for r in read[i * 4 // 3 : (i + 1) * 4 // 3]:
                reads[cookie] = (r * BLOCK, BLOCK)
                requests.append(request(CMD_READ, r * BLOCK, BLOCK, cookie=cookie))
                cookie += 1
        # A read across the hole and the zero block, and one of the whole image.
        for off, length in ((MiB - BLOCK, 6 * BLOCK), (0, SIZE)):
            reads[cookie] = (off, length)
            requests.append(request(CMD_READ, off, length, cookie=cookie))
            cookie += 1
        requests.append(request(CMD_FLUSH, 0, 0, cookie=cookie))
        got = _exchange(client, requests, reads)
        assert len(got) == len(requests)
        for ck, (off, length) in reads.items():
            # A read overlapping a write in flight sees each block old or new.
            for b in range(off, off + length, BLOCK):
                assert got[ck][b - off : b - off + BLOCK] in (
                    content[b : b + BLOCK],
                    bytes(expect[b : b + BLOCK]),
                ), (d.kind, ck, b)
            untouched = [b for b in range(off, off + length, BLOCK) if b // BLOCK not in written]
            for b in untouched:
                assert got[ck][b - off : b - off + BLOCK] == content[b : b + BLOCK]
        # Every write was acknowledged: now every read sees the new bytes.
        reads = {1000 + i: (b * BLOCK, BLOCK) for i, b in enumerate(written)}
        reads[999] = (0, SIZE)
        requests = [request(CMD_READ, o, n, cookie=ck) for ck, (o, n) in reads.items()]
        got = _exchange(client, requests, reads)
        for ck, (off, length) in reads.items():
            assert got[ck] == bytes(expect[off : off + length]), (d.kind, ck)
    finally:
        client.close()


@pytest.mark.qemu
def test_requests_sent_with_the_go_option(daemon: tuple[LiveDaemon, bytes]) -> None:
    """Requests pipelined behind NBD_OPT_GO are answered after the GO's replies."""
    d, content = daemon
    client = RawClient(d.nbd_path, timeout=30.0)
    try:
        client.handshake()
        reads = [request(CMD_READ, i * BLOCK, BLOCK, cookie=i) for i in range(8)]
        client.send(option(OPT_GO, name_payload(b"w")) + b"".join(reads))
        while (rep := client.opt_reply()).type != 1:
            assert not rep.type & (1 << 31), (d.kind, hex(rep.type))
        got = {}
        for _ in range(8):
            ch = client.reply(BLOCK)
            assert ch.flags == 0 and ch.type == -1, (d.kind, ch)
            got[ch.cookie] = ch.payload
        assert got == {i: content[i * BLOCK : (i + 1) * BLOCK] for i in range(8)}
    finally:
        client.close()


# -- the bound on what a client can make the server hold -----------------------------


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        await trio.lowlevel.wait_readable(sock)
        part = sock.recv(n - len(buf))
        assert part, "server hung up"
        buf += part
    return buf


async def _negotiate(path: str) -> socket.socket:
    """Connect (non-blocking) and enter transmission on export ``w``, simple replies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    await _recv_exact(sock, 18)
    sock.send(struct.pack(">I", 3) + option(OPT_GO, name_payload(b"w")))
    while True:
        _, _, typ, length = struct.unpack(">QIII", await _recv_exact(sock, 20))
        await _recv_exact(sock, length)
        if typ == 1:
            return sock
        assert not typ & (1 << 31), hex(typ)


async def test_flooding_client_is_not_read_without_bound(tmp_path: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": SIZE})
    path = str(tmp_path / "n.sock")
    c.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
    c.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "name": "w"})
    with trio.fail_after(60):
        flood = await _negotiate(path)
        # 200,000 reads of 64 KiB (5.6 MB of requests, 12 GiB of replies)
        # that the client never reads.
        payload = b"".join(
            request(CMD_READ, (i % 64) * BLOCK, BLOCK, cookie=i) for i in range(200_000)
        )
        view = memoryview(payload)
        sent = 0
        while True:
            try:
                n = flood.send(view[sent:])
            except BlockingIOError:
                n = 0
            sent += n
            if n:
                continue
            # Let the server take whatever it will; if it takes nothing more
            # once every one of its tasks is blocked, it has stopped reading.
            await trio.testing.wait_all_tasks_blocked()
            try:
                n = flood.send(view[sent:])
            except BlockingIOError:
                break
            sent += n
        assert sent < len(payload) // 2
        # The server took at most its receive buffer and one parsing piece
        # beyond what the kernel's socket buffers hold.
        kernel = flood.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sent < 2 * MiB + 2 * kernel, (sent, kernel)
        # Another client is still served meanwhile.
        other = await _negotiate(path)
        other.send(request(CMD_READ, 0, 4096, cookie=7))
        magic, error, cookie = struct.unpack(">IIQ", await _recv_exact(other, 16))
        assert (magic, error, cookie) == (0x67446698, 0, 7)
        assert await _recv_exact(other, 4096) == bytes(4096)
        other.close()
        flood.close()
        c.ok("block-export-del", {"id": "e0", "mode": "hard"})
        c.ok("nbd-server-stop")
