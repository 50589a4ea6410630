"""A client whose NBD_CMD_DISC or hang-up waits unread no longer holds its export.

QEMU reads an NBD socket as soon as it is readable, so a QMP command sent
after a backup tool exited (block-export-del in mode safe) finds the
export free.  qmpgraph's monitor task may run before the client's task has
read those last bytes; ``Runtime.has_clients`` looks at the socket instead.
These tests drive that check over a socket pair, deterministically: no
daemon, no timing.
"""

from __future__ import annotations

import socket
import struct

import trio

from qmpgraph.nbd import constants as c
from qmpgraph.server import nbd as rt


def _disc() -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 7, 0, 0)


def _read_request() -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, 8, 0, 512)


def _client(sock: socket.socket) -> rt._Client:
    """A negotiated client on ``sock`` (its session is only needed for its slots)."""
    cl = rt._Client(trio.CancelScope(), 1)
    cl.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    cl.session = rt._Session(None, cl, None)  # type: ignore[arg-type]
    return cl


async def test_idle_client_holds_export() -> None:
    ours, theirs = socket.socketpair()
    cl = _client(ours)
    try:
        assert not rt._left(cl)
        theirs.sendall(_read_request())  # a request not read yet: still a user
        assert not rt._left(cl)
    finally:
        theirs.close()
        ours.close()


async def test_disconnect_or_hang_up_unread_has_left() -> None:
    for last in (_disc(), b""):
        ours, theirs = socket.socketpair()
        cl = _client(ours)
        try:
            theirs.sendall(last)
            if not last:
                theirs.close()
            assert rt._left(cl)
            # Nothing was consumed: the client's task still reads it all.
            got = ours.recv(64, socket.MSG_DONTWAIT) if last else b""
            assert got == last
        finally:
            theirs.close()
            ours.close()


async def test_busy_or_hung_up_client_is_not_judged() -> None:
    with trio.fail_after(5):
        ours, theirs = socket.socketpair()
        cl = _client(ours)
        try:
            theirs.sendall(_disc())
            assert cl.session is not None
            await cl.session.slots.acquire()  # a request in flight holds the export
            assert not rt._left(cl)
            cl.session.slots.release()
            cl.closing = True  # hung up by the server: its own bookkeeping rules
            assert not rt._left(cl)
        finally:
            theirs.close()
            ours.close()


async def test_disconnect_followed_by_more_bytes_is_not_trusted() -> None:
    ours, theirs = socket.socketpair()
    cl = _client(ours)
    try:
        theirs.sendall(_read_request() + _disc())
        assert not rt._left(cl)
    finally:
        theirs.close()
        ours.close()
