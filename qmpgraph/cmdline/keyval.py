"""QEMU's keyval syntax (``util/keyval.c``) and the JSON alternative.

``key=value,key2.sub=value`` builds a tree of dicts whose leaves are all
strings; keys made only of digits turn their parent into a list. The first
fragment may omit ``key=`` when the option has an implied key (``driver`` for
``--blockdev``). Inside a value, ``,,`` stands for a comma, except in the
implied first value, which ends at the first ``,`` or ``=``.

An argument starting with ``{`` is JSON instead (``option_dict``), parsed by
the same parser QMP uses; its leaves keep their JSON types.

What does not live here: converting keyval strings to the QAPI types
(``qmpgraph.cmdline.kvvisit``).
"""

from __future__ import annotations

import re
from typing import Any

from qmpgraph.cmdline.errors import CmdlineError

# The QMP parser, so that single quotes, escapes and error texts are QEMU's.
from qmpgraph.protocol.jsonstream import JSONParseError, JSONStreamer

__all__ = ["keyval_parse", "option_dict"]

# Longest key fragment QEMU accepts (its buffer is 128 bytes with the NUL).
_MAX_FRAGMENT = 127
_INT_MAX = 2**31 - 1
_DIGITS = re.compile(r"[0-9]+")
# A QAPI name: optional downstream prefix "__RFQDN_", then a letter, then
# letters, digits, '-' and '_'.
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")


def _index_at(s: str, pos: int) -> int | None:
    """Length of the list index starting at ``pos``, or None."""
    m = _DIGITS.match(s, pos)
    if m is None or int(m.group()) > _INT_MAX:
        return None
    return m.end() - pos


def _is_index(key: str) -> bool:
    return _DIGITS.fullmatch(key) is not None and int(key) <= _INT_MAX


def _help_len(s: str, pos: int) -> int:
    if s.startswith("?", pos):
        return 1
    if s.startswith("help", pos):
        return 4
    return 0


def _put(cur: dict[str, Any], name: str, value: str | None, key_shown: str) -> Any:
    """Store ``value`` (None: a sub-dict) under ``name``; the stored object."""
    old = cur.get(name)
    if old is not None:
        if isinstance(old, str) != (value is not None):
            raise CmdlineError(f"Parameters '{key_shown}.*' used inconsistently")
        if value is None:
            return old
        # A repeated key: the later value replaces the earlier one in place.
        cur[name] = value
        return value
    new: Any = value if value is not None else {}
    cur[name] = new
    return new


def _parse_one(
    root: dict[str, Any], params: str, pos: int, implied_key: str | None
) -> tuple[int, bool]:
    """Parse the ``key=value`` at ``pos``; returns (next position, was help)."""
    n = len(params)
    length = 0
    while pos + length < n and params[pos + length] not in "=,":
        length += 1
    implied_end = -1
    key, key_start, key_end = params, pos, pos + length
    if length and (pos + length >= n or params[pos + length] != "="):
        if _help_len(params, pos) == length:
            nxt = pos + length
            return (nxt + 1 if nxt < n and params[nxt] == "," else nxt), True
        if implied_key is not None:
            implied_end = pos + length
            key, key_start, key_end = implied_key, 0, len(implied_key)

    cur = root
    s = key_start
    prev = ""
    while True:
        flen = _index_at(key, s) if s != key_start else None
        if flen is None:
            m = _QAPI_NAME.match(key, s)
            flen = m.end() - s if m is not None else 0
        if not flen or (s + flen < key_end and key[s + flen] != "."):
            raise CmdlineError(f"Invalid parameter '{key[key_start:key_end]}'")
        if flen > _MAX_FRAGMENT:
            whole = s == key_start and s + flen == key_end
            what = "Parameter" if whole else "Parameter fragment"
            raise CmdlineError(f"{what} '{key[s : s + flen]}' is too long")
        if s != key_start:
            cur = _put(cur, prev, None, key[key_start : s - 1])
        prev = key[s : s + flen]
        s += flen
        if s >= key_end or key[s] != ".":
            break
        s += 1

    if implied_end >= 0:
        value = params[pos:implied_end]
        nxt = implied_end
        if nxt < n and params[nxt] == ",":
            nxt += 1
    else:
        if s >= n or params[s] != "=":
            raise CmdlineError(f"Expected '=' after parameter '{params[key_start:s]}'")
        s += 1
        chars: list[str] = []
        while s < n:
            if params[s] == ",":
                s += 1
                if s >= n or params[s] != ",":
                    break
            chars.append(params[s])
            s += 1
        value = "".join(chars)
        nxt = s
    _put(cur, prev, value, key[key_start:key_end])
    return nxt, False


def _dotted(path: list[str]) -> str:
    return "".join(p + "." for p in path)


def _listify(cur: dict[str, Any], path: list[str]) -> Any:
    """Turn dicts whose keys are all indexes into lists, depth first."""
    has_index = has_member = False
    for k, v in list(cur.items()):
        if _is_index(k):
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            new = _listify(v, [*path, k])
            if new is not v:
                cur[k] = new
    if has_index and has_member:
        raise CmdlineError(f"Parameters '{_dotted(path)}*' used inconsistently")
    if not has_index:
        return cur
    by_index: dict[int, Any] = {}
    for k, v in cur.items():
        by_index[int(k)] = v
    # QEMU sizes its array by the entry count, so an index beyond it is
    # reported as the first missing slot, never accepted.
    limit = min(len(cur) + 1, max(by_index) + 1)
    out = []
    for i in range(limit):
        if i not in by_index or i >= len(cur):
            raise CmdlineError(f"Parameter '{_dotted(path)}{i}' missing")
        out.append(by_index[i])
    return out


def keyval_parse(
    params: str, implied_key: str | None = None, *, help_allowed: bool = False
) -> tuple[dict[str, Any], bool]:
    """Parse keyval ``params``: the tree and whether ``help`` was asked for.

    Without ``help_allowed`` a ``help`` fragment is an error, as in QEMU's
    option visitors.
    """
    root: dict[str, Any] = {}
    wants_help = False
    pos = 0
    while pos < len(params):
        pos, was_help = _parse_one(root, params, pos, implied_key)
        wants_help = wants_help or was_help
        implied_key = None
    if wants_help and not help_allowed:
        raise CmdlineError("Help is not available for this option")
    _listify(root, [])
    return root, wants_help


def option_dict(text: str, implied_key: str | None) -> tuple[dict[str, Any], bool]:
    """An option argument as QEMU's option visitor reads it.

    Returns the dict and whether it came from keyval (string leaves) rather
    than JSON (typed leaves).
    """
    if text.startswith("{"):
        return _json_object(text), False
    tree, _ = keyval_parse(text, implied_key)
    return tree, True


def _json_object(text: str) -> dict[str, Any]:
    # A NUL ends a C string: nothing after it reaches QEMU's parser.
    text = text.split("\0", 1)[0]
    streamer = JSONStreamer()
    results = streamer.feed(text.encode())
    results += streamer.feed(b"\n")
    if not results:
        raise CmdlineError("JSON parse error, premature EOI")
    first = results[0]
    if isinstance(first, JSONParseError):
        raise CmdlineError(first.desc)
    # QEMU parses the whole string: anything but white space after the
    # first value (another value, an error, an unfinished value) is refused.
    if len(results) > 1 or text[_object_end(text) :].strip(" \t\n\r"):
        raise CmdlineError("Expecting at most one JSON value")
    if not isinstance(first, dict):
        # QEMU asserts here; text starting with '{' cannot be anything else.
        raise CmdlineError("JSON parse error, premature EOI")
    return first


def _object_end(text: str) -> int:
    """Where the object that starts ``text`` ends (it parsed, so it is balanced)."""
    depth = 0
    quote = ""
    escaped = False
    for i, c in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)
