"""``qmpgraph daemon --transaction-log PATH`` and ``qmpgraph replay PATH``, as processes.

A daemon started with ``--blockdev`` options and a log serves a real QMP
socket; a client changes the graph and quits; the log it leaves must hold
the command-line transactions first, then the client's, and replay with exit
status 0. A tampered log replays with exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.helpers import QMPGRAPH, run_cli, wait_for_pidfile

TIMEOUT = 20
REPLAY = [sys.executable, "-m", "qmpgraph", "replay"]


@contextlib.contextmanager
def _daemon(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*QMPGRAPH, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def _session(path: str, commands: list[dict[str, object]]) -> list[dict[str, object]]:
    """Negotiate, send each command, return the replies (events skipped)."""
    replies: list[dict[str, object]] = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        f = s.makefile("rwb")
        json.loads(f.readline())
        for cmd in [{"execute": "qmp_capabilities"}, *commands]:
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    replies.append(msg)
                    break
    return replies


def _write_log(tmp: Path) -> Path:
    log = tmp / "tx.jsonl"
    sock = str(tmp / "q.sock")
    pidfile = tmp / "pid"
    # The log option may come anywhere: it is taken before any --blockdev runs.
    argv = ["--blockdev", "null-co,node-name=n0,size=4096", "--transaction-log", str(log)]
    argv += ["--blockdev", '{"driver": "raw", "node-name": "r0", "file": "n0"}']
    argv += ["--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m"]
    argv += ["--pidfile", str(pidfile)]
    with _daemon(argv) as proc:
        wait_for_pidfile(proc, pidfile, TIMEOUT)
        replies = _session(
            sock,
            [
                {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1"}},
                {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1"}},
                {"execute": "blockdev-del", "arguments": {"node-name": "r0"}},
                {
                    "execute": "blockdev-add",
                    "arguments": {"driver": "raw", "node-name": "r1", "file": "n1"},
                },
                {"execute": "quit"},
            ],
        )
        assert proc.wait(timeout=TIMEOUT) == 0
    assert replies[0] == {"return": {}}
    assert replies[2]["error"] == {
        "class": "GenericError",
        "desc": "Duplicate nodes with node-name='n1'",
    }
    return log


def _records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_log_holds_command_line_then_client_transactions(tmp_path: Path) -> None:
    log = _write_log(tmp_path)
    lines = _records(log)
    assert "qmpgraph-transaction-log" in lines[0]
    got = [(r["command"], r["arguments"], r["outcome"]) for r in lines[1:]]
    assert got[:2] == [
        # The keyval option's leaves arrive typed, as QMP would send them.
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 4096}, "committed"),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"}, "committed"),
    ]
    assert [(c, o) for c, _, o in got[2:]] == [
        ("blockdev-add", "committed"),
        ("blockdev-add", "aborted"),
        ("blockdev-del", "committed"),
        ("blockdev-add", "committed"),
    ]


def test_replay_of_a_daemon_log_matches(tmp_path: Path) -> None:
    log = _write_log(tmp_path)
    done = run_cli([str(log)], REPLAY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 transaction(s) replayed, all match" in done.stdout


def test_replay_of_a_tampered_log_fails(tmp_path: Path) -> None:
    log = _write_log(tmp_path)
    lines = _records(log)
    lines[2]["digest"] = "0" * 64
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    done = run_cli([str(log)], REPLAY)
    assert done.returncode == 1
    assert "line 3: transaction 2 (blockdev-add) diverges in digest" in done.stdout


def test_replay_usage_comes_from_replay_main() -> None:
    done = run_cli(["-h"], REPLAY)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: qmpgraph replay")


def test_transaction_log_is_spelled_in_full_and_qsd_abbreviations_still_work(
    tmp_path: Path,
) -> None:
    done = run_cli(["--transaction-lo", str(tmp_path / "x")])
    assert (done.returncode, done.stderr) == (
        1,
        "qmpgraph: unrecognized option '--transaction-lo'\n",
    )
    # "--tr" is still --trace (unambiguous), as in qemu-storage-daemon.
    done = run_cli(["--tr", "bogus=1"])
    assert done.stderr == "qmpgraph: --tr bogus=1: Invalid parameter 'bogus'\n"
    assert not (tmp_path / "x").exists()


def test_transaction_log_alone_still_gets_the_default_monitor(tmp_path: Path) -> None:
    log = tmp_path / "tx.jsonl"
    env_dir = tmp_path / "run"
    env_dir.mkdir()
    proc = subprocess.Popen(
        [*QMPGRAPH, "--transaction-log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"XDG_RUNTIME_DIR": str(env_dir), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.endswith(f"listening on {env_dir / 'qmpgraph.sock'}\n")
        replies = _session(str(env_dir / "qmpgraph.sock"), [{"execute": "quit"}])
        assert replies == [{"return": {}}, {"return": {}}]
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "qmpgraph-transaction-log" in log.read_text()


def test_help_documents_transaction_log() -> None:
    done = run_cli(["--help"])
    assert "--transaction-log <path>" in done.stdout


def test_unwritable_transaction_log(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "log"
    done = run_cli(["--transaction-log", str(path), "--monitor", "x"])
    assert (done.returncode, done.stderr) == (
        1,
        f"qmpgraph: --transaction-log {path}: No such file or directory\n",
    )


@pytest.mark.parametrize("bad", ["null-co,node-name=n0", "null-co,node-name=n1,size=x"])
def test_failed_start_up_leaves_a_replayable_log(tmp_path: Path, bad: str) -> None:
    log = tmp_path / "tx.jsonl"
    argv = ["--transaction-log", str(log), "--blockdev", "null-co,node-name=n0"]
    done = run_cli([*argv, "--blockdev", bad])
    assert done.returncode == 1
    assert done.stderr.startswith(f"qmpgraph: --blockdev {bad}: ")
    replayed = run_cli([str(log)], REPLAY)
    assert replayed.returncode == 0, replayed.stdout
