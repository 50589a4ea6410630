"""Run a whole daemon: open every monitor's listener, serve, and stop cleanly."""

from __future__ import annotations

import os
from functools import partial
from dataclasses import dataclass, field

import trio

from qmpgraph.daemon import Daemon
from qmpgraph.server.monitor import serve_monitor


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """One ``--monitor``: where it listens and how it prints."""

    path: str | None = None
    host: str | None = None
    port: int | None = None
    pretty: bool = False


@dataclass(slots=True)
class DaemonConfig:
    """Everything the command line configured, in the order it was given."""

    monitors: list[MonitorConfig] = field(default_factory=list)


async def _open_listeners(mon: MonitorConfig) -> list[trio.SocketListener]:
    if mon.path is not None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        if os.path.exists(mon.path):
            os.unlink(mon.path)
        await sock.bind(mon.path)
        sock.listen(128)
        return [trio.SocketListener(sock)]
    assert mon.port is not None
    return await trio.open_tcp_listeners(mon.port, host=mon.host or "127.0.0.1")


async def run_daemon(
    config: DaemonConfig,
    daemon: Daemon | None = None,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every configured monitor until ``quit``; ready once all listen."""
    daemon = daemon if daemon is not None else Daemon()
    paths = [m.path for m in config.monitors if m.path is not None]
    try:
        async with trio.open_nursery() as nursery:
            daemon.on_stop(nursery.cancel_scope.cancel)
            for mon in config.monitors:
                listeners = await _open_listeners(mon)
                await nursery.start(partial(serve_monitor, listeners, daemon, pretty=mon.pretty))
            task_status.started(daemon)
    finally:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
