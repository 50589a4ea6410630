"""The transaction log: one JSON line per graph transaction, for audit and replay.

File format (JSON Lines, written with orjson, appended and flushed per line):

* Line 1, the header: ``{"qmpgraph-transaction-log": 1, "name-seed": N}``.
  ``name-seed`` seeds the ``#block`` name generator's two random digits, so a
  replay against a fresh daemon with the same seed generates the same names.
  A daemon that appends to an existing log writes a new header line; replay
  restarts from a fresh daemon at each header.
* Then one record per graph transaction::

      {"seq": 1, "command": "blockdev-add", "arguments": {...},
       "actions": [{"action": "add-node", "undo": {...}}, ...],
       "outcome": "committed" | "aborted",
       "error": {"class": "GenericError", "desc": "..."},   # aborted only
       "digest": "<sha256 hex of the graph after the transaction>"}

  ``actions`` lists the undo records registered before the transaction was
  finalized, oldest first (``Transaction.log()``).

What lives here: ``LogRecord``, ``TransactionLog`` (the writer, to a path or a
callable sink), ``read_log`` (the reader used by replay). What does not: which
commands open transactions (``qmpgraph.commands``) and replay
(``qmpgraph.replay``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

FORMAT_VERSION = 1
HEADER_KEY = "qmpgraph-transaction-log"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One graph transaction as the log stores it."""

    seq: int
    command: str
    arguments: dict[str, Any]
    actions: list[dict[str, Any]]
    outcome: str
    digest: str
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict (``error`` only when aborted)."""
        out: dict[str, Any] = {
            "seq": self.seq,
            "command": self.command,
            "arguments": self.arguments,
            "actions": self.actions,
            "outcome": self.outcome,
        }
        if self.error is not None:
            out["error"] = self.error
        out["digest"] = self.digest
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LogRecord:
        """Parse a record line; raises ``ValueError`` on a malformed one."""
        try:
            return cls(
                seq=int(obj["seq"]),
                command=str(obj["command"]),
                arguments=dict(obj.get("arguments") or {}),
                actions=list(obj.get("actions") or []),
                outcome=str(obj["outcome"]),
                digest=str(obj["digest"]),
                error=obj.get("error"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed log record: {err}") from err


Sink = Callable[[bytes], None]

# Undo records hold plain references; a reference to the graph itself is
# described by its repr, whose address would make logs differ run to run.
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-f]+>\Z")


def _stable(value: Any) -> Any:
    """``value`` with object reprs reduced to their class name."""
    if isinstance(value, str):
        m = _OBJECT_REPR.match(value)
        return f"<{m.group(1)}>" if m else value
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


class TransactionLog:
    """Appends one line per transaction to a file (or hands it to a sink).

    Opening writes the header line with the daemon's name seed.
    """

    def __init__(self, target: str | Path | Sink, *, name_seed: int) -> None:
        self._out: BinaryIO | None = None
        if callable(target):
            self._sink: Sink = target
        else:
            self._out = open(target, "ab")  # noqa: SIM115 (lives as long as the daemon)
            self._sink = self._write_file
        self.seq = 0
        self._emit({HEADER_KEY: FORMAT_VERSION, "name-seed": name_seed})

    def _write_file(self, line: bytes) -> None:
        if self._out is None:
            return  # closed at daemon stop; a straggling command is not logged
        self._out.write(line)
        # One flush per line: a crash loses at most the transaction in flight.
        self._out.flush()

    def _emit(self, obj: dict[str, Any]) -> None:
        self._sink(orjson.dumps(obj, default=repr) + b"\n")

    def record(
        self,
        command: str,
        arguments: dict[str, Any],
        actions: list[dict[str, Any]],
        digest: str,
        error: dict[str, str] | None = None,
    ) -> LogRecord:
        """Append the record of one finished transaction; returns it."""
        self.seq += 1
        rec = LogRecord(
            self.seq,
            command,
            arguments,
            _stable(actions),
            "committed" if error is None else "aborted",
            digest,
            error,
        )
        self._emit(rec.to_json())
        return rec

    def close(self) -> None:
        """Close the file (a sink needs no closing)."""
        if self._out is not None:
            self._out.close()
            self._out = None


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of a log file: a header (``seed`` set) or a record."""

    lineno: int
    seed: int | None
    record: LogRecord | None


def read_log(path: str | Path) -> Iterator[LogLine]:
    """The lines of a log file, parsed; ``ValueError`` names a bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                raise ValueError(f"line {lineno}: not JSON: {err}") from err
            if not isinstance(obj, dict):
                raise ValueError(f"line {lineno}: not a JSON object")  # noqa: TRY004 (bad input, not a bad call)
            if HEADER_KEY in obj:
                if obj[HEADER_KEY] != FORMAT_VERSION:
                    raise ValueError(f"line {lineno}: unsupported log version {obj[HEADER_KEY]}")
                yield LogLine(lineno, int(obj["name-seed"]), None)
                continue
            try:
                yield LogLine(lineno, None, LogRecord.from_json(obj))
            except ValueError as err:
                raise ValueError(f"line {lineno}: {err}") from err
