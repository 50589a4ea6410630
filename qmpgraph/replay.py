"""Replay a transaction log against a fresh engine and report the first divergence.

``qmpgraph replay PATH [--base-dir DIR]`` (``main(argv) -> int``): for each
header line of the log (see ``qmpgraph.transactions.log``) a fresh ``Daemon``
is made with the recorded ``#block`` name seed; each record's command is then
dispatched exactly as a client would send it, and the transaction it runs is
compared with the record: the outcome, the error (class and text) and the
graph digest afterwards.  The first difference is printed (line number,
expected against actual) and the exit status is 1; 0 when every step matches;
2 when the log cannot be read.

Paths: commands are re-executed verbatim, so image paths in the log resolve
as they did when recorded.  Logs meant to travel (the test suite's) use paths
relative to the directory holding the images, and replay runs with that
directory as the working directory: ``--base-dir DIR`` (default: the current
directory).

What does not live here: the log format and writer
(``qmpgraph.transactions.log``) and the CLI wiring (``qmpgraph.cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

import qmpgraph.commands  # noqa: F401 (registers the command handlers)
from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.protocol.session import QMPSession
from qmpgraph.transactions.log import LogRecord, read_log


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where a replay first differs from the log."""

    lineno: int
    seq: int
    command: str
    what: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"line {self.lineno}: transaction {self.seq} ({self.command}) diverges in "
            f"{self.what}:\n  expected: {self.expected}\n  actual:   {self.actual}"
        )


class _Replayer:
    """A fresh daemon and one session in command mode, capturing its log records."""

    def __init__(self, seed: int) -> None:
        self.records: list[dict[str, Any]] = []
        self.daemon = Daemon(name_seed=seed, transaction_log=self._capture)
        self.records.clear()  # the header line
        self.session = QMPSession(self.daemon.greeting())
        self.session.accept_capabilities([])
        self.dispatcher = Dispatcher(self.daemon)

    def _capture(self, line: bytes) -> None:
        self.records.append(orjson.loads(line))

    def step(self, lineno: int, rec: LogRecord) -> Divergence | None:
        """Re-run one record's command; the divergence, if any."""
        self.records.clear()
        request = {"execute": rec.command, "arguments": rec.arguments}
        reply = self.dispatcher.dispatch(self.session, request)

        def diverged(what: str, expected: Any, actual: Any) -> Divergence:
            return Divergence(lineno, rec.seq, rec.command, what, expected, actual)

        if len(self.records) != 1:
            return diverged(
                "transactions run", "one transaction", f"{len(self.records)} (reply {reply})"
            )
        got = LogRecord.from_json(self.records[0])
        if got.outcome != rec.outcome:
            return diverged("outcome", rec.outcome, f"{got.outcome} {got.error or ''}".strip())
        if got.error != rec.error:
            return diverged("error", rec.error, got.error)
        if got.digest != rec.digest:
            return diverged("digest", rec.digest, got.digest)
        return None


@contextlib.contextmanager
def _working_directory(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def replay(path: str | Path, *, base_dir: str | None = None) -> tuple[int, Divergence | None]:
    """Replay the log at ``path``: (transactions matched, first divergence or None).

    Raises ``ValueError`` for an unreadable log.
    """
    path = os.path.abspath(path)
    matched = 0
    replayer: _Replayer | None = None
    with _working_directory(base_dir):
        for line in read_log(path):
            if line.seed is not None:
                replayer = _Replayer(line.seed)
                continue
            assert line.record is not None
            if replayer is None:
                raise ValueError(f"line {line.lineno}: record before the log header")
            div = replayer.step(line.lineno, line.record)
            if div is not None:
                return matched, div
            matched += 1
    return matched, None


def main(argv: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``qmpgraph replay PATH [--base-dir DIR]``: 0 if all match, 1 on divergence, 2 on error."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = argparse.ArgumentParser(
        prog="qmpgraph replay", description="Replay a qmpgraph transaction log."
    )
    parser.add_argument("log", help="the transaction log (JSON Lines)")
    parser.add_argument(
        "--base-dir", help="working directory for relative image paths (default: current)"
    )
    args = parser.parse_args(argv)
    try:
        matched, div = replay(args.log, base_dir=args.base_dir)
    except (OSError, ValueError) as exc:
        print(f"qmpgraph replay: {exc}", file=err)
        return 2
    if div is not None:
        print(f"{args.log}: {div}", file=out)
        print(f"{matched} transaction(s) matched before the divergence", file=out)
        return 1
    print(f"{args.log}: {matched} transaction(s) replayed, all match", file=out)
    return 0
