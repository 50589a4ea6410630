"""The sans-IO NBD server core, fed bytes directly (no sockets, no trio).

Expected bytes and texts were recorded from qemu-storage-daemon 7.2 with the
``RawClient`` probes of ``tests/nbd/nbdwire.py`` (raw 1 MiB image exported
read-only as 'ro' and writable as 'rw'); ``test_nbd_live.py`` replays the same
probes against both servers.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from dataclasses import dataclass

from nbdwire import meta_payload, name_payload, option, request

from qmpgraph.nbd import constants as c
from qmpgraph.nbd.server import Closed, ExportInfo, Ready, Request, ServerConnection

MiB = 1024 * 1024
RO_FLAGS = 0x050F
RW_FLAGS = 0x0D6D


@dataclass(frozen=True)
class Exp:
    name: str
    description: str | None = None
    size: int = MiB
    nbdflags: int = RO_FLAGS
    request_alignment: int = 1
    max_transfer: int = 1 << 31
    allocation_depth: bool = False
    bitmap_names: tuple[str, ...] = ()


class Dir:
    def __init__(self, *exports: Exp) -> None:
        self.exports = list(exports)

    def find(self, name: str) -> ExportInfo | None:
        return next((e for e in self.exports if e.name == name), None)

    def all(self) -> list[Exp]:
        return self.exports


def parse_opt_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, typ, length = struct.unpack(">QIII", data[:20])
        assert magic == c.REP_MAGIC
        out.append((opt, typ, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def negotiated(
    exports: Dir | None = None, *, structured: bool = True, name: bytes = b"ro"
) -> ServerConnection:
    conn = ServerConnection(exports or Dir(Exp("ro"), Exp("rw", nbdflags=RW_FLAGS)))
    assert conn.data_to_send() == b"NBDMAGIC" + struct.pack(">QH", c.IHAVEOPT, 3)
    data = struct.pack(">I", 3)
    if structured:
        data += option(c.OPT_STRUCTURED_REPLY)
    data += option(c.OPT_GO, name_payload(name))
    events = conn.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], Ready)
    conn.data_to_send()
    return conn


def error_of(data: bytes) -> tuple[int, str]:
    magic, flags, typ, _cookie, length = struct.unpack(">IHHQI", data[:20])
    assert (magic, flags, typ) == (c.STRUCTURED_REPLY_MAGIC, 1, c.REPLY_TYPE_ERROR)
    err, mlen = struct.unpack(">IH", data[20:26])
    assert length == 6 + mlen
    return err, data[26 : 26 + mlen].decode()


def test_go_replies_as_qemu() -> None:
    conn = ServerConnection(Dir(Exp("ro")))
    conn.data_to_send()
    events = conn.receive_data(
        struct.pack(">I", 3)
        + option(c.OPT_STRUCTURED_REPLY)
        + option(c.OPT_GO, name_payload(b"ro"))
    )
    assert isinstance(events[0], Ready)
    replies = parse_opt_replies(conn.data_to_send())
    assert replies == [
        (8, 1, b""),
        (7, 3, bytes.fromhex("0003000000010000100002000000")),
        (7, 3, bytes.fromhex("00000000000000100000058f")),
        (7, 1, b""),
    ]


def test_info_without_structured_and_export_name() -> None:
    conn = ServerConnection(Dir(Exp("ro"), Exp("rw", nbdflags=RW_FLAGS)))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3) + option(c.OPT_INFO, name_payload(b"ro")))
    assert parse_opt_replies(conn.data_to_send()) == [
        (6, 3, bytes.fromhex("0003000000010000100002000000")),
        (6, 3, bytes.fromhex("00000000000000100000050f")),
        (6, 1, b""),
    ]
    conn.receive_data(option(c.OPT_STRUCTURED_REPLY))
    conn.data_to_send()
    events = conn.receive_data(option(c.OPT_EXPORT_NAME, b"rw"))
    assert isinstance(events[0], Ready)
    assert conn.data_to_send() == bytes.fromhex("00000000001000000ded")


def test_export_name_pads_without_no_zeroes() -> None:
    conn = ServerConnection(Dir(Exp("ro")))
    conn.receive_data(struct.pack(">I", 1) + option(c.OPT_EXPORT_NAME, b"ro"))
    assert len(conn.data_to_send()) == 18 + 134


def test_option_errors() -> None:
    conn = ServerConnection(Dir(Exp("ro"), Exp("rw", nbdflags=RW_FLAGS)))
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 3))
    cases = [
        (
            option(6, name_payload(b"x" * 100)),
            0x80000006,
            "export '" + "x" * 80 + "...' not present",
        ),
        (option(3, b"x"), 0x80000003, "option 'list' has unexpected length"),
        (
            option(10, meta_payload(b"ro", [b"base:allocation"])),
            0x80000003,
            "request option 'set meta context' when structured reply is not negotiated",
        ),
        (option(99, b"abc"), 0x80000001, "Unsupported option 99 (<unknown>)"),
        (option(5), 0x80000002, "TLS not configured"),
        (option(6, b"\0\0\0\5ab"), 0x80000003, "Inconsistent lengths in option info"),
        (option(6, name_payload(b"r\0o")), 0x80000003, "Unexpected embedded NUL in option info"),
    ]
    for data, rep, text in cases:
        assert conn.receive_data(data) == []
        ((_, typ, payload),) = parse_opt_replies(conn.data_to_send())
        assert (typ, payload.decode()) == (rep, text)
    conn.receive_data(option(3))
    assert parse_opt_replies(conn.data_to_send()) == [
        (3, 2, b"\0\0\0\2ro"),
        (3, 2, b"\0\0\0\2rw"),
        (3, 1, b""),
    ]


def test_meta_contexts() -> None:
    conn = ServerConnection(Dir(Exp("ro"), Exp("d", allocation_depth=True)))
    conn.receive_data(struct.pack(">I", 3))
    conn.data_to_send()
    conn.receive_data(option(9, meta_payload(b"ro", [])))
    assert parse_opt_replies(conn.data_to_send()) == [
        (9, 4, b"\0\0\0\0base:allocation"),
        (9, 1, b""),
    ]
    conn.receive_data(option(9, meta_payload(b"d", [b"qemu:", b"base:"])))
    assert parse_opt_replies(conn.data_to_send()) == [
        (9, 4, b"\0\0\0\0base:allocation"),
        (9, 4, b"\0\0\0\0qemu:allocation-depth"),
        (9, 1, b""),
    ]
    conn.receive_data(option(8))
    conn.data_to_send()
    q = [b"base:allocation", b"base:", b"qemu:allocation-depth"]
    conn.receive_data(option(10, meta_payload(b"d", q)))
    assert parse_opt_replies(conn.data_to_send()) == [
        (10, 4, b"\0\0\0\0base:allocation"),
        (10, 4, b"\0\0\0\1qemu:allocation-depth"),
        (10, 1, b""),
    ]
    conn.receive_data(option(7, name_payload(b"d")))
    assert conn.meta_contexts() == [0, 1]


def test_handshake_failures_close() -> None:
    conn = ServerConnection(Dir())
    assert conn.receive_data(struct.pack(">I", 8)) == [
        Closed("option negotiation failed: Unknown client flags 0x8 received")
    ]
    conn = ServerConnection(Dir())
    events = conn.receive_data(struct.pack(">I", 0) + option(3))
    assert events == [Closed("option negotiation failed: Unsupported option 3 (list)")]
    conn = ServerConnection(Dir())
    events = conn.receive_data(struct.pack(">I", 3) + struct.pack(">QII", 1, 3, 0))
    assert events == [Closed("option negotiation failed: Bad magic received")]
    conn = ServerConnection(Dir())
    conn.data_to_send()
    assert conn.receive_data(struct.pack(">I", 3) + option(2)) == [Closed(None)]
    assert parse_opt_replies(conn.data_to_send()) == [(2, 1, b"")]


def test_request_validation_as_qemu() -> None:
    conn = negotiated()
    cases = [
        (request(1, 0, 4) + b"abcd", "Export is read-only"),
        (
            request(0, MiB - 512, 1024),
            "operation past EOF; From: 1048064, Len: 1024, Size: 1048576",
        ),
        (request(0, 0, 33554433), "len (33554433 ) is larger than max len (33554432)"),
        (request(3, 0, 0, flags=2), "unsupported flags for command flush (got 0x2)"),
        (request(9, 0, 0), "invalid request type (9) received"),
        (request(7, 0, 0), "need non-zero length"),
        (request(7, 0, 512), "CMD_BLOCK_STATUS not negotiated"),
    ]
    for data, text in cases:
        assert conn.receive_data(data) == []
        assert error_of(conn.data_to_send()) == (22, text)
    (ev,) = conn.receive_data(request(0, 0, 8192, flags=4, cookie=7))
    assert ev == Request(7, 0, 4, 0, 8192)


def test_write_split_across_feeds_and_disc() -> None:
    conn = negotiated(name=b"rw")
    data = request(1, 0, 4, flags=1, cookie=5) + b"abcd"
    assert conn.receive_data(data[:30]) == []
    assert conn.receive_data(data[30:]) == [Request(5, 1, 1, 0, 4, b"abcd")]
    assert conn.receive_data(request(2, 0, 0)) == [Closed(None)]
    assert conn.receive_data(request(0, 0, 1)) == []


def test_oversized_write_and_bad_magic_answer_then_close() -> None:
    conn = negotiated(name=b"rw")
    events = conn.receive_data(request(1, 0, 33554433))
    assert events == [Closed("Request handling failed in intermediate state")]
    assert error_of(conn.data_to_send())[0] == 22
    conn = negotiated()
    events = conn.receive_data(struct.pack(">IHHQQI", 0x1234, 0, 0, 9, 0, 0))
    assert isinstance(events[0], Closed)
    assert error_of(conn.data_to_send()) == (22, "invalid magic (got 0x1234)")


def test_simple_replies_without_structured() -> None:
    conn = negotiated(structured=False)
    conn.receive_data(request(99, 0, 0, cookie=3))
    assert conn.data_to_send() == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 22, 3)
    assert (
        b"".join(conn.reply_read(4, 0, [b"ab", 2]))
        == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 4) + b"ab\0\0"
    )


def test_nbd_core_imports_no_trio() -> None:
    code = "import sys, qmpgraph.nbd.server; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
