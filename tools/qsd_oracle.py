"""A minimal synchronous QMP client for a throw-away qemu-storage-daemon.

Used by the schema generator and the recorders in ``tools/`` to ask the real
QEMU 7.2 daemon (the oracle) what it answers. Not shipped, not async: these
tools run one request at a time and want plain function calls.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any


class QSD:
    """One qemu-storage-daemon with a QMP monitor on a Unix socket in a temp dir.

    Use as a context manager; the daemon is negotiated (command mode) unless
    ``negotiate=False``, and killed on exit.
    """

    def __init__(self, binary: str | None = None, *, negotiate: bool = True) -> None:
        path = binary or shutil.which("qemu-storage-daemon")
        if path is None:
            raise RuntimeError("qemu-storage-daemon not found on PATH")
        self._binary = path
        self._negotiate = negotiate
        self._tmp = tempfile.TemporaryDirectory(prefix="qsd")
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self.greeting: dict[str, Any] = {}

    def __enter__(self) -> QSD:
        sock_path = os.path.join(self._tmp.name, "m.sock")
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--chardev",
                f"socket,path={sock_path},server=on,wait=off,id=m",
                "--monitor",
                "chardev=m",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(sock_path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise
                time.sleep(0.01)
        sock.settimeout(30)
        self._sock = sock
        self.greeting = self._read()
        if self._negotiate:
            self.execute("qmp_capabilities")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._tmp.cleanup()

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise EOFError("qemu-storage-daemon closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request; return its reply (events in between are dropped)."""
        assert self._sock is not None
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" not in reply:
                return reply

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``name``; return the whole reply (``return`` or ``error``)."""
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        return self.request(msg)

    def error_desc(self, name: str, arguments: dict[str, Any] | None = None) -> str | None:
        """The error text of running ``name``, or ``None`` if it succeeded."""
        reply = self.execute(name, arguments)
        if "error" in reply:
            desc: str = reply["error"]["desc"]
            return desc
        return None
