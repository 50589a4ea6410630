"""The trio server over real sockets, driven by QEMU's own client library.

The server runs in the test's trio loop; ``qemu.qmp`` (asyncio) runs in a
worker thread with its own bounded event loop, and ``qmp-shell`` runs as a
subprocess fed on stdin. Raw-socket tests cover what a well-behaved library
never does: stop reading, hang up mid-message.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from qmpgraph.daemon import Daemon
from qmpgraph.server.run import DaemonConfig, MonitorConfig, run_daemon

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")


@pytest.fixture
async def sock_path(tmp_path: Path) -> AsyncIterator[str]:
    """A short Unix socket path under pytest's tmp_path."""
    yield str(tmp_path / "qmp.sock")


async def start(nursery: trio.Nursery, *monitors: MonitorConfig) -> Daemon:
    """A daemon serving ``monitors`` in ``nursery``; returns once all listen."""
    daemon: Daemon = await nursery.start(run_daemon, DaemonConfig(list(monitors)))
    return daemon


async def in_asyncio(fn: Callable[[], Awaitable[Any]], bound: float = 10) -> Any:
    """Run an asyncio coroutine function in a worker thread, bounded."""

    def runner() -> Any:
        return asyncio.run(asyncio.wait_for(fn(), bound))

    return await trio.to_thread.run_sync(runner)


async def raw_connect(path: str) -> trio.SocketStream:
    """A raw client that has read the greeting."""
    stream = await trio.open_unix_socket(path)
    await read_line(stream)
    return stream


async def read_line(stream: trio.SocketStream, buf: bytearray | None = None) -> dict[str, Any]:
    """One CRLF-terminated message (``buf`` carries bytes between calls)."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n" not in buf:
        data = await stream.receive_some(4096)
        assert data, "server closed the connection"
        buf += data
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    value: dict[str, Any] = json.loads(line)
    return value


async def test_qemu_qmp_client_connects_and_executes(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))

            async def work() -> Any:
                from qemu.qmp import QMPClient

                client = QMPClient("test")
                await client.connect(sock_path)
                try:
                    return await client.execute("query-version")
                finally:
                    await client.disconnect()

            version = await in_asyncio(work)
            assert version["qemu"] == {"major": 7, "minor": 2, "micro": 22}
            nursery.cancel_scope.cancel()


async def test_events_reach_negotiated_clients_only(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            daemon = await start(nursery, MonitorConfig(path=sock_path))
            negotiating = await raw_connect(sock_path)
            ready = await raw_connect(sock_path)
            await ready.send_all(b'{"execute": "qmp_capabilities"}\n')
            assert await read_line(ready) == {"return": {}}
            daemon.emit_event("TEST_EVENT", {"n": 1})
            event = await read_line(ready)
            assert event["event"] == "TEST_EVENT" and event["data"] == {"n": 1}
            # The negotiating client got nothing: its next message is the
            # reply to what it sends now.
            await negotiating.send_all(b'{"execute": "qmp_capabilities", "id": 7}\n')
            assert await read_line(negotiating) == {"return": {}, "id": 7}
            nursery.cancel_scope.cancel()


async def test_qemu_qmp_client_receives_events(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            daemon = await start(nursery, MonitorConfig(path=sock_path))
            connected = trio.Event()
            token = trio.lowlevel.current_trio_token()

            async def work() -> Any:
                from qemu.qmp import QMPClient

                client = QMPClient("events")
                with client.listener() as listener:
                    await client.connect(sock_path)
                    trio.from_thread.run_sync(connected.set, trio_token=token)
                    event = await listener.get()
                await client.disconnect()
                return event

            async def emit_when_connected() -> None:
                await connected.wait()
                daemon.emit_event("TEST_EVENT", {"x": "y"})

            nursery.start_soon(emit_when_connected)
            event = await in_asyncio(work)
            assert event["event"] == "TEST_EVENT"
            assert event["data"] == {"x": "y"}
            nursery.cancel_scope.cancel()


async def test_concurrent_clients_have_their_own_sessions(sock_path: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))

            async def work() -> list[Any]:
                from qemu.qmp import QMPClient

                async def one(i: int) -> Any:
                    client = QMPClient(f"c{i}")
                    await client.connect(sock_path)
                    try:
                        for _ in range(5):
                            await client.execute("query-version")
                        return i
                    finally:
                        await client.disconnect()

                return list(await asyncio.gather(*(one(i) for i in range(20))))

            assert await in_asyncio(work, 15) == list(range(20))
            nursery.cancel_scope.cancel()


async def test_client_that_never_reads_does_not_block_others(sock_path: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))
            slow = await raw_connect(sock_path)
            await slow.send_all(b'{"execute": "qmp_capabilities"}\n')
            # Far more replies than any socket buffer holds, never read.
            request = b'{"execute": "query-version"}\n' * 20000
            with trio.move_on_after(2):
                await slow.send_all(request)
            fast = await raw_connect(sock_path)
            buf = bytearray()
            await fast.send_all(b'{"execute": "qmp_capabilities"}\n')
            assert await read_line(fast, buf) == {"return": {}}
            for i in range(50):
                await fast.send_all(b'{"execute": "query-version", "id": %d}\n' % i)
                assert (await read_line(fast, buf))["id"] == i
            await slow.aclose()
            await fast.aclose()
            nursery.cancel_scope.cancel()


async def test_clients_hanging_up_mid_message_leave_the_server_serving(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))
            for partial in (b"", b'{"execute": "qmp_capa', b'{"execute": "qmp_capabilities"}\n'):
                s = await trio.open_unix_socket(sock_path)
                await s.send_all(partial)
                await s.aclose()
            # Reset by peer while replies are in flight.
            s = await raw_connect(sock_path)
            await s.send_all(
                b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-version"}\n' * 500
            )
            s.socket.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
            )
            await s.aclose()
            ok = await raw_connect(sock_path)
            await ok.send_all(b'{"execute": "qmp_capabilities"}\n')
            assert await read_line(ok) == {"return": {}}
            await ok.aclose()
            nursery.cancel_scope.cancel()


async def test_quit_reply_is_flushed_then_daemon_stops(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))
            s = await raw_connect(sock_path)
            buf = bytearray()
            await s.send_all(b'{"execute": "qmp_capabilities"}\n{"execute": "quit", "id": 1}\n')
            assert await read_line(s, buf) == {"return": {}}
            assert await read_line(s, buf) == {"return": {}, "id": 1}
            assert await s.receive_some(100) == b""
        # run_daemon returned by itself and removed its socket.
        assert not Path(sock_path).exists()  # noqa: ASYNC240 (test teardown check)


async def test_tcp_monitor_on_loopback() -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            await start(nursery, MonitorConfig(host="127.0.0.1", port=port))
            s = await trio.open_tcp_stream("127.0.0.1", port)
            greeting = await read_line(s)
            assert "QMP" in greeting
            await s.aclose()
            nursery.cancel_scope.cancel()


async def test_pretty_monitor(sock_path: str) -> None:
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path, pretty=True))
            s = await trio.open_unix_socket(sock_path)
            data = b""
            while not data.endswith(b"}\r\n"):
                data += await s.receive_some(4096)
            assert data.startswith(b'{\r\n    "QMP": {')
            await s.aclose()
            nursery.cancel_scope.cancel()


async def test_qmp_shell_non_interactive(sock_path: str) -> None:
    if not QMP_SHELL.exists():
        pytest.skip(f"{QMP_SHELL} not installed")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await start(nursery, MonitorConfig(path=sock_path))
            done = await trio.run_process(
                [str(QMP_SHELL), sock_path],
                stdin=b"query-version\nquery-bogus\n",
                capture_stdout=True,
                capture_stderr=True,
            )
            out = done.stdout.decode()
            assert '"package": "qmpgraph' in out
            assert "CommandNotFound" in out
            nursery.cancel_scope.cancel()


def test_qmp_shell_against_subprocess_daemon(tmp_path: Path) -> None:
    """``qmp-shell`` against ``python -m qmpgraph daemon`` (a whole process)."""
    if not QMP_SHELL.exists():
        pytest.skip(f"{QMP_SHELL} not installed")
    path = str(tmp_path / "m.sock")
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpgraph", "daemon", "--chardev",
         f"socket,id=m,path={path},server=on,wait=off", "--monitor", "m",
         "--pidfile", str(pidfile)],
    )  # fmt: skip
    try:
        from cli.helpers import wait_for_pidfile

        wait_for_pidfile(proc, pidfile)
        done = subprocess.run(
            [str(QMP_SHELL), path],
            input=b"query-version\nquit\n",
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert b'"micro": 22' in done.stdout
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
        assert not pidfile.exists()
    finally:
        proc.kill()
        proc.wait()
