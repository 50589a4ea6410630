"""Split a QMP byte stream into JSON values exactly as QEMU 7.2 does, quickly.

``JSONStreamer.feed`` takes bytes and returns every value QEMU would have
completed by then, in order, with a ``JSONParseError`` where QEMU reports a
lexical, syntax or limit error. Dict keys keep the order of the text.

Two paths produce the same results:

* The fast path takes one line at a time (clients end each request with a
  newline; several requests on one line are taken one by one) and lets
  orjson parse it. orjson accepts a subset of what QEMU
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
# Deeper values go the exact way: its parser is a loop, while the checks here
# recurse and QEMU's 1024 levels would exceed Python's recursion limit.
_FAST_NESTING = 200
_LONG_SEGMENT = 4096
_NEXT_OBJECT = re.compile(rb"\}[ \t\r]*\{")
# A lexically clean prefix of a container: whole tokens QEMU lexes without
# error, then at most one unfinished string, number or keyword.
_CLEAN_PREFIX = re.compile(
    rb'(?:[ \t\r\n{}\[\],:]|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\/bfnrt])*"'
    rb"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?=[ \t\r\n{}\[\],:])"
    rb"|[a-z]+(?=[^a-z]))*"
    rb'(?:"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\/bfnrt])*\\?|-?(?:0|[1-9][0-9]*)?|[a-z]*)'
)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# An integer part of just 0 followed by an exponent.
_ZERO_EXPONENT = re.compile(rb"(?<![0-9.])0[eE]")
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


def _checked(text: bytes, value: Any) -> Any:
    """``value`` (orjson's reading of ``text``) if it is QEMU's too, else ``_NO``."""
    if len(text) > _FAST_MAX:
        return _NO
    if (not text.isascii() or b"\\u" in text) and not _strings_valid(value):
        return _NO
    if (b"0e" in text or b"0E" in text) and _ZERO_EXPONENT.search(_STRING.sub(b"", text)):
        return _NO  # QEMU lexes "0e3" as 0 then the keyword "e3", orjson as 0.0
    if type(value) in _CONTAINERS:
        if text.count(b"{") + text.count(b"[") > _FAST_NESTING:
            return _NO
        # Every key is followed by one colon token; a dict with fewer keys
        # than the text has colon tokens lost a duplicate key (QEMU rejects).
        keys = _keys(value)
        if text.count(b":") != keys and _STRING.sub(b"", text).count(b":") != keys:
            return _NO
    return value


# orjson's words for a valid document followed by more input (older releases
# said "trailing characters").
_TRAILING = frozenset(("unexpected content after document", "trailing characters"))
_SELF_TERMINATED = frozenset(b'}]"')


def _fast(segment: bytes, complete: bool) -> tuple[Any, int]:
    """The first value of ``segment`` and the bytes it used, or ``(_NO, 0)``.

    ``complete`` says the segment is followed by a newline; without it, a
    number or keyword at its very end is not finished yet.
    """
    try:
        value = orjson.loads(segment)
    except orjson.JSONDecodeError as err:
        # Several values on one line: take the first if it ends itself (a
        # number or keyword would swallow what follows, as "truex" does).
        if err.msg not in _TRAILING or err.pos <= 0:
            return _NO, 0
        used = err.pos  # counted in characters: bytes only for ASCII
        if not segment.isascii():
            used = len(segment.decode("utf-8")[:used].encode("utf-8"))
        head = segment[:used]
        if head.rstrip(_WS)[-1] not in _SELF_TERMINATED:
            return _NO, 0
        try:
            value = orjson.loads(head)
        except orjson.JSONDecodeError:
            return _NO, 0
        return _checked(head, value), used
    if not complete and segment[-1] not in _SELF_TERMINATED and segment[-1] not in _WS:
        return _NO, 0
    return _checked(segment, value), len(segment)


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
            end = nl if nl >= 0 else n
            if end - pos > _LONG_SEGMENT:
                # Many requests without newlines: orjson would read all the
                # rest for each one. If the text up to the first "} {" is one
                # whole value, it is the first value (its end balances).
                match = _NEXT_OBJECT.search(data, pos, end)
                if match is not None:
                    brace = match.start()
                    value, used = _fast(data[pos : brace + 1], False)
                    if value is not _NO and used == brace + 1 - pos:
                        out.append(value)
                        pos = brace + 1
                        continue
            segment = data[pos:end]
            value, used = _fast(segment, nl >= 0)
            if value is not _NO:
                out.append(value)
                pos += used
                continue
            if nl < 0 and _held(segment):
                self._pending = segment
                break
            pos = machine.feed(data, pos, until_clean=True)
        machine.out = []
        return out
