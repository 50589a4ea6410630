"""``qmpgraph daemon --clock virtual``: the same script gives the same transcript.

The whole script is written at once, so nothing but the daemon decides how
replies, job steps and events interleave; two runs must agree byte for byte
(timestamps included), and the timestamps show the speed limit held in
virtual time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from qmpgraph.jobs.clock import VirtualClock

TIMEOUT = 30

SETUP = (
    "qemu-img create -q -f qcow2 base.qcow2 1M"
    " && qemu-io -c 'write -P 1 0 256k' -c 'write -P 3 512k 128k' base.qcow2"
    " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 >/dev/null"
)


def script(work: Path) -> bytes:
    """A stream job at 64 KiB/s, finalized and dismissed by hand, then quit.

    With a virtual clock every job runs until it waits for a command right
    after each reply, so the job is pending by the next command.
    """
    lines = [
        {"execute": "qmp_capabilities"},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": str(work / "base.qcow2")}}},
        {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "top", "backing": "base",
            "file": {"driver": "file", "filename": str(work / "top.qcow2")}}},
        {"execute": "block-stream", "arguments": {
            "job-id": "s", "device": "top", "speed": 65536, "auto-dismiss": False,
            "auto-finalize": False}},
        {"execute": "query-block-jobs"},
        {"execute": "job-finalize", "arguments": {"id": "s"}},
        {"execute": "query-jobs"},
        {"execute": "job-dismiss", "arguments": {"id": "s"}},
        {"execute": "query-jobs"},
        {"execute": "quit"},
    ]  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def run_once(work: Path) -> bytes:
    """Start a virtual-clock daemon in ``work``, send the script, read until it hangs up."""
    work.mkdir()
    subprocess.run(SETUP, shell=True, cwd=work, check=True, timeout=TIMEOUT)
    sock_path = str(work / "q.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpgraph", "daemon", "--clock", "virtual",
         "--chardev", f"socket,id=m,path={sock_path},server=on,wait=on", "--monitor", "m"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(TIMEOUT)
        for _ in range(1000):
            try:
                sock.connect(sock_path)
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read() if proc.stderr else b"") from None
                subprocess.run(["sleep", "0.01"], check=True)
        sock.sendall(script(work))
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        sock.close()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    return out.replace(str(work).encode(), b"$WORK")


def test_two_runs_are_byte_identical(tmp_path: Path) -> None:
    first = run_once(tmp_path / "a")
    second = run_once(tmp_path / "b")
    assert first == second
    messages = [json.loads(line) for line in first.splitlines()[1:]]
    events = [m for m in messages if "event" in m]
    assert events[0]["timestamp"] == {"seconds": 0, "microseconds": 0}
    completed = next(e for e in events if e["event"] == "BLOCK_JOB_COMPLETED")
    # 384 KiB were copied at 64 KiB/s in virtual time: about five seconds.
    assert completed["timestamp"]["seconds"] >= 4
    assert completed["data"]["offset"] == 1048576
    # Every reply came in order, and the job ran between the commands.
    returns = [m for m in messages if "return" in m or "error" in m]
    assert len(returns) == 10 and all("return" in r for r in returns)
    assert returns[4]["return"][0]["status"] == "pending"


def test_clock_option_is_checked(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qmpgraph", "daemon", "--clock", "bogus"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == "qmpgraph: --clock bogus: expected 'realtime' or 'virtual'\n"


def test_virtual_clock_steps() -> None:
    clock = VirtualClock()
    assert clock.event_time() == (0, 0)
    assert clock.event_time() == (0, 1)
    clock.advance_to(2_500_000_000)
    assert clock.now_ns() == 2_500_000_000
    clock.advance_to(1)  # never backwards
    assert clock.event_time() == (2, 500000)
