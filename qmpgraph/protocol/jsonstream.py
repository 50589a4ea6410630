"""Split a QMP byte stream into JSON values (placeholder; replaced by a QEMU-exact lexer).

``JSONStreamer.feed`` takes bytes and returns every complete top-level value,
or a ``JSONParseError`` for input QEMU's parser rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class JSONParseError:
    """A parse failure, reported to the client as a GenericError with ``desc``."""

    desc: str


class JSONStreamer:
    """Incremental splitter: balanced braces at top level end one value."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._scan = 0

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the values (or errors) it completed."""
        out: list[Any] = []
        self._buf += data
        i = self._scan
        buf = self._buf
        start = 0
        while i < len(buf):
            c = buf[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:
                    self._esc = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth <= 0:
                    chunk = bytes(buf[start : i + 1])
                    start = i + 1
                    self._depth = 0
                    try:
                        out.append(orjson.loads(chunk))
                    except orjson.JSONDecodeError:
                        out.append(JSONParseError("JSON parse error, expecting value"))
            i += 1
        del buf[:start]
        self._scan = i - start
        return out
