"""Test helpers: build NBD client bytes and parse server bytes (no qmpgraph code).

Kept independent of ``qmpgraph.nbd`` so tests do not check the server
against its own encoders; ``RawClient`` speaks to any server (qmpgraph's or
qemu-storage-daemon's) over a Unix socket, with a timeout on every read.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


def option(opt: int, payload: bytes = b"") -> bytes:
    """One client option."""
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def name_payload(name: bytes, infos: list[int] | None = None) -> bytes:
    """An NBD_OPT_INFO/GO payload."""
    infos = infos or []
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    """A LIST/SET_META_CONTEXT payload."""
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def request(cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 1) -> bytes:
    """One transmission request header."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@dataclass
class OptReply:
    """A parsed option reply."""

    option: int
    type: int
    payload: bytes


@dataclass
class Chunk:
    """A parsed structured chunk (or a simple reply with type -1)."""

    flags: int
    type: int
    cookie: int
    payload: bytes


class RawClient:
    """A blocking NBD client over a Unix socket, for protocol probes."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (raises EOFError when the server hangs up first)."""
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def handshake(self, flags: int = 3) -> bytes:
        """Read the 18-byte greeting and send client flags; returns the greeting."""
        greeting = self.recv_exact(18)
        self.sock.sendall(struct.pack(">I", flags))
        return greeting

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def opt_reply(self) -> OptReply:
        """One option reply."""
        magic, opt, typ, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REP_MAGIC, hex(magic)
        return OptReply(opt, typ, self.recv_exact(length))

    def opt(self, opt: int, payload: bytes = b"") -> list[OptReply]:
        """Send an option; collect replies up to the ACK or an error."""
        self.send(option(opt, payload))
        out = []
        while True:
            rep = self.opt_reply()
            out.append(rep)
            if rep.type == 1 or rep.type & (1 << 31):
                return out

    def reply(self, read_len: int = 0) -> Chunk:
        """One simple reply (type -1, payload = error + data) or structured chunk."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_len) if not error else b""
            return Chunk(error, -1, cookie, data)
        assert magic == STRUCTURED_MAGIC, hex(magic)
        flags, typ, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return Chunk(flags, typ, cookie, self.recv_exact(length))

    def chunks(self) -> list[Chunk]:
        """Structured chunks up to the one with the DONE flag."""
        out = []
        while True:
            ch = self.reply()
            out.append(ch)
            if ch.flags & 1:
                return out
