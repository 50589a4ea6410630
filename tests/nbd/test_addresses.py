"""NBD server address types fd and vsock, live against qemu-storage-daemon.

Both daemons are started with the same ``--nbd-server`` option and the same
inherited descriptors (subprocess ``pass_fds``); what QEMU does decides:
an inherited listening (or merely bound) Unix socket serves the export,
bad descriptors end the daemon with QEMU's message, and a vsock listener
either starts or fails the same way on this machine (with or without vsock).
Every process is time-bounded and killed at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from conftest import require_qemu

pytestmark = pytest.mark.qemu

TIMEOUT = 30


def _command(kind: str, qsd: str) -> list[str]:
    return [qsd] if kind == "qsd" else [sys.executable, "-m", "qmpgraph", "daemon"]


class _Daemon:
    """A daemon with a QMP socket; ``outcome`` is ("running", "") once the
    monitor greets, or ("exited", stderr) if it ended first."""

    def __init__(self, kind: str, qsd: str, work: Path, args: list[str], fds: list[int]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        qmp = work / "q.sock"
        monitor = ["--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "m"]
        self.proc = subprocess.Popen(
            # The monitor comes last: qsd's monitor I/O thread greets a client
            # as soon as its socket exists, even while a later option is about
            # to end the daemon, so a monitor created first could greet first.
            _command(kind, qsd) + args + monitor,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=fds,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                err = self.proc.stderr.read().decode()
                prog = "qemu-storage-daemon" if kind == "qsd" else "qmpgraph"
                self.outcome = ("exited", err.replace(prog, "<prog>", 1))
                return
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(TIMEOUT)
                    sock.connect(str(qmp))
                    if sock.recv(4096):
                        self.outcome = ("running", "")
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{kind} neither greeted nor exited")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _unix(path: Path, *, bind: bool, listen: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if bind:
        sock.bind(str(path))
    if listen:
        sock.listen(5)
    return sock


def _nbd_size(path: Path) -> str:
    out = subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///n?socket={path}"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def qsd() -> Iterator[str]:
    yield require_qemu()


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
def test_inherited_unix_socket_serves(qsd: str, tmp_path: Path, listening: bool) -> None:
    sizes = {}
    for kind in ("qsd", "qmpgraph"):
        path = tmp_path / f"{kind}.sock"
        sock = _unix(path, bind=True, listen=listening)
        fd = sock.fileno()
        args = [
            "--blockdev", "driver=null-co,node-name=n,size=1048576",
            "--nbd-server", f"addr.type=fd,addr.str={fd}",
            "--export", "type=nbd,id=e,node-name=n",
        ]  # fmt: skip
        daemon = _Daemon(kind, qsd, tmp_path / kind, args, [fd])
        sock.close()  # the daemon holds the only listening descriptor now
        try:
            assert daemon.outcome == ("running", ""), (kind, daemon.outcome)
            sizes[kind] = _nbd_size(path)
        finally:
            daemon.stop()
    assert sizes["qsd"] == "1048576"
    assert sizes["qmpgraph"] == sizes["qsd"]


def _bad_fd(case: str, work: Path) -> list[socket.socket | IO[str]]:
    """What the descriptor passed is (first) and what else must be closed."""
    work.mkdir(parents=True, exist_ok=True)
    if case == "unbound":
        return [_unix(work / "u.sock", bind=False, listen=False)]
    if case == "file":
        return [(work / "plain").open("w")]
    if case == "udp":
        return [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
    return list(socket.socketpair())  # a connected stream socket


@pytest.mark.parametrize("case", ["unbound", "file", "udp", "connected"])
def test_bad_inherited_fd_ends_daemon(qsd: str, tmp_path: Path, case: str) -> None:
    outcomes = {}
    for kind in ("qsd", "qmpgraph"):
        objs = _bad_fd(case, tmp_path / kind)
        fd = objs[0].fileno()
        args = ["--nbd-server", f"addr.type=fd,addr.str={fd}"]
        try:
            daemon = _Daemon(kind, qsd, tmp_path / kind, args, [fd])
        finally:
            for obj in objs:
                obj.close()
        daemon.stop()
        outcomes[kind] = (daemon.outcome, daemon.proc.returncode)
    assert outcomes["qsd"][0][0] == "exited"
    assert outcomes["qmpgraph"] == outcomes["qsd"]


def test_vsock_listener_as_qsd(qsd: str, tmp_path: Path) -> None:
    # VMADDR_CID_ANY; a second listener on the same port fails (where vsock exists).
    port = 20000 + os.getpid() % 20000
    addr = f"addr.type=vsock,addr.cid=4294967295,addr.port={port}"
    outcomes = {}
    for kind in ("qsd", "qmpgraph"):
        first = _Daemon(kind, qsd, tmp_path / kind / "1", ["--nbd-server", addr], [])
        try:
            second = _Daemon(kind, qsd, tmp_path / kind / "2", ["--nbd-server", addr], [])
            second.stop()
            outcomes[kind] = (first.outcome, second.outcome)
        finally:
            first.stop()
    assert outcomes["qmpgraph"] == outcomes["qsd"]
