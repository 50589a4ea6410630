"""Starting ``qmpgraph daemon`` (and qsd) as subprocesses in tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

QMPGRAPH = [sys.executable, "-m", "qmpgraph", "daemon"]


def wait_for_pidfile(proc: subprocess.Popen[bytes], pidfile: Path, timeout: float = 20) -> int:
    """Wait for the readiness signal (a complete pidfile); the pid in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n"):
            return int(text)
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before its pidfile")
        time.sleep(0.02)
    raise AssertionError("no pidfile within the timeout")


def run_cli(
    argv: Sequence[str], cmd: Sequence[str] = QMPGRAPH, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run a daemon expected to exit by itself; killed if it does not."""
    proc = subprocess.Popen(
        [*cmd, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
