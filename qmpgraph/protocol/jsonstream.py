"""Split a QMP byte stream into JSON values exactly as QEMU 7.2 does, quickly.

``JSONStreamer.feed`` takes bytes and returns every value QEMU would have
completed by then, in order, with a ``JSONParseError`` where QEMU reports a
lexical, syntax or limit error. Dict keys keep the order of the text.

Two paths produce the same results:

* The fast path takes one line at a time (clients end each request with a
  newline) and lets orjson parse it. orjson accepts a subset of what QEMU
  accepts, but with different values in a few corners, so a result is
  trusted only when no string holds a noncharacter (orjson already rejects
  surrogates; QEMU's ``\\xC0\\x80`` spelling of U+0000 makes orjson fail and
  so takes the exact path), the text has no duplicate keys (the dicts hold as
  many keys as the text has colon tokens), and is far below the nesting,
  token-count and size limits.
* Everything else goes through ``jsonlex.JSONMachine``, the exact model of
  QEMU's lexer, streamer and parser, until it is back in its start state.

A trailing piece without a newline is either parsed now (when it ends a
value that QEMU would already have completed), held (when it is a lexically
clean prefix of a container that QEMU would still be collecting), or given to
the exact machine.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from qmpgraph.protocol.jsonlex import MAX_NESTING, JSONMachine, JSONParseError, has_noncharacter

__all__ = ["JSONParseError", "JSONStreamer"]

_NO = object()
_WS = b" \t\r\n"
_WS_RUN = re.compile(rb"[ \t\r\n]*")
# Lines this long could approach a QEMU limit; the exact path decides them.
_FAST_MAX = 1 << 20
# A lexically clean prefix of a container: whole tokens QEMU lexes without
# error, then at most one unfinished string, number or keyword.
_CLEAN_PREFIX = re.compile(
    rb'(?:[ \t\r\n{}\[\],:]|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\/bfnrt])*"'
    rb"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?=[ \t\r\n{}\[\],:])"
    rb"|[a-z]+(?=[^a-z]))*"
    rb'(?:"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\/bfnrt])*\\?|-?(?:0|[1-9][0-9]*)?|[a-z]*)'
)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")


def _keys(value: Any) -> int:
    """How many keys the dicts in ``value`` hold, nested ones included."""
    if type(value) is dict:
        total = len(value)
        for item in value.values():
            if type(item) in _CONTAINERS:
                total += _keys(item)
        return total
    if type(value) is list:
        return sum(_keys(item) for item in value if type(item) in _CONTAINERS)
    return 0


_CONTAINERS = frozenset((dict, list))


def _strings_valid(value: Any) -> bool:
    """Whether no string in ``value`` holds a noncharacter.

    orjson already rejects surrogates, escaped or raw, so noncharacters are
    the only strings it accepts and QEMU does not.
    """
    kind = type(value)
    if kind is str:
        return not has_noncharacter(value)
    if kind is dict:
        return all(not has_noncharacter(k) and _strings_valid(v) for k, v in value.items())
    if kind is list:
        return all(_strings_valid(v) for v in value)
    return True


def _fast(line: bytes) -> Any:
    """The value of ``line`` if orjson's reading of it is QEMU's, else ``_NO``."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return _NO
    if len(line) > _FAST_MAX:
        return _NO
    if (not line.isascii() or b"\\u" in line) and not _strings_valid(value):
        return _NO
    if type(value) in _CONTAINERS:
        if line.count(b"{") + line.count(b"[") > MAX_NESTING - 24:
            return _NO
        # Every key is followed by one colon token; a dict with fewer keys
        # than the text has colon tokens lost a duplicate key (QEMU rejects).
        keys = _keys(value)
        colons = line.count(b":")
        if colons != keys and _STRING.sub(b"", line).count(b":") != keys:
            return _NO
    return value


def _held(tail: bytes) -> bool:
    """Whether QEMU would silently keep collecting ``tail`` (a container prefix)."""
    if len(tail) > _FAST_MAX or tail.lstrip(_WS)[:1] not in (b"{", b"["):
        return False
    match = _CLEAN_PREFIX.match(tail)
    if match is None or match.end() != len(tail):
        return False
    brackets = _STRING.sub(b"", tail).translate(None, _NOT_BRACKETS)
    brace = bracket = 0
    for c in brackets:
        if c == 0x7B:
            brace += 1
        elif c == 0x7D:
            brace -= 1
        elif c == 0x5B:
            bracket += 1
        else:
            bracket -= 1
        if brace < 0 or bracket < 0 or (brace == 0 and bracket == 0):
            return False
        if brace + bracket > MAX_NESTING:
            return False
    return True


class JSONStreamer:
    """Incremental reader of one client's byte stream."""

    __slots__ = ("_machine", "_pending")

    def __init__(self) -> None:
        self._machine = JSONMachine()
        self._pending = b""

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the values (or errors) it completed."""
        machine = self._machine
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out = machine.out = []
        pos = 0
        n = len(data)
        while pos < n:
            if not machine.clean:
                pos = machine.feed(data, pos, until_clean=True)
                continue
            if data[pos] in _WS:
                pos = _WS_RUN.match(data, pos).end()  # type: ignore[union-attr]
                if pos >= n:
                    break
            nl = data.find(b"\n", pos)
            if nl >= 0:
                value = _fast(data[pos:nl])
                if value is not _NO:
                    out.append(value)
                    pos = nl + 1
                    continue
            else:
                tail = data[pos:]
                value = _fast(tail)
                # Numbers and keywords end only when the next byte arrives.
                if value is not _NO and (tail[-1] in b'}]"' or tail[-1] in _WS):
                    out.append(value)
                    break
                if _held(tail):
                    self._pending = tail
                    break
            pos = machine.feed(data, pos, until_clean=True)
        machine.out = []
        return out
