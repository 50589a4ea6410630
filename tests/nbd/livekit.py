"""Test helpers: run qemu-storage-daemon or qmpgraph as a subprocess with an NBD
server, talk QMP to it, and run NBD client tools against it (all with timeouts).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TIMEOUT = 30


class LiveDaemon:
    """One daemon process with a QMP monitor and an NBD server on Unix sockets."""

    def __init__(self, kind: str, qsd: str, workdir: Path, blockdevs: list[str]) -> None:
        self.kind = kind
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = str(workdir / "q.sock")
        self.nbd_path = str(workdir / "n.sock")
        exe = [qsd] if kind == "qsd" else [sys.executable, "-m", "qmpgraph", "daemon"]
        args = [
            "--chardev",
            f"socket,id=m,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "m",
        ]
        for spec in blockdevs:
            args += ["--blockdev", spec]
        self.stderr_path = workdir / "stderr.txt"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                exe + args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err
            )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(TIMEOUT)
                self.sock.connect(self.qmp_path)
                break
            except OSError:
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{kind} did not start: {self.stderr_path.read_text()}"
                    ) from None
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.events: list[dict[str, Any]] = []
        self.qmp("qmp_capabilities")

    def qmp(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Run a command; the reply (events that came before it are kept in ``events``)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            return dict(reply)

    def ok(self, command: str, **arguments: Any) -> Any:
        """Run a command that must succeed."""
        reply = self.qmp(command, **arguments)
        assert "return" in reply, (self.kind, command, reply)
        return reply["return"]

    def start_nbd(self) -> None:
        """nbd-server-start on this daemon's Unix socket."""
        self.ok("nbd-server-start", addr={"type": "unix", "data": {"path": self.nbd_path}})

    def uri(self, name: str) -> str:
        """The nbd+unix URI of export ``name``."""
        return f"nbd+unix:///{name}?socket={self.nbd_path}"

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        if hasattr(self, "file"):
            self.file.close()
            self.sock.close()


def run(*cmd: str) -> str:
    """Run a tool; its stdout (fails the test on a non-zero exit)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert res.returncode == 0, (cmd, res.stdout, res.stderr)
    return res.stdout
