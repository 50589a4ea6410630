"""The NBD server's tasks: accept clients, move bytes, execute requests.

``start_runtime`` is called by nbd-server-start after its transaction
committed.  Commands run synchronously inside trio (the monitor dispatches
them in its client task), so the runtime starts its listener as a trio
*system task*: it needs no nursery handed down from the daemon, and it is
cancelled when the daemon stops or the server is stopped.  Outside trio
(library tests that dispatch commands directly, and qsd's ``--nbd-server``
at start-up) nothing is served until ``serve_bound_server`` is called.

Each client is one task driving a ``qmpgraph.nbd.server.ServerConnection``;
each of its requests runs in a task of its own through ``qmpgraph.io.BackendIO``
on the export's BlockBackend, up to ``MAX_IN_FLIGHT`` at once as in QEMU (the
client task stops receiving while they are all busy).  Replies may therefore
go out of request order, as QEMU's do, but each goes out whole: a reply's
buffers are sent under the connection's send lock.

A client that hangs up, or that the server hangs up (a failed send, a
deleted export: QEMU's client_close), reads no more requests, but those in
flight run to their end, as QEMU's coroutines do; until then the client
still holds its export, so an export deleted in mode hard stays "shutting
down" and is deleted (``finish_shutdown``) when its last client has gone.

What does not live here: the protocol rules (``qmpgraph.nbd``), the export
table and QMP commands (``qmpgraph.commands.exports``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from qmpgraph.commands.bitmaps import bitmap_extents
from qmpgraph.commands.exports import export_table, finish_shutdown
from qmpgraph.io import prefetch
from qmpgraph.io.backend import BackendIO
from qmpgraph.io.depth import status_above
from qmpgraph.io.request import ALLOCATED, DATA, ZERO, BlockIOError
from qmpgraph.nbd import constants as c
from qmpgraph.nbd import wire
from qmpgraph.nbd.server import Closed, ExtentArray, Ready, Request, ServerConnection

if TYPE_CHECKING:
    from qmpgraph.commands.exports import ExportTable, NBDExport, NBDServer
    from qmpgraph.daemon import Daemon

_RECV_SIZE = 1 << 20
# Received bytes are parsed this much at a time: at most 2,340 requests
# (28 bytes each) are parsed ahead of a free slot.
_FEED_SIZE = 1 << 16
_IOV_MAX = 1024
# QEMU's MAX_NBD_REQUESTS: requests of one client executing at once.  Each
# holds at most one request's buffers (NBD_MAX_BUFFER_SIZE), which bounds
# what a client can make the server hold.
MAX_IN_FLIGHT = 16
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(eq=False)
class _Client:
    scope: trio.CancelScope
    seq: int  # connections accepted before it, plus one
    export: NBDExport | None = None
    stream: trio.SocketStream | None = None
    # Hung up by the server (QEMU's client_close): no request is read any
    # more, but those in flight run to their end (their replies are lost).
    closing: bool = False
    session: _Session | None = None  # once negotiation started


def _left(client: _Client) -> bool:
    """Whether ``client``, idle and not hung up, has only its NBD_CMD_DISC or
    its end of stream left unread (see ``Runtime.has_clients``)."""
    stream, session = client.stream, client.session
    if client.closing or stream is None or session is None:
        return False
    if session.slots.value != MAX_IN_FLIGHT:  # requests in flight hold the export
        return False
    try:
        # A duplicate of the descriptor: the trio socket's own calls are async.
        raw = stream.socket
        with socket.fromfd(raw.fileno(), raw.family, raw.type) as sock:
            head = sock.recv(_DISC_SIZE + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return head == b"" or _is_disc(head)


_DISC_SIZE = 28  # an NBD request header: magic, flags, type, cookie, offset, length


def _is_disc(head: bytes) -> bool:
    """Whether ``head`` is exactly one NBD_CMD_DISC request."""
    return (
        len(head) == _DISC_SIZE
        and int.from_bytes(head[0:4], "big") == c.REQUEST_MAGIC
        and int.from_bytes(head[6:8], "big") == c.CMD_DISC
    )


@dataclass(eq=False)
class Runtime:
    """The serving side of one NBD server (implements ``NBDRuntime``)."""

    daemon: Daemon
    table: ExportTable
    server: NBDServer
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    clients: set[_Client] = field(default_factory=set)
    accepted: int = 0
    _slot_freed: trio.Event = field(default_factory=trio.Event)

    def has_clients(self, export: NBDExport) -> bool:
        """Whether a client negotiated ``export`` and is still connected.

        A client whose last bytes (its NBD_CMD_DISC, or the end of its
        stream) wait unread in the socket has gone already: QEMU reads an
        NBD socket as soon as it is readable, before a QMP command that came
        after those bytes gets its turn, so e.g. block-export-del sent once a
        backup tool exited finds the export free.  Here the monitor's task
        may run first, so the socket is looked at.
        """
        return any(cl.export is export and not _left(cl) for cl in self.clients)

    def newest_client(self, export: NBDExport) -> int:
        """The ``seq`` of the newest client using ``export`` (0: none)."""
        return max((cl.seq for cl in self.clients if cl.export is export), default=0)

    def disconnect(self, export: NBDExport) -> None:
        """Hang up the clients of ``export``: their connections are shut down
        at once; each client goes when its requests in flight have ended."""
        for cl in list(self.clients):
            if cl.export is export:
                cl.closing = True
                if cl.stream is None:
                    cl.scope.cancel()
                    continue
                with contextlib.suppress(OSError):
                    cl.stream.socket.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop accepting and hang up everyone; the socket may be closed next."""
        self.scope.cancel()
        with contextlib.suppress(Exception):
            trio.lowlevel.notify_closing(self.server.sock)

    async def serve(self) -> None:
        """Accept clients until stopped; at max-connections, accepting waits."""
        with self.scope:
            sock = trio.socket.from_stdlib_socket(self.server.sock)
            limit = self.server.max_connections
            async with trio.open_nursery() as nursery:
                while True:
                    while limit > 0 and len(self.clients) >= limit:
                        self._slot_freed = trio.Event()
                        await self._slot_freed.wait()
                    try:
                        conn, _ = await sock.accept()
                    except OSError:
                        return
                    self.accepted += 1
                    client = _Client(trio.CancelScope(), self.accepted)
                    self.clients.add(client)
                    nursery.start_soon(self._client_task, trio.SocketStream(conn), client)

    async def _client_task(self, stream: trio.SocketStream, client: _Client) -> None:
        try:
            with client.scope:
                async with stream:
                    client.stream = stream
                    await self._speak(stream, client)
        except _GONE:
            pass
        except Exception as exc:  # a client's failure must never stop the server
            print(f"qmpgraph: NBD client failed: {exc!r}", file=sys.stderr)
        finally:
            self.clients.discard(client)
            self._slot_freed.set()
            self._release_shut_down()

    def _release_shut_down(self) -> None:
        """Delete the exports shutting down that no client uses any more."""
        for exp in [e for e in self.table.exports if e.shutting_down]:
            if not self.has_clients(exp):
                try:
                    finish_shutdown(self.daemon, exp)
                except Exception as exc:  # never let it stop the server
                    print(f"qmpgraph: deleting export {exp.id} failed: {exc!r}", file=sys.stderr)

    async def _speak(self, stream: trio.SocketStream, client: _Client) -> None:
        session = _Session(ServerConnection(self.table), client, _Sender(stream.socket))
        client.session = session
        await session.sender.send([session.conn.data_to_send()])
        async with trio.open_nursery() as nursery:
            try:
                ended = await self._receive(stream, session, nursery)
            except _GONE:
                ended = False
            if not ended:
                # The client went away (or was hung up): its requests in
                # flight still run to their end, as QEMU's coroutines do, and
                # hold the export until then; their replies go nowhere.
                session.leave()
                return
        client.export = None
        # Every request read before the end was answered (the nursery waited
        # for them); what the end itself queued (an error reply) goes last.
        await session.sender.send([session.conn.data_to_send()])

    async def _receive(
        self, stream: trio.SocketStream, session: _Session, nursery: trio.Nursery
    ) -> bool:
        """Receive until the protocol ends (True) or the client hangs up (False)."""
        while True:
            data = await stream.receive_some(_RECV_SIZE)
            if not data:
                return False
            if not await session.dispatch(self.table, data, nursery):
                return True


class _Sender:
    """Sends whole replies on one socket, one at a time (never interleaved).

    A reply is a list of buffers sent with ``sendmsg`` as they are: a read's
    data is never copied into a joined string.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.lock = trio.Lock()

    async def send(self, buffers: list[bytes]) -> None:
        """Send ``buffers`` in order, after any reply already being sent."""
        views = [memoryview(b) for b in buffers if b]
        if not views:
            return
        async with self.lock:
            while views:
                try:
                    sent = await self.sock.sendmsg(views[:_IOV_MAX])
                except OSError as err:  # the client went away
                    raise trio.BrokenResourceError from err
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0


@dataclass(eq=False)
class _Session:
    """One client in transmission: its protocol state, its sender, its slots."""

    conn: ServerConnection
    client: _Client
    sender: _Sender
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))

    async def dispatch(self, table: ExportTable, data: bytes, nursery: trio.Nursery) -> bool:
        """Feed received bytes to the connection, start a task per request; False at the end.

        The bytes go in pieces, so no more requests are parsed ahead than one
        piece holds; a request waits for a free slot before its task starts,
        and while it waits nothing more is received: a client never has more
        than ``MAX_IN_FLIGHT`` requests held here.
        """
        conn = self.conn
        view = memoryview(data)
        for start in range(0, len(view), _FEED_SIZE):
            events = conn.receive_data(view[start : start + _FEED_SIZE])
            # The client holds its export before it hears NBD_OPT_GO's answer:
            # a block-export-del it makes run next must see it in use.
            for ev in events:
                if isinstance(ev, Ready):
                    self.client.export = table.find(ev.export.name)
            # Negotiation replies and validation errors first: a request's
            # reply must never overtake the NBD_OPT_GO answer before it.
            await self.sender.send([conn.data_to_send()])
            for ev in events:
                if self.client.closing:  # hung up: what was read stays unserved
                    raise trio.ClosedResourceError
                if isinstance(ev, Request):
                    assert self.client.export is not None
                    await self.slots.acquire()
                    nursery.start_soon(self._serve, self.client.export, ev)
                elif isinstance(ev, Closed):
                    if ev.reason:
                        print(f"qmpgraph: Disconnect client, due to: {ev.reason}", file=sys.stderr)
                    self.leave()
                    return False
        return True

    def leave(self) -> None:
        """The client is ending: unless requests are still running, it no longer
        uses its export (no checkpoint since its last bytes arrived, so a QMP
        command handled after them, e.g. block-export-del, already sees it gone)."""
        if self.slots.value == MAX_IN_FLIGHT:
            self.client.export = None

    async def _serve(self, export: NBDExport, req: Request) -> None:
        """Execute one request and send its reply; its slot is free again after."""
        try:
            try:
                reply = await execute(self.conn, export, req)
            except _HangUp as hang:
                await self.sender.send(hang.chunks)
                print(f"qmpgraph: Disconnect client, due to: {hang.reason}", file=sys.stderr)
                self.hang_up()
                return
            await self.sender.send(reply)
        except _GONE:
            self.hang_up()
        finally:
            self.slots.release()

    def hang_up(self) -> None:
        """QEMU's client_close: read no more requests; those in flight go on."""
        self.client.closing = True
        with contextlib.suppress(OSError):
            self.sender.sock.shutdown(socket.SHUT_RDWR)


def start_runtime(daemon: Daemon, table: ExportTable, server: NBDServer) -> Runtime | None:
    """Serve ``server`` in a trio system task; None when not running inside trio."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None
    runtime = Runtime(daemon, table, server)
    trio.lowlevel.spawn_system_task(runtime.serve, name="nbd-server")
    daemon.on_stop(runtime.stop)
    return runtime


def serve_bound_server(daemon: Daemon) -> None:
    """Serve the NBD server that nbd-server-start bound before the trio loop
    ran (qsd's ``--nbd-server``); call inside trio, once the loop runs."""
    server = export_table(daemon).server
    if server is not None and server.runtime is None:
        server.runtime = start_runtime(daemon, export_table(daemon), server)


# -- executing requests ------------------------------------------------------------


async def execute(conn: ServerConnection, export: NBDExport, req: Request) -> list[bytes]:
    """Run one validated request on ``export``; the reply buffers (QEMU's answers)."""
    io = BackendIO(export.backend)
    cookie = req.cookie
    try:
        if req.type == c.CMD_READ:
            return await _read(conn, io, req)
        if req.type == c.CMD_WRITE:
            message = "writing to file failed"
            await io.write(req.offset, req.data, fua=bool(req.flags & c.CMD_FLAG_FUA))
        elif req.type == c.CMD_WRITE_ZEROES:
            message = "writing to file failed"
            await io.write_zeroes(
                req.offset,
                req.length,
                may_unmap=not req.flags & c.CMD_FLAG_NO_HOLE,
                fua=bool(req.flags & c.CMD_FLAG_FUA),
                no_fallback=bool(req.flags & c.CMD_FLAG_FAST_ZERO),
            )
        elif req.type == c.CMD_FLUSH:
            message = "flush failed"
            await io.flush()
        elif req.type == c.CMD_TRIM:
            message = "discard failed"
            await io.discard(req.offset, req.length)
            if req.flags & c.CMD_FLAG_FUA:
                await io.flush()
        elif req.type == c.CMD_CACHE:
            message = "caching data failed"
            await prefetch.cache(io, req.offset, req.length)
        else:
            return await _block_status(conn, io, req, export)
    except BlockIOError as err:
        return [conn.reply_error(cookie, c.nbd_errno(err.errno), message)]
    return [conn.reply_ok(cookie)]


class _HangUp(Exception):
    """A reply that failed part-way: send ``chunks``, then drop the client.

    QEMU sends a structured read's chunks as it goes; when a read fails after
    that, the reply cannot be completed, so nbd_trip disconnects ("Failed to
    send reply: ...") instead of answering with an error.
    """

    def __init__(self, chunks: list[bytes], reason: str) -> None:
        super().__init__(reason)
        self.chunks = chunks
        self.reason = reason


async def _read(conn: ServerConnection, io: BackendIO, req: Request) -> list[bytes]:
    if req.flags & c.CMD_FLAG_FUA:
        try:
            await io.flush()
        except BlockIOError as err:
            return [conn.reply_error(req.cookie, c.nbd_errno(err.errno), "flush failed")]
    if conn.structured and not req.flags & c.CMD_FLAG_DF and req.length:
        return await _sparse_read(conn, io, req)
    try:
        pieces: list[bytes | int] = [await io.read(req.offset, req.length)] if req.length else []
    except BlockIOError as err:
        return [conn.reply_error(req.cookie, c.nbd_errno(err.errno), "reading from file failed")]
    return conn.reply_read(req.cookie, req.offset, pieces)


async def _sparse_read(conn: ServerConnection, io: BackendIO, req: Request) -> list[bytes]:
    """QEMU's sparse read: zero ranges go out as holes, not data."""
    pieces: list[bytes | int] = []
    pos, end = req.offset, req.offset + req.length
    while pos < end:
        try:
            flags, pnum = await io.block_status(pos, end - pos)
        except BlockIOError as err:
            # The chunks so far, then an error chunk ends the reply.
            text = f"unable to check for holes: {os.strerror(err.errno)}"
            out = conn.reply_read(req.cookie, req.offset, pieces, done=False)
            out.append(conn.reply_error(req.cookie, c.nbd_errno(err.errno), text))
            return out
        if flags & ZERO:
            pieces.append(pnum)
        else:
            try:
                pieces.append(await io.read(pos, pnum))
            except BlockIOError as err:
                reason = f"reading from file failed: {os.strerror(err.errno)}"
                chunks = conn.reply_read(req.cookie, req.offset, pieces, done=False)
                raise _HangUp(chunks, f"Failed to send reply: {reason}") from err
        pos += pnum
    return conn.reply_read(req.cookie, req.offset, pieces)


async def _block_status(
    conn: ServerConnection, io: BackendIO, req: Request, export: NBDExport
) -> list[bytes]:
    contexts = conn.meta_contexts()
    max_count = 1 if req.flags & c.CMD_FLAG_REQ_ONE else c.MAX_BLOCK_STATUS_EXTENTS
    out: list[bytes] = []
    for i, ctx_id in enumerate(contexts):
        extents = ExtentArray(max_count)
        pos, end = req.offset, req.offset + req.length
        if ctx_id >= c.META_ID_DIRTY_BITMAP:  # qemu:dirty-bitmap:NAME
            bitmap = export.bitmaps[ctx_id - c.META_ID_DIRTY_BITMAP]
            bitmap_extents(bitmap, pos, req.length, extents.add)
            pos = end
        try:
            while pos < end:
                # The chain walked as QEMU does: filters count as layers, raw stops it.
                flags, pnum, depth = await status_above(io.node, pos, end - pos)
                if ctx_id == c.META_ID_BASE_ALLOCATION:
                    state = (0 if flags & DATA else c.STATE_HOLE) | (
                        c.STATE_ZERO if flags & ZERO else 0
                    )
                else:
                    state = depth if flags & ALLOCATED else 0
                if not extents.add(pnum, state):
                    break
                pos += pnum
        except BlockIOError as err:
            out.append(
                conn.reply_error(req.cookie, c.nbd_errno(err.errno), "can't get block status")
            )
            return out
        final = i == len(contexts) - 1
        out.append(wire.block_status_chunk(req.cookie, ctx_id, extents.extents, final=final))
    return out
