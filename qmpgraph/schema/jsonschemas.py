"""QEMU's argument types as JSON Schema, one compiled validator per command.

Built once at start-up from the same type model the exact visitor walks, and
deliberately *at least as strict* as QEMU (negative values for unsigned
members, which QEMU accepts and wraps, are refused here), so "valid" here
implies valid for QEMU. Tests use it as an independent cross-check of
``qmpgraph.schema.visitor``; clients can get a command's JSON Schema from
``Schema.json_schema``.

It is not on the command path: measured on this schema, ``jsonschema``'s
``is_valid`` costs 15-250 microseconds per command where the visitor replay
costs 0.2-8, and the replay is needed anyway to word QEMU's errors.

Flat unions use one custom keyword, ``qmpUnion``, that picks the variant's
schema by the tag's value (a dict lookup instead of one ``if`` per case).

What does not live here: error messages (``qmpgraph.schema.visitor``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema.validators

from qmpgraph.schema.types import (
    INT_KINDS,
    AlternateType,
    ArrayType,
    EnumType,
    IntType,
    ObjectType,
    QType,
)


def _is_integer(_checker: Any, value: Any) -> bool:
    # QEMU's int members take only integer literals: not 1.0, not true.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker: Any, value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _qmp_union(validator: Any, spec: dict[str, Any], instance: Any, _schema: Any) -> Iterator[Any]:
    if not isinstance(instance, dict):
        return
    case = spec["cases"].get(instance.get(spec["tag"]))
    if case is not None:
        yield from validator.descend(instance, case)


_BASE = jsonschema.Draft202012Validator
_TYPES = _BASE.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number})
QMPValidator = jsonschema.validators.extend(
    _BASE, validators={"qmpUnion": _qmp_union}, type_checker=_TYPES
)


def _int_schema(width: str) -> dict[str, Any]:
    signed, bits = INT_KINDS[width]
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    return {"type": "integer", "minimum": lo, "maximum": hi}


class _Builder:
    """Translates ``QType`` objects into JSON Schema ``$defs``."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def ref(self, t: QType) -> dict[str, Any]:
        """A schema for ``t``: inline for scalars, ``$ref`` for named types."""
        kind = t.kind
        if kind == "int":
            assert isinstance(t, IntType)
            return _int_schema(t.width)
        if kind == "str":
            return {"type": "string"}
        if kind == "bool":
            return {"type": "boolean"}
        if kind == "number":
            return {"type": "number"}
        if kind == "null":
            return {"type": "null"}
        if kind == "any":
            return {}
        if kind == "array":
            # Arrays of ints carry a member-specific width: never shared.
            assert isinstance(t, ArrayType) and t.element is not None
            return {"type": "array", "items": self.ref(t.element)}
        if t.name not in self.defs:
            self.defs[t.name] = {}  # placeholder: breaks recursion
            self.defs[t.name] = self._define(t)
        return {"$ref": f"#/$defs/{t.name}"}

    def _define(self, t: QType) -> dict[str, Any]:
        if isinstance(t, EnumType):
            return {"type": "string", "enum": sorted(t.values)}
        if isinstance(t, AlternateType):
            return {"anyOf": [self.ref(b) for b in t.branches.values()]}
        assert isinstance(t, ObjectType)
        props, required = self._members(t)
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        if t.tag is None:
            schema["additionalProperties"] = False
            return schema
        cases: dict[str, Any] = {}
        tag_type = next(m.type for m in t.members if m.name == t.tag)
        assert isinstance(tag_type, EnumType)
        for case in sorted(tag_type.values):
            variant = t.variants.get(case)
            vprops: dict[str, Any] = dict(props)
            vreq: list[str] = []
            if variant is not None:
                # A variant that is itself a union only gets its base members
                # here, so its own variants are refused here and the exact
                # visitor decides: stricter, never looser.
                more, vreq = self._members(variant)
                vprops.update(more)
            cs: dict[str, Any] = {"properties": vprops, "additionalProperties": False}
            if vreq:
                cs["required"] = vreq
            cases[case] = cs
        schema["qmpUnion"] = {"tag": t.tag, "cases": cases}
        return schema

    def _members(self, t: ObjectType) -> tuple[dict[str, Any], list[str]]:
        props: dict[str, Any] = {}
        required: list[str] = []
        for m in t.members:
            props[m.name] = self.ref(m.type)
            if not m.optional:
                required.append(m.name)
        return props, required


def compile_validators(arg_types: dict[str, ObjectType]) -> dict[str, Any]:
    """One validator per command name, sharing a single ``$defs`` table."""
    builder = _Builder()
    roots = {cmd: builder.ref(t) for cmd, t in arg_types.items()}
    defs = builder.defs
    return {
        cmd: QMPValidator({"$defs": defs, **root}, format_checker=None)
        for cmd, root in roots.items()
    }
