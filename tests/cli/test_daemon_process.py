"""``qmpgraph daemon`` as a whole process: readiness, signals, daemonize, pidfile.

Each test starts the real entry point (``python -m qmpgraph daemon``), waits
for the pidfile (the documented readiness signal) and kills whatever it
started at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_qemu

from cli.helpers import QMPGRAPH, run_cli, wait_for_pidfile

TIMEOUT = 20


class Procs:
    """Processes a test started; all killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def start(
        self, argv: list[str], cmd: list[str] = QMPGRAPH, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd argv`` with stdout and stderr piped."""
        proc = subprocess.Popen(
            [*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    for proc in p.procs:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    for pid in p.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def monitor_args(tmp: Path, name: str = "qmp.sock") -> tuple[list[str], str]:
    path = str(tmp / name)
    return ["--chardev", f"socket,id=m,path={path},server=on,wait=off", "--monitor", "m"], path


def greeting(path: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            assert chunk
            data += chunk
    value: dict[str, object] = json.loads(data)
    return value


def wait_gone(path: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} still exists"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_cleanly(sig: signal.Signals, tmp_path: Path, procs: Procs) -> None:
    args, path = monitor_args(tmp_path)
    pidfile = tmp_path / "pid"
    proc = procs.start([*args, "--pidfile", str(pidfile)])
    pid = wait_for_pidfile(proc, pidfile)
    assert pid == proc.pid
    assert "QMP" in greeting(path)
    proc.send_signal(sig)
    assert proc.wait(TIMEOUT) == 0
    assert not os.path.exists(path)
    assert not pidfile.exists()


def test_qmp_quit_exits_zero_and_cleans_up(tmp_path: Path, procs: Procs) -> None:
    args, path = monitor_args(tmp_path)
    pidfile = tmp_path / "pid"
    proc = procs.start([*args, "--pidfile", str(pidfile)])
    wait_for_pidfile(proc, pidfile)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.endswith(b'{"return": {}}\r\n{"return": {}}\r\n')
    assert proc.wait(TIMEOUT) == 0
    assert not os.path.exists(path)
    assert not pidfile.exists()


def test_pidfile_lock_conflict(tmp_path: Path, procs: Procs) -> None:
    args, _ = monitor_args(tmp_path)
    pidfile = tmp_path / "pid"
    first = procs.start([*args, "--pidfile", str(pidfile)])
    wait_for_pidfile(first, pidfile)
    args2, path2 = monitor_args(tmp_path, "other.sock")
    done = run_cli([*args2, "--pidfile", str(pidfile)])
    assert done.returncode == 1
    assert done.stderr == (
        "qmpgraph: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    )
    # The loser leaves the winner's pidfile alone.
    assert pidfile.read_text() == f"{first.pid}\n"
    assert not os.path.exists(path2)


@pytest.mark.qemu
def test_pidfile_lock_conflict_with_qemu_matches_qemu(tmp_path: Path, procs: Procs) -> None:
    """qsd holds the pidfile; qsd and qmpgraph, started next, fail alike."""
    qsd = require_qemu()
    args, _ = monitor_args(tmp_path)
    pidfile = tmp_path / "pid"
    holder = procs.start([*args, "--pidfile", str(pidfile)], cmd=[qsd])
    wait_for_pidfile(holder, pidfile)
    results = []
    for cmd in ([qsd], QMPGRAPH):
        args2, _ = monitor_args(tmp_path, "x.sock")
        done = run_cli([*args2, "--pidfile", str(pidfile)], cmd)
        err = done.stderr.replace("qemu-storage-daemon:", "<prog>:").replace("qmpgraph:", "<prog>:")
        results.append((done.returncode, err))
    assert results[0] == results[1]


def test_daemonize_success(tmp_path: Path, procs: Procs) -> None:
    args, path = monitor_args(tmp_path)
    pidfile = tmp_path / "pid"
    proc = procs.start([*args, "--daemonize", "--pidfile", str(pidfile)])
    assert proc.wait(TIMEOUT) == 0
    # Start-up was complete when the parent exited: the pidfile is there.
    pid = int(pidfile.read_text())
    procs.pids.append(pid)
    assert pid != proc.pid
    assert "QMP" in greeting(path)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pidfile)
    wait_gone(Path(path))


def test_daemonize_failure_reports_status(tmp_path: Path) -> None:
    done = run_cli(["--daemonize", "--monitor", "c9"])
    assert done.returncode == 1
    assert done.stderr == 'qmpgraph: --monitor c9: chardev "c9" not found\n'


@pytest.mark.qemu
def test_daemonize_failure_matches_qemu(tmp_path: Path) -> None:
    qsd = require_qemu()
    argv = ["--daemonize", "--chardev", "socket,id=c0,path=/nonexistent/x,server=on,wait=off"]
    want = run_cli(argv, [qsd])
    got = run_cli(argv)
    assert got.returncode == want.returncode == 1
    assert got.stderr.replace("qmpgraph:", "qemu-storage-daemon:") == want.stderr


def test_no_arguments_default_socket(tmp_path: Path, procs: Procs) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = procs.start([], env=env)
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()
    hint = proc.stdout.readline().decode()
    path = str(tmp_path / "qmpgraph.sock")
    assert path in first
    assert hint == f"qmp-shell {path}\n"
    assert "QMP" in greeting(path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert not os.path.exists(path)


def test_existing_file_at_socket_path_is_replaced(tmp_path: Path, procs: Procs) -> None:
    args, path = monitor_args(tmp_path)
    Path(path).write_text("stale")
    pidfile = tmp_path / "pid"
    proc = procs.start([*args, "--pidfile", str(pidfile)])
    wait_for_pidfile(proc, pidfile)
    assert "QMP" in greeting(path)


def test_wait_on_blocks_start_up_until_a_client_connects(tmp_path: Path, procs: Procs) -> None:
    path = str(tmp_path / "w.sock")
    pidfile = tmp_path / "pid"
    argv = ["--chardev", f"socket,id=m,path={path},server=on,wait=on", "--monitor", "m"]
    proc = procs.start([*argv, "--pidfile", str(pidfile)])
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert line == (
        f"qmpgraph: --chardev socket,id=m,path={path},server=on,wait=on: "
        f"info: QEMU waiting for connection on: disconnected:unix:{path},server=on\n"
    )
    assert not pidfile.exists()
    assert "QMP" in greeting(path)
    wait_for_pidfile(proc, pidfile)


def test_server_off_connects_out(tmp_path: Path, procs: Procs) -> None:
    path = str(tmp_path / "out.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        procs.start(["--chardev", f"socket,id=m,path={path},server=off", "--monitor", "m"])
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(4096).startswith(b'{"QMP": ')


def test_tcp_chardev_on_loopback(tmp_path: Path, procs: Procs) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pidfile = tmp_path / "pid"
    chardev = f"socket,id=m,host=127.0.0.1,port={port},server=on,wait=off"
    proc = procs.start(["--chardev", chardev, "--monitor", "m", "--pidfile", str(pidfile)])
    wait_for_pidfile(proc, pidfile)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        assert s.recv(4096).startswith(b'{"QMP": ')


def test_help_names_qmpgraph_and_every_qsd_option(tmp_path: Path) -> None:
    done = run_cli(["--help"])
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: qmpgraph daemon [options]\n")
    for option in ("-h, --help", "-T, --trace", "-V, --version", "--blockdev", "--chardev",
                   "--daemonize", "--export", "--monitor", "--nbd-server", "--object",
                   "--pidfile"):  # fmt: skip
        assert f"  {option}" in done.stdout


def test_version() -> None:
    done = run_cli(["-V"])
    assert done.returncode == 0
    assert done.stdout.startswith("qmpgraph version ")
    assert "7.2.22" in done.stdout


def test_python_m_qmpgraph_without_subcommand() -> None:
    done = run_cli([], cmd=QMPGRAPH[:-1])
    assert done.returncode == 2
    assert "daemon" in done.stderr
