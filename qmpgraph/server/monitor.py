"""A QMP monitor: a listener whose clients each get their own session.

Any number of clients may be connected at once; each has its own
negotiation state. Each client's outgoing messages go through its outbox:
replies are written by the client's own task right after the batch of
requests that produced them (no task switch on the hot path), and events
raised by other clients' commands are written by the client's writer task,
so a client that stops reading never blocks the dispatcher or other clients.
"""

from __future__ import annotations

from typing import Any

import trio

from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.protocol.session import Mode, QMPSession

_RECV_SIZE = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Outbox:
    """One client's pending output, written in order by one flusher at a time.

    Rules: only ``flush`` takes chunks out, and only while it holds ``busy``;
    a flush that finds another one running returns at once, because the
    running one loops until the outbox is empty. So bytes go out in the order
    they were put, whoever writes them.
    """

    def __init__(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        self._stream = stream
        self._scope = scope
        self._chunks: list[bytes] = []
        self._busy = False
        self._wakeup = trio.Event()
        self.closing = False
        self.gone = False

    def put(self, data: bytes, *, wake_writer: bool = True) -> None:
        """Queue ``data``; the writer task sends it unless the caller flushes."""
        if self.gone:
            return  # the client went away; events still produced for it are dropped
        self._chunks.append(data)
        if wake_writer:
            self._wakeup.set()

    async def flush(self) -> None:
        """Send everything queued (returns at once if another flush is running)."""
        if self._busy or self.gone:
            return
        self._busy = True
        try:
            while self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                await self._stream.send_all(data)
        except _GONE:
            # The client went away: end its whole connection quietly; this
            # must never reach the listener and stop other clients.
            self.gone = True
            self._chunks.clear()
            self._scope.cancel()
        finally:
            self._busy = False

    def close(self) -> None:
        """Let the writer task finish once everything queued is sent."""
        self.closing = True
        self._wakeup.set()

    async def writer(self) -> None:
        """The writer task: sends what others queued (events) until closed."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.flush()
            if self.closing and not self._chunks:
                return


async def serve_qmp_client(
    stream: trio.abc.Stream, daemon: Daemon, dispatcher: Dispatcher, *, pretty: bool = False
) -> None:
    """Speak QMP with one connected client until it hangs up."""
    session = QMPSession(daemon.greeting(), pretty=pretty)
    outbox: _Outbox | None = None

    def deliver(event: dict[str, Any]) -> None:
        if session.mode is Mode.COMMAND and outbox is not None:
            outbox.put(session.encode(event))

    unsubscribe = daemon.subscribe(deliver)
    try:
        async with stream, trio.open_nursery() as nursery:
            outbox = _Outbox(stream, nursery.cancel_scope)
            nursery.start_soon(outbox.writer)
            outbox.put(session.greeting_bytes(), wake_writer=False)
            await outbox.flush()
            while not daemon.quit_requested and not outbox.gone:
                try:
                    data = await stream.receive_some(_RECV_SIZE)
                except _GONE:
                    break
                if not data:
                    break
                for request in session.receive_data(bytes(data)):
                    reply = dispatcher.dispatch(session, request)
                    await daemon.before_reply()
                    if reply is not None:
                        outbox.put(session.encode(reply), wake_writer=False)
                    await daemon.after_reply()
                    if daemon.quit_requested:
                        break
                await outbox.flush()
            outbox.close()
    except _GONE:
        pass
    finally:
        unsubscribe()
    if daemon.quit_requested:
        # The quit reply has been written (the writer drained before the
        # nursery closed); only now may the daemon go away.
        daemon.stop()


async def serve_monitor(
    listeners: list[trio.SocketListener],
    daemon: Daemon,
    *,
    pretty: bool = False,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept QMP clients on ``listeners`` forever; ready once listening."""
    dispatcher = Dispatcher(daemon)

    async def handler(stream: trio.SocketStream) -> None:
        await serve_qmp_client(stream, daemon, dispatcher, pretty=pretty)

    await trio.serve_listeners(handler, listeners, task_status=task_status)
