"""A QMP monitor: a listener whose clients each get their own session.

Any number of clients may be connected at once; each has its own
negotiation state. Every client has a writer task fed by an unbounded queue,
so a client that stops reading never blocks the dispatcher or other clients.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import trio

from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.protocol.session import Mode, QMPSession

_RECV_SIZE = 65536


async def _writer(
    stream: trio.abc.Stream,
    outgoing: trio.MemoryReceiveChannel[bytes],
    scope: trio.CancelScope,
) -> None:
    """Send queued messages, coalescing whatever is queued into one write.

    A client that went away ends the whole connection (``scope``) quietly:
    its failure must never reach the listener and stop other clients.
    """
    try:
        async for first in outgoing:
            chunks = [first]
            while True:
                try:
                    chunks.append(outgoing.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await stream.send_all(b"".join(chunks))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        outgoing.close()
        scope.cancel()


async def serve_qmp_client(
    stream: trio.abc.Stream, daemon: Daemon, dispatcher: Dispatcher, *, pretty: bool = False
) -> None:
    """Speak QMP with one connected client until it hangs up."""
    session = QMPSession(daemon.greeting(), pretty=pretty)
    send, recv = trio.open_memory_channel[bytes](math.inf)

    def queue(message: dict[str, Any]) -> None:
        # The writer closes its end when the client is gone; what is still
        # produced for it (events from other clients' commands) is dropped.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait(session.encode(message))

    def deliver(event: dict[str, Any]) -> None:
        if session.mode is Mode.COMMAND:
            queue(event)

    unsubscribe = daemon.subscribe(deliver)
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_writer, stream, recv, nursery.cancel_scope)
            send.send_nowait(session.greeting_bytes())
            while not daemon.quit_requested:
                try:
                    data = await stream.receive_some(_RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                for request in session.receive_data(bytes(data)):
                    reply = dispatcher.dispatch(session, request)
                    if reply is not None:
                        queue(reply)
                    if daemon.quit_requested:
                        break
            send.close()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
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
