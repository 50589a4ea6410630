"""Starting ``qmpgraph daemon`` (and qsd) as subprocesses in tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


def normalize_stderr(text: str, tmp: Path) -> str:
    """``text`` with the per-run directory as ``$D`` and the program name as ``<prog>``."""
    text = text.replace(str(tmp), "$D")
    return re.sub(r"^\S*(?:qemu-storage-daemon|qmpgraph): ", "<prog>: ", text, flags=re.M)


def run_in_dir(
    argv: Sequence[str],
    tmp: Path,
    cmd: Sequence[str] | None,
    prepare: Callable[[Path], None],
) -> tuple[int, str, str]:
    """Run a daemon with ``$D`` in ``argv`` meaning ``tmp`` (made and filled by
    ``prepare`` first): exit status, normalized stderr, and stdout unless it
    is the help or version text."""
    tmp.mkdir()
    prepare(tmp)
    args = [a.replace("$D", str(tmp)) for a in argv]
    done = run_cli(args, cmd) if cmd is not None else run_cli(args)
    out = done.stdout if not done.stdout.startswith(("Usage", "qemu-storage", "qmpgraph")) else ""
    return done.returncode, normalize_stderr(done.stderr, tmp), out
