"""Run a whole daemon: serve every monitor, stop cleanly on quit or a signal.

``serve_prepared`` serves monitors whose sockets start-up already created
(``qmpgraph.server.startup``), and the NBD server it started; ``run_daemon``
is the in-process convenience for tests and embedders: it binds
``MonitorConfig`` addresses itself.
SIGINT, SIGTERM and SIGHUP stop the daemon as QMP ``quit`` does.

What does not live here: option parsing (``qmpgraph.cmdline``), the pidfile
and daemonizing (``qmpgraph.server.startup``).
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.server.monitor import serve_monitor, serve_qmp_client
from qmpgraph.server.nbd import serve_bound_server
from qmpgraph.server.startup import PreparedMonitor, bind_unix, remove_socket

__all__ = ["DaemonConfig", "MonitorConfig", "run_daemon", "serve_prepared"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """One monitor for ``run_daemon``: a Unix ``path`` or a TCP ``host``/``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None
    pretty: bool = False


@dataclass(slots=True)
class DaemonConfig:
    """The monitors ``run_daemon`` opens, in order."""

    monitors: list[MonitorConfig] = field(default_factory=list)


async def _stop_on_signals(daemon: Daemon, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for _ in signals:
            daemon.stop()


async def _serve_connection(
    sock: socket.socket, daemon: Daemon, dispatcher: Dispatcher, pretty: bool
) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await serve_qmp_client(stream, daemon, dispatcher, pretty=pretty)


async def serve_prepared(
    monitors: list[PreparedMonitor],
    daemon: Daemon,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``monitors`` until the daemon stops; ready once all listen."""
    async with trio.open_nursery() as nursery:
        daemon.on_stop(nursery.cancel_scope.cancel)
        if handle_signals:
            await nursery.start(_stop_on_signals, daemon)
        # An NBD server bound at start-up (--nbd-server) is served from now on.
        serve_bound_server(daemon)
        dispatcher = Dispatcher(daemon)
        for mon in monitors:
            for conn in mon.connections:
                nursery.start_soon(_serve_connection, conn, daemon, dispatcher, mon.pretty)
            if mon.listener is not None:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(mon.listener))
                await nursery.start(partial(serve_monitor, [listener], daemon, pretty=mon.pretty))
        task_status.started(daemon)


def _prepare(mon: MonitorConfig) -> tuple[PreparedMonitor, tuple[str, int] | None]:
    if mon.path is not None:
        sock, created = bind_unix(mon.path)
        return PreparedMonitor(sock, [], mon.pretty, mon.path), created
    sock = socket.create_server((mon.host or "127.0.0.1", mon.port or 0))
    return PreparedMonitor(sock, [], mon.pretty, f"{mon.host}:{mon.port}"), None


async def run_daemon(
    config: DaemonConfig,
    daemon: Daemon | None = None,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every configured monitor until ``quit``; ready once all listen."""
    daemon = daemon if daemon is not None else Daemon()
    prepared = [_prepare(m) for m in config.monitors]
    try:
        await serve_prepared([p for p, _ in prepared], daemon, task_status=task_status)
    finally:
        for mon, created in prepared:
            if mon.listener is not None:
                mon.listener.close()
            remove_socket(created)
