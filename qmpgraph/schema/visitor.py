"""QEMU 7.2's QObject input visitor, replayed to find its first error.

The exact path: it walks the arguments in the order QEMU's generated
``visit_type_*`` code does and raises ``GenericError`` with QEMU's text for
the first problem. The rules it reproduces (all checked against a live
qemu-storage-daemon):

* An object's members are visited in schema order, base members (the union
  tag among them) before the variant's; an absent mandatory member is
  "Parameter 'X' is missing"; keys nobody visited are reported only after all
  members of that object ("Parameter 'X' is unexpected", the key chosen as
  GLib's hash table iteration would, see ``qmpgraph.schema.ghash``).
* Names are full paths ("file.driver", "actions[0].data") except in three
  messages that QEMU words with the bare member name ('null' for list
  elements): integer range ("Parameter 'x' expects uint32_t"), enum value
  ("Parameter 'x' does not accept value 'y'") and alternate type
  ("Invalid parameter type for 'x', expected: BlockdevRef").
* JSON numbers are QNums: an integer literal is "int" when it fits int64,
  "uint" when it fits uint64, otherwise a double. Signed members reject
  non-int64 numbers as "expected: integer"; unsigned ones accept negative
  int64 values (wrapped modulo 2**64, as QEMU does) and reject the rest as
  "Parameter 'x' expects uint64".

Returns the arguments as QEMU would hand them to the command (negative
unsigned values wrapped). What does not live here: the JSON Schema export
(``qmpgraph.schema.jsonschemas``).
"""

from __future__ import annotations

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

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


def join_path(path: str, name: str) -> str:
    """The full name QEMU prints for member ``name`` of the object at ``path``."""
    return f"{path}.{name}" if path else name


def bare_name(name: str | None) -> str:
    """The bare member name some messages print (``null`` for a list element)."""
    # QEMU prints a NULL name (a list element) as 'null' in these messages.
    return name if name is not None else "null"


def bad_type(full: str, expected: str) -> GenericError:
    """QEMU's wrong-type error for the member called ``full``."""
    return GenericError(f"Invalid parameter type for '{full}', expected: {expected}")


def _json_kind(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def visit_arguments(arg_type: ObjectType, args: dict[str, Any]) -> dict[str, Any]:
    """Check ``args`` for a command whose argument type is ``arg_type``."""
    return _visit_struct(arg_type, args, "")


def _visit_struct(t: ObjectType, d: dict[str, Any], path: str) -> dict[str, Any]:
    consumed: list[str] = []
    out = _visit_members(t, d, path, consumed)
    if len(consumed) != len(d):
        seen = set(consumed)
        leftover = [k for k in d if k not in seen]
        if len(leftover) == 1:
            key: str | None = leftover[0]
        else:
            key = first_leftover(qdict_order(list(d)), consumed)
        raise GenericError(f"Parameter '{join_path(path, key or '')}' is unexpected")
    return out


def _visit_members(
    t: ObjectType, d: dict[str, Any], path: str, consumed: list[str]
) -> dict[str, Any]:
    out = d
    for m in t.members:
        if m.name not in d:
            if m.optional:
                continue
            raise GenericError(f"Parameter '{join_path(path, m.name)}' is missing")
        consumed.append(m.name)
        value = d[m.name]
        new = _visit(m.type, value, join_path(path, m.name), m.name)
        if new is not value:
            if out is d:
                out = dict(d)
            out[m.name] = new
    if t.tag is not None:
        variant = t.variants.get(d[t.tag])
        if variant is not None:
            new_out = _visit_members(variant, out, path, consumed)
            if new_out is not out:
                out = new_out
    return out


def _visit(t: QType, value: Any, full: str, bare: str | None) -> Any:
    kind = t.kind
    if kind == "str":
        if not isinstance(value, str):
            raise bad_type(full, "string")
    elif kind == "int":
        assert isinstance(t, IntType)
        return _visit_int(t.width, value, full, bare)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad_type(full, "boolean")
    elif kind == "enum":
        assert isinstance(t, EnumType)
        if not isinstance(value, str):
            raise bad_type(full, "string")
        if value not in t.values:
            raise GenericError(f"Parameter '{bare_name(bare)}' does not accept value '{value}'")
    elif kind == "object":
        assert isinstance(t, ObjectType)
        if not isinstance(value, dict):
            raise bad_type(full, "object")
        return _visit_struct(t, value, full)
    elif kind == "array":
        assert isinstance(t, ArrayType) and t.element is not None
        if not isinstance(value, list):
            raise bad_type(full, "array")
        out = value
        for i, item in enumerate(value):
            new = _visit(t.element, item, f"{full}[{i}]", None)
            if new is not item:
                if out is value:
                    out = list(value)
                out[i] = new
        return out
    elif kind == "alternate":
        assert isinstance(t, AlternateType)
        branch = t.branches.get(_json_kind(value))
        if branch is None:
            raise bad_type(bare_name(bare), t.real_name)
        return _visit(branch, value, full, bare)
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_type(full, "number")
    elif kind == "null" and value is not None:
        raise bad_type(full, "null")
    # "any" accepts every value.
    return value


def _visit_int(width: str, value: Any, full: str, bare: str | None) -> Any:
    signed, bits = INT_KINDS[width]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if signed:
        if not is_int or not _INT64_MIN <= value <= _INT64_MAX:
            raise bad_type(full, "integer")
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if not lo <= value <= hi:
            raise GenericError(f"Parameter '{bare_name(bare)}' expects {width}_t")
        return value
    if not is_int or not _INT64_MIN <= value <= _UINT64_MAX:
        raise GenericError(f"Parameter '{full}' expects uint64")
    wrapped = value & _UINT64_MAX
    if bits < 64 and wrapped >= 1 << bits:
        raise GenericError(f"Parameter '{bare_name(bare)}' expects {width}_t")
    return wrapped if wrapped != value else value
