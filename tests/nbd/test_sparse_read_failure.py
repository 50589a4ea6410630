"""A structured (sparse) read that fails part-way, against qemu-storage-daemon (live).

QEMU 7.2 sends a sparse read's chunks as it goes: when the data read fails
after a chunk went out, it cannot answer with an error any more and drops
the client ("Failed to send reply: reading from file failed"); when block
status fails instead, an error chunk ends the reply and the connection
lives on.  The export is raw over a blkdebug node over a file holding data
in its first 4 KiB (qemu-img create allocates them), then a hole up to
64 KiB, then data: a data and a hole chunk go out before the failure.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import require_qemu
from livekit import LiveDaemon, run  # tests/nbd helpers, on sys.path above
from nbdwire import RawClient, name_payload, request

pytestmark = pytest.mark.qemu

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
CMD_READ = 0
KiB = 1024


def _spec(rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": "top",
        "file": {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": {"driver": "file", "filename": "img.raw"},
            "inject-error": [rule],
        },
    }


def _transcript(d: Path, rule: dict[str, Any], kind: str) -> list[Any]:
    d.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-f", "raw", str(d / "img.raw"), "1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 64k 960k", str(d / "img.raw"))
    daemon = LiveDaemon(kind, require_qemu(), d, [])
    try:
        daemon.ok("blockdev-add", **_spec(rule))
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="top")
        client = RawClient(daemon.nbd_path, timeout=30.0)
        try:
            client.handshake()
            assert client.opt(OPT_STRUCTURED_REPLY)[-1].type == 1
            assert client.opt(OPT_GO, name_payload(b"e"))[-1].type == 1
            out: list[Any] = []
            for cookie in (1, 2):
                client.send(request(CMD_READ, 0, 128 * KiB, cookie=cookie))
                try:
                    while True:  # chunk by chunk: those before a hang-up count too
                        chunk = client.reply()
                        payload = chunk.payload
                        if chunk.type == 1:  # OFFSET_DATA: keep the offset and a summary
                            payload = payload[:8] + bytes(sorted(set(payload[8:])))
                        out.append([chunk.cookie, chunk.flags, chunk.type, payload.hex()])
                        if chunk.flags & 1:
                            break
                except EOFError:
                    out.append("EOF")
                    break
            return out
        finally:
            client.close()
    finally:
        daemon.stop()


RULES = {
    # The data read after the hole chunk fails: the client is dropped.
    "read": {"event": "read_aio", "errno": 5, "sector": 200},
    # Block status of the data fails: an error chunk ends the reply.
    "status": {"event": "none", "iotype": "block-status", "errno": 5, "sector": 200},
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_sparse_read_failure_as_qsd(tmp_path: Path, name: str) -> None:
    require_qemu()
    got = {kind: _transcript(tmp_path / kind, RULES[name], kind) for kind in ("qsd", "qmpgraph")}
    assert got["qmpgraph"] == got["qsd"]
    # The scenario must reach the failure (not a plain successful read).
    if name == "read":
        assert [c[2] for c in got["qsd"][:2]] == [1, 2] and got["qsd"][2] == "EOF"
    else:
        assert struct.pack(">I", 5).hex() in str(got["qsd"])
