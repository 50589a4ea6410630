"""Replay bytes recorded from qemu-storage-daemon 7.2 through qmpgraph's sans-IO path.

``tests/protocol/data/qsd-wire.json`` is written by ``tools/record_wire.py``
from the real daemon: for each case the greeting, the reply to the optional
negotiation, and for each write the bytes QEMU sent back before going quiet.
Here the same writes go through ``QMPSession.receive_data`` and the
dispatcher, and the bytes must be equal (``package`` normalized: it is the
one intended difference).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.protocol.session import QMPSession

DATA = Path(__file__).parent / "data" / "qsd-wire.json"
CASES: list[dict[str, Any]] = json.loads(DATA.read_text(encoding="ascii"))
_PACKAGE = re.compile(rb'"package": "[^"]*"')
SETUP = {
    "negotiation": None,
    "command": b'{"execute": "qmp_capabilities"}\n',
    "oob": b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
}


def _chunk(stored: str | list[Any]) -> bytes:
    """A recorded write: latin-1 text, or [prefix, unit, count, suffix]."""
    if isinstance(stored, str):
        return stored.encode("latin-1")
    prefix, unit, count, suffix = stored
    text: str = prefix + unit * count + suffix
    return text.encode("latin-1")


def _norm(data: bytes) -> bytes:
    return _PACKAGE.sub(b'"package": "P"', data)


@pytest.fixture(scope="module")
def daemon() -> Daemon:
    return Daemon()


def _exchange(dispatcher: Dispatcher, session: QMPSession, data: bytes) -> bytes:
    out = []
    for request in session.receive_data(data):
        reply = dispatcher.dispatch(session, request)
        if reply is not None:
            out.append(session.encode(reply))
    return b"".join(out)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_replay(case: dict[str, Any], daemon: Daemon) -> None:
    dispatcher = Dispatcher(daemon)
    session = QMPSession(daemon.greeting(), pretty=case["pretty"])
    assert _norm(session.greeting_bytes()) == _norm(case["greeting"].encode("latin-1"))
    setup = SETUP[case["mode"]]
    if setup is not None:
        assert _exchange(dispatcher, session, setup) == case["setup"].encode("latin-1")
    got = [_norm(_exchange(dispatcher, session, _chunk(c))) for c in case["chunks"]]
    want = [_norm(r.encode("latin-1")) for r in case["replies"]]
    assert got == want
