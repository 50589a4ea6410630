"""QEMU 7.2's keyval input visitor: typed values from keyval strings.

Options such as ``--blockdev driver=null-co,size=1`` reach QEMU as a tree
whose leaves are all strings (``qmpgraph.cmdline.keyval``). QEMU visits that
tree with the keyval flavour of its QObject input visitor, which converts
each leaf to the member's type and reports its first error. This module
replays that visit over the same type model as ``qmpgraph.schema.visitor``
(the JSON flavour) and returns the typed arguments (ints, bools, floats,
nested dicts and lists), as the command handler would receive them from
QMP.

How the keyval flavour differs from the JSON one (checked against a live
qemu-storage-daemon 7.2):

* Integers are parsed like C's ``strtoll``/``strtoull`` with base 0 (leading
  white space, sign, ``0x`` hex, ``0`` octal; the whole string must be
  used; an unsigned member takes ``-N`` modulo 2**64): "Parameter 'x'
  expects integer" (full name). The width check that follows is the same as
  for JSON ("Parameter 'x' expects uint32_t", bare name).
* Booleans are ``on``, ``yes``, ``true``, ``y`` or ``off``, ``no``,
  ``false``, ``n`` (case matters): else "Parameter 'x' expects 'on' or
  'off'" (QEMU 7.2's ``qapi_bool_parse``; later QEMUs take only on/off).
* Numbers are ``strtod`` over the whole string, finite: "Invalid parameter
  type for 'x', expected: number".
* A dict or list where a scalar is expected: "Parameters 'x.*' are
  unexpected"; a string where an object or list is expected: "Invalid
  parameter type for 'x', expected: object" / "array".
* List elements are named ``x.0`` (not ``x[0]``) in full names.
* An alternate takes its string branch for a string (a dict or list picks
  the object or array branch); otherwise "Invalid parameter type for 'x',
  expected: BlockdevRef" (bare name).

QEMU's ``size`` type (suffixes such as ``1k``) is not distinguished: the
schema data records it as ``uint64``, and no member reachable from
``blockdev-add`` has it in QEMU 7.2.

What does not live here: the keyval syntax (``qmpgraph.cmdline.keyval``),
the JSON visitor (``qmpgraph.schema.visitor``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from qmpgraph.errors import GenericError
from qmpgraph.protocol.qjson import qdict_order
from qmpgraph.schema.ghash import first_leftover
from qmpgraph.schema.types import (
    INT_KINDS,
    AlternateType,
    ArrayType,
    EnumType,
    IntType,
    ObjectType,
    QType,
)
from qmpgraph.schema.visitor import bad_type, bare_name, join_path

__all__ = ["strtoi64", "strtou64", "visit_keyval"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1

_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
# C's isspace() in the C locale, which strtoll and strtod skip.
_C_SPACE = " \t\n\v\f\r"
# strtoll(base 0) after white space and sign: hex needs a digit after 0x
# (otherwise only the "0" is taken), a leading 0 means octal.
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+)")
_OCT = re.compile(r"0([0-7]*)")
_DEC = re.compile(r"[1-9][0-9]*")
# strtod's decimal and hexadecimal forms, and inf/nan (rejected as not finite).
_FLOAT = re.compile(
    r"[+-]?(?:"
    r"0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|inf(?:inity)?|nan(?:\([0-9A-Za-z_]*\))?"
    r")",
    re.IGNORECASE,
)


def _strtoull_magnitude(text: str) -> tuple[bool, int] | None:
    """Sign and magnitude of ``text`` read as strtoll/strtoull base 0 would,
    or None unless the whole string is one number."""
    s = text.lstrip(_C_SPACE)
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    m = _HEX.fullmatch(s)
    if m is not None:
        return negative, int(m.group(1), 16)
    m = _OCT.fullmatch(s)
    if m is not None:
        return negative, int(m.group(1) or "0", 8)
    m = _DEC.fullmatch(s)
    if m is not None:
        return negative, int(s)
    return None


def strtoi64(text: str) -> int | None:
    """QEMU's ``qemu_strtoi64(text, NULL, 0, ...)``: the value, or None on error."""
    parsed = _strtoull_magnitude(text)
    if parsed is None:
        return None
    negative, mag = parsed
    value = -mag if negative else mag
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def strtou64(text: str) -> int | None:
    """QEMU's ``qemu_strtou64(text, NULL, 0, ...)``: the value, or None on error.

    As C's ``strtoull``, ``-N`` is accepted when N fits and wraps modulo 2**64.
    """
    parsed = _strtoull_magnitude(text)
    if parsed is None:
        return None
    negative, mag = parsed
    if mag > _UINT64_MAX:
        return None
    return (-mag) & _UINT64_MAX if negative else mag


def strtod_finite(text: str) -> float | None:
    """QEMU's ``qemu_strtod_finite(text, NULL, ...)``: the value, or None on error."""
    s = text.lstrip(_C_SPACE)
    if _FLOAT.fullmatch(s) is None:
        return None
    body = s.lstrip("+-")
    try:
        if body[:2].lower() == "0x":
            mant = body if "p" in body.lower() else body + "p0"
            value = float.fromhex(("-" if s.startswith("-") else "") + mant)
        else:
            value = float(s)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(value):
        return None
    # strtod reports ERANGE for a nonzero number that underflows to zero.
    if value == 0.0 and any(c in "123456789abcdefABCDEF" for c in _mantissa(body)):
        return None
    return value


def _mantissa(body: str) -> str:
    if body[:2].lower() == "0x":
        return body[2:].lower().split("p")[0]
    return body.lower().split("e")[0]


def visit_keyval(arg_type: ObjectType, tree: dict[str, Any]) -> dict[str, Any]:
    """Convert keyval ``tree`` (string leaves) to ``arg_type``'s typed arguments.

    Raises ``GenericError`` with QEMU's message for the first problem, in
    QEMU's visit order.
    """
    return _visit_struct(arg_type, tree, "")


def _visit_struct(t: ObjectType, d: dict[str, Any], path: str) -> dict[str, Any]:
    consumed: list[str] = []
    out: dict[str, Any] = {}
    _visit_members(t, d, path, consumed, out)
    if len(consumed) != len(d):
        seen = set(consumed)
        leftover = [k for k in d if k not in seen]
        if len(leftover) == 1:
            key: str | None = leftover[0]
        else:
            key = first_leftover(qdict_order(list(d)), consumed)
        raise GenericError(f"Parameter '{join_path(path, key or '')}' is unexpected")
    # Keep the option's own key order, as the JSON visitor does.
    return {k: out[k] for k in d}


def _visit_members(
    t: ObjectType, d: dict[str, Any], path: str, consumed: list[str], out: dict[str, Any]
) -> None:
    for m in t.members:
        if m.name not in d:
            if m.optional:
                continue
            raise GenericError(f"Parameter '{join_path(path, m.name)}' is missing")
        consumed.append(m.name)
        out[m.name] = _visit(m.type, d[m.name], join_path(path, m.name), m.name)
    if t.tag is not None:
        variant = t.variants.get(out[t.tag])
        if variant is not None:
            _visit_members(variant, d, path, consumed, out)


def _scalar(value: Any, full: str) -> str:
    """The string of a scalar leaf (QEMU's ``qobject_input_get_keyval``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        raise GenericError(f"Parameters '{full}.*' are unexpected")
    # keyval_parse makes only strings, dicts and lists.
    raise GenericError(f"Internal error: parameter {full} invalid")


def _visit(t: QType, value: Any, full: str, bare: str | None) -> Any:
    kind = t.kind
    if kind == "str":
        return _scalar(value, full)
    if kind == "int":
        assert isinstance(t, IntType)
        return _visit_int(t.width, _scalar(value, full), full, bare)
    if kind == "bool":
        text = _scalar(value, full)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise GenericError(f"Parameter '{full}' expects 'on' or 'off'")
    if kind == "enum":
        assert isinstance(t, EnumType)
        text = _scalar(value, full)
        if text not in t.values:
            raise GenericError(f"Parameter '{bare_name(bare)}' does not accept value '{text}'")
        return text
    if kind == "object":
        assert isinstance(t, ObjectType)
        if not isinstance(value, dict):
            raise bad_type(full, "object")
        return _visit_struct(t, value, full)
    if kind == "array":
        assert isinstance(t, ArrayType) and t.element is not None
        if not isinstance(value, list):
            raise bad_type(full, "array")
        element = t.element
        return [_visit(element, item, f"{full}.{i}", None) for i, item in enumerate(value)]
    if kind == "alternate":
        assert isinstance(t, AlternateType)
        if isinstance(value, dict):
            branch = t.branches.get("object")
        elif isinstance(value, list):
            branch = t.branches.get("array")
        else:
            branch = t.branches.get("string")
        if branch is None:
            raise bad_type(bare_name(bare), t.real_name)
        return _visit(branch, value, full, bare)
    if kind == "number":
        number = strtod_finite(_scalar(value, full))
        if number is None:
            raise bad_type(full, "number")
        return number
    if kind == "null":
        raise bad_type(full, "null")
    # "any" takes the subtree as it is.
    return value


def _visit_int(width: str, text: str, full: str, bare: str | None) -> int:
    signed, bits = INT_KINDS[width]
    value = strtoi64(text) if signed else strtou64(text)
    if value is None:
        raise GenericError(f"Parameter '{full}' expects integer")
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    if not lo <= value <= hi:
        raise GenericError(f"Parameter '{bare_name(bare)}' expects {width}_t")
    return value
