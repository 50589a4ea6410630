"""Chardevs against qemu-storage-daemon 7.2, live: the same commands to both
daemons must give the same replies.

* ringbuf: seeded random byte strings (invalid UTF-8, NULs, modified UTF-8
  ``C0 80``, long sequences) written as base64, read back in random slices as
  UTF-8 text and as base64, through ring wrap-around; random base64 text
  (padding in odd places, newlines, incomplete quartets) decoded by GLib.
* socket: a server chardev added by QMP, with real clients from the test:
  ``query-chardev`` and ``connected`` while a client is connected, a second
  client waiting in the backlog, a hang-up with unread data pending.
* file: ``chardev-add`` truncates or appends to its output as QEMU does.
"""

from __future__ import annotations

import base64
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[LiveDaemon]]:
    """qemu-storage-daemon and qmpgraph, each in its own short directory."""
    qsd = require_qemu()
    started: list[LiveDaemon] = []
    try:
        for kind in ("qsd", "qmpgraph"):
            started.append(LiveDaemon(kind, qsd, tmp_path / kind, []))
        yield started
    finally:
        for d in started:
            d.stop()


def _both(daemons: list[LiveDaemon], command: str, **args: Any) -> Any:
    """Run ``command`` on both daemons; the replies must be equal (paths
    under each daemon's directory are written ``$D``)."""
    replies = []
    for d in daemons:
        workdir = str(Path(d.qmp_path).parent)
        sent = {k: _subst(v, workdir) for k, v in args.items()}
        reply = d.qmp(command, **sent)
        replies.append(_unsubst(reply, workdir))
    assert replies[0] == replies[1], (command, args, replies)
    return replies[0]


def _subst(value: Any, workdir: str) -> Any:
    if isinstance(value, str):
        return value.replace("$D", workdir)
    if isinstance(value, dict):
        return {k: _subst(v, workdir) for k, v in value.items()}
    return value


def _unsubst(value: Any, workdir: str) -> Any:
    if isinstance(value, str):
        return value.replace(workdir, "$D")
    if isinstance(value, dict):
        return {k: _unsubst(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsubst(v, workdir) for v in value]
    return value


def _random_bytes(rng: random.Random) -> bytes:
    pieces = [
        b"\0",
        b"\xc0\x80",
        b"\xff",
        b"\xfe",
        b"\x80",
        b"\xc3",
        "é".encode(),
        "€".encode(),
        "😀".encode(),
        b"\xed\xa0\x80",
        b"\xef\xbf\xbf",
        b"\xf8\x88\x88\x88\x88",
        b"\xfc\x84\x80\x80\x80\x80",
        b"\xe0\x80\xaf",
        b"\x1f",
        b"A",
        b'"\\',
    ]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))


def test_ringbuf_bytes_match_qemu(daemons: list[LiveDaemon]) -> None:
    """Random bytes through a 32-byte ring read back identically by both."""
    rng = random.Random(7)
    _both(daemons, "chardev-add", id="r", backend={"type": "ringbuf", "data": {"size": 32}})
    for _ in range(120):
        data = base64.b64encode(_random_bytes(rng)).decode()
        _both(daemons, "ringbuf-write", device="r", data=data, format="base64")
        if rng.random() < 0.6:
            fmt = rng.choice(["utf8", "base64"])
            _both(daemons, "ringbuf-read", device="r", size=rng.randint(1, 40), format=fmt)


def test_ringbuf_base64_input_matches_qemu(daemons: list[LiveDaemon]) -> None:
    """Random base64-alphabet text (with '=', newlines, odd lengths) decodes alike."""
    rng = random.Random(11)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    _both(daemons, "chardev-add", id="r", backend={"type": "ringbuf", "data": {"size": 64}})
    for _ in range(80):
        chars = [rng.choice(alphabet + "==\n") for _ in range(rng.randint(0, 14))]
        if rng.random() < 0.1:
            chars.append(rng.choice("!*-_ \t"))
        _both(daemons, "ringbuf-write", device="r", data="".join(chars), format="base64")
        _both(daemons, "ringbuf-read", device="r", size=64, format="base64")


def _until(check: Callable[[], bool]) -> None:
    """Wait (bounded) for a state both daemons reach asynchronously."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _states(daemons: list[LiveDaemon], label: str) -> list[str]:
    out = []
    for d in daemons:
        workdir = str(Path(d.qmp_path).parent)
        for c in d.ok("query-chardev"):
            if c["label"] == label:
                out.append(c["filename"].replace(workdir, "$D"))
    return out


def test_socket_server_clients_match_qemu(daemons: list[LiveDaemon]) -> None:
    """A chardev-add'ed Unix server: one client at a time, hang-ups noticed."""
    addr = {"type": "unix", "data": {"path": "$D/s"}}
    _both(daemons, "chardev-add", id="s", backend={"type": "socket", "data": {"addr": addr}})
    paths = [str(Path(d.qmp_path).parent / "s") for d in daemons]
    assert _states(daemons, "s") == ["disconnected:unix:$D/s,server=on"] * 2
    first = [socket.socket(socket.AF_UNIX) for _ in paths]
    second = [socket.socket(socket.AF_UNIX) for _ in paths]
    try:
        for sock, path in zip(first, paths, strict=True):
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            # Unread by the chardev (no frontend), still pending at the hang-up.
            sock.sendall(b"pending bytes")
        _until(lambda: _states(daemons, "s") == ["unix:$D/s,server=on"] * 2)
        _both(daemons, "qom-get", path="/chardevs/s", property="connected")
        for sock, path in zip(second, paths, strict=True):
            sock.settimeout(TIMEOUT)
            sock.connect(path)
        for sock in first:
            sock.close()
        # The hang-up frees the server for the client waiting in the backlog.
        _until(lambda: _states(daemons, "s") == ["unix:$D/s,server=on"] * 2)
        for sock in second:
            sock.close()
        _until(lambda: _states(daemons, "s") == ["disconnected:unix:$D/s,server=on"] * 2)
        _both(daemons, "qom-get", path="/chardevs/s", property="connected")
        _both(daemons, "chardev-remove", id="s")
        assert not any(Path(p).exists() for p in paths)
    finally:
        for sock in first + second:
            sock.close()


def test_file_truncate_and_append_match_qemu(daemons: list[LiveDaemon]) -> None:
    """``append`` keeps the output file's contents; without it, it is truncated."""
    dirs = [Path(d.qmp_path).parent for d in daemons]
    for name in ("keep", "trunc"):
        for d in dirs:
            (d / name).write_bytes(b"old contents\n")
    _both(
        daemons,
        "chardev-add",
        id="k",
        backend={"type": "file", "data": {"out": "$D/keep", "append": True}},
    )
    _both(daemons, "chardev-add", id="t", backend={"type": "file", "data": {"out": "$D/trunc"}})
    sizes = [[(d / n).stat().st_size for n in ("keep", "trunc")] for d in dirs]
    assert sizes[0] == sizes[1]
