"""Write JSON text byte-for-byte as QEMU 7.2's QObject serializer does.

QEMU differs from every Python JSON library in ways clients can see:

* Object members come out in QDict iteration order: by bucket of the tdb hash
  of the key modulo 512, and within one bucket newest-inserted first.
* Separators are ``", "`` and ``": "`` (compact mode) or newline plus four
  spaces per level (pretty mode, where ``,`` has no trailing space).
* Strings escape ``"``, ``\\``, ``\\b \\f \\n \\r \\t``, every other control
  character, DEL and every non-ASCII character as ``\\uXXXX`` with uppercase
  hex (surrogate pairs beyond the BMP); what QEMU's writer cannot decode
  (lone surrogates, the 66 noncharacters) comes out as ``\\uFFFD``.
* Floating-point numbers use C's ``%.17g``.

Python dicts keep insertion order, so callers build dicts in the order QEMU
would insert members (QAPI member order) and this module applies the hash
ordering. What does not live here: parsing (``jsonlex`` and ``jsonstream``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

_BUCKETS = 512
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


@lru_cache(maxsize=65536)
def qdict_bucket(key: str) -> int:
    """The QDict bucket of ``key``: QEMU's tdb hash modulo the bucket count."""
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS


def qdict_order(keys: list[str]) -> list[str]:
    """Keys in QDict iteration order, given them in insertion order."""
    return [k for _, _, k in sorted((qdict_bucket(k), -i, k) for i, k in enumerate(keys))]


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        # QEMU's writer decodes its UTF-8 and rejects noncharacters as invalid.
        return "\\uFFFD"
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    if 0xD800 <= cp <= 0xDFFF:
        # A lone surrogate cannot come from valid UTF-8; QEMU substitutes U+FFFD.
        return "\\uFFFD"
    return f"\\u{cp:04X}"


def quote(text: str) -> str:
    """A JSON string literal as QEMU writes it."""
    # Fast path: printable ASCII without quote or backslash needs no escaping
    # (isprintable() is False for control characters and DEL).
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


@lru_cache(maxsize=4096)
def _compact_layout(keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """For one key set: each key in output order with the text written before its value."""
    ordered = qdict_order(list(keys))
    return tuple(
        (key, ("{" if i == 0 else ", ") + quote(key) + ": ") for i, key in enumerate(ordered)
    )


def _write_compact(obj: Any, out: list[str]) -> None:
    """``_write`` for compact output, dispatching on exact types (the hot path).

    Key order is cached per key set, so replies built from the same shapes
    (node infos, edges) pay for hashing and sorting once.
    """
    t = type(obj)
    if t is str:
        out.append(quote(obj))
    elif t is dict:
        if not obj:
            out.append("{}")
            return
        for key, prefix in _compact_layout(tuple(obj)):
            out.append(prefix)
            _write_compact(obj[key], out)
        out.append("}")
    elif t is int:
        out.append(str(obj))
    elif t is bool:
        out.append("true" if obj else "false")
    elif obj is None:
        out.append("null")
    elif t is list:
        if not obj:
            out.append("[]")
            return
        out.append("[")
        first = True
        for item in obj:
            if not first:
                out.append(", ")
            first = False
            _write_compact(item, out)
        out.append("]")
    else:
        _write(obj, out, False, 0)


def format_float(value: float) -> str:
    """C's ``%.17g`` for a double, as QEMU's qnum_to_string."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return format(value, ".17g")


def _write(obj: Any, out: list[str], pretty: bool, indent: int) -> None:
    if isinstance(obj, str):
        out.append(quote(obj))
    elif obj is None:
        out.append("null")
    elif isinstance(obj, RawJSON):
        out.append(obj.text(pretty, indent))
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(format_float(obj))
    elif isinstance(obj, dict):
        out.append("{")
        sep = ""
        comma = "," if pretty else ", "
        for key in qdict_order(list(obj)):
            out.append(sep)
            if pretty:
                out.append("\n" + " " * (4 * (indent + 1)))
            out.append(quote(key))
            out.append(": ")
            _write(obj[key], out, pretty, indent + 1)
            sep = comma
        if pretty:
            out.append("\n" + " " * (4 * indent))
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        sep = ""
        comma = "," if pretty else ", "
        for item in obj:
            out.append(sep)
            if pretty:
                out.append("\n" + " " * (4 * (indent + 1)))
            _write(item, out, pretty, indent + 1)
            sep = comma
        if pretty:
            out.append("\n" + " " * (4 * indent))
        out.append("]")
    else:
        raise TypeError(f"cannot serialize {type(obj).__name__} as QMP JSON")


def _members(
    obj: dict[str, Any] | list[Any] | tuple[Any, ...], out: list[str], pretty: bool, indent: int
) -> Iterator[Any]:
    """Write one container around its members, yielding each member to write."""
    comma = "," if pretty else ", "
    sep = ""
    if isinstance(obj, dict):
        out.append("{")
        for key in qdict_order(list(obj)):
            out.append(sep)
            if pretty:
                out.append("\n" + " " * (4 * (indent + 1)))
            out.append(quote(key))
            out.append(": ")
            yield obj[key]
            sep = comma
        close = "}"
    else:
        out.append("[")
        for item in obj:
            out.append(sep)
            if pretty:
                out.append("\n" + " " * (4 * (indent + 1)))
            yield item
            sep = comma
        close = "]"
    if pretty:
        out.append("\n" + " " * (4 * indent))
    out.append(close)


def _write_deep(obj: Any, out: list[str], pretty: bool, indent: int) -> None:
    """``_write`` as a loop, for values nested deeper than Python recursion allows.

    QEMU accepts 1024 levels of nesting and echoes such values (an ``id``);
    the recursive writer stays for the common shallow case.
    """
    stack: list[tuple[Iterator[Any], int]] = []
    value, level = obj, indent
    while True:
        if isinstance(value, dict | list | tuple):
            stack.append((_members(value, out, pretty, level), level))
        else:
            _write(value, out, pretty, level)
        while stack:
            members, parent = stack[-1]
            try:
                value = next(members)
            except StopIteration:
                stack.pop()
                continue
            level = parent + 1
            break
        else:
            return


def _write_any(obj: Any, out: list[str], pretty: bool, indent: int) -> None:
    start = len(out)
    try:
        if pretty:
            _write(obj, out, pretty, indent)
        else:
            _write_compact(obj, out)
    except RecursionError:
        del out[start:]
        _write_deep(obj, out, pretty, indent)


def dumps(obj: Any, *, pretty: bool = False) -> str:
    """Serialize ``obj`` as QEMU's ``qobject_to_json_pretty(obj, pretty)`` would."""
    out: list[str] = []
    _write_any(obj, out, pretty, 0)
    return "".join(out)


class RawJSON:
    """A large constant value serialized once per layout and then reused.

    ``query-qmp-schema`` returns hundreds of kilobytes that never change; the
    text for each (pretty, indent) layout is cached on first use.
    """

    __slots__ = ("_cache", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._cache: dict[tuple[bool, int], str] = {}

    def text(self, pretty: bool, indent: int) -> str:
        """The serialized text of the value at this layout."""
        key = (pretty, indent if pretty else 0)
        cached = self._cache.get(key)
        if cached is None:
            out: list[str] = []
            _write_any(self.value, out, pretty, key[1])
            cached = self._cache[key] = "".join(out)
        return cached
