"""QEMU's argument types as JSON Schema, one compiled validator per command.

The gate of the dispatch path (``Schema.validate_arguments``): every command's
arguments go through the command's ``jsonschema`` validator, compiled once at
start-up from the same type model the exact visitor walks. Its verdict is
*never looser* than QEMU's (negative values for unsigned members, which QEMU
accepts and wraps, are refused here), so "valid" here means QEMU would pass
the arguments unchanged; a refusal sends them to ``qmpgraph.schema.visitor``,
which words QEMU's first error or returns what QEMU would in fact accept.

The documents are plain JSON Schema (``type``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``enum``, ``minimum``, ``maximum``,
``$ref`` into one shared ``$defs`` table) plus two keywords for QAPI's
dispatching types, so that nothing is tried variant by variant:

* ``qmpUnion`` ``{"tag": name, "cases": {value: schema}}``: a flat union picks
  its case with one dict lookup on the tag's value (no case: invalid). Each
  case is the complete object (base and variant members, nested unions
  expanded), so only the chosen case is evaluated.
* ``qmpAlternate`` ``{json kind: schema}``: an alternate picks its branch by
  the value's JSON kind ("object", "string", "number", ...).

Speed: stock ``descend`` builds a new validator and a resolver scope for
every subschema (measured with the stock keywords: 62 microseconds for a
null-co ``blockdev-add``, 154 for a qcow2 one with an inline file; here 2
and 5). These documents have no ``$id``, so the scope never changes:
the keyword implementations here evaluate subschemas with the same validator
through a keyword plan computed once per subschema (``$ref`` pre-resolved),
return ``None`` instead of an empty generator when there is nothing to report,
and stop at a subtree's first error (the gate needs a verdict; the visitor
words the message).

What does not live here: error messages for clients (``qmpgraph.schema.visitor``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jsonschema
import jsonschema.validators
from jsonschema.exceptions import ValidationError

from qmpgraph.schema.types import (
    INT_KINDS,
    AlternateType,
    ArrayType,
    EnumType,
    IntType,
    Member,
    ObjectType,
    QType,
)

__all__ = ["compile_validators"]

Errors = list[ValidationError] | None
Keyword = Callable[[Any, Any, Any, Any], Errors]
Plan = tuple[tuple[Keyword, str, Any], ...]

# JSON Schema type of a parsed JSON value, by exact Python type (the parser
# only makes these); anything else goes through the type checker.
_JSON_TYPE: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
    dict: "object",
    list: "array",
}

# JSON Schema types that exactly one Python type of a parsed value has.
_EXACT: dict[str, type] = {"string": str, "boolean": bool, "null": type(None)}

# The JSON kind that selects an alternate's branch (QEMU's QType).
_ALTERNATE_KIND: dict[type, str] = {**_JSON_TYPE, int: "number"}


def _is_integer(_checker: Any, value: Any) -> bool:
    # QEMU's int members take only integer literals: not 1.0, not true.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker: Any, value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_BASE = jsonschema.Draft202012Validator
_TYPES = _BASE.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number})


def _fail(message: str) -> list[ValidationError]:
    return [ValidationError(message)]


class _Keywords:
    """The keyword implementations of one validator class, with their tables.

    ``plans`` maps ``id(subschema)`` to (subschema, the schema whose keywords
    run, keyword plan); holding the subschema keeps the id from being reused.
    """

    def __init__(self, defs: dict[str, Any]) -> None:
        self.refs = {f"#/$defs/{name}": schema for name, schema in defs.items()}
        self.plans: dict[int, tuple[Any, Any, Plan]] = {}
        self.enums: dict[int, tuple[list[Any], frozenset[str]]] = {}
        # Subschemas that are just {"type": T} with T one Python type: a
        # member whose value has that exact type is valid without a descend.
        self.exact: dict[int, type] = {}
        self.table: dict[str, Keyword] = {
            "$ref": self.ref,
            "type": self.type,
            "enum": self.enum,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "properties": self.properties,
            "required": self.required,
            "additionalProperties": self.additional_properties,
            "items": self.items,
            "qmpUnion": self.union,
            "qmpAlternate": self.alternate,
        }

    def plan(self, schema: Any) -> tuple[Any, Plan]:
        """The schema whose keywords run for ``schema`` (a bare ``$ref``'s
        target, else itself) and those keywords, in document order."""
        entry = self.plans.get(id(schema))
        if entry is not None:
            return entry[1], entry[2]
        if isinstance(schema, dict) and len(schema) == 1 and "$ref" in schema:
            # A bare reference: run its target's keywords directly.
            target, plan = self.plan(self.refs[schema["$ref"]])
        elif isinstance(schema, dict):
            target = schema
            plan = tuple((self.table[k], k, v) for k, v in schema.items() if k in self.table)
        else:
            raise TypeError(f"unsupported schema {schema!r}")
        self.plans[id(schema)] = (schema, target, plan)
        if target.keys() == {"type"} and target["type"] in _EXACT:
            self.exact[id(schema)] = _EXACT[target["type"]]
        return target, plan

    def descend(self, validator: Any, instance: Any, schema: Any) -> Errors:
        """Errors of ``instance`` against a subschema (the first one only)."""
        entry = self.plans.get(id(schema))
        target, plan = (entry[1], entry[2]) if entry is not None else self.plan(schema)
        for fn, k, v in plan:
            errors = fn(validator, v, instance, target)
            if errors:
                for error in errors:
                    error._set(  # private, but what jsonschema's own descend calls
                        validator=k,
                        validator_value=v,
                        instance=instance,
                        schema=target,
                        type_checker=validator.TYPE_CHECKER,
                    )
                    if k != "$ref":
                        error.schema_path.appendleft(k)
                return errors
        return None

    def ref(self, validator: Any, ref: str, instance: Any, _schema: Any) -> Errors:
        return self.descend(validator, instance, self.refs[ref])

    def type(self, validator: Any, types: Any, instance: Any, _schema: Any) -> Errors:
        kind = _JSON_TYPE.get(type(instance))
        if kind is None:
            # Not a type the JSON parser makes: the type checker decides.
            wanted = [types] if isinstance(types, str) else types
            ok = any(validator.is_type(instance, t) for t in wanted)
        elif isinstance(types, str):
            ok = kind == types or (kind == "integer" and types == "number")
        else:
            ok = kind in types or (kind == "integer" and "number" in types)
        return None if ok else _fail(f"{instance!r} is not of type {types!r}")

    def enum(self, _validator: Any, values: list[Any], instance: Any, _schema: Any) -> Errors:
        entry = self.enums.get(id(values))
        if entry is None:
            strings = frozenset(v for v in values if isinstance(v, str))
            entry = self.enums[id(values)] = (values, strings)
        if isinstance(instance, str):
            ok = instance in entry[1]
        else:
            ok = any(
                type(v) is type(instance) and v == instance
                for v in values
                if not isinstance(v, str)
            )
        return None if ok else _fail(f"{instance!r} is not one of {values!r}")

    def minimum(self, _validator: Any, bound: Any, instance: Any, _schema: Any) -> Errors:
        if _is_number(None, instance) and instance < bound:
            return _fail(f"{instance!r} is less than the minimum of {bound!r}")
        return None

    def maximum(self, _validator: Any, bound: Any, instance: Any, _schema: Any) -> Errors:
        if _is_number(None, instance) and instance > bound:
            return _fail(f"{instance!r} is greater than the maximum of {bound!r}")
        return None

    def properties(self, validator: Any, props: Any, instance: Any, _schema: Any) -> Errors:
        if type(instance) is not dict:
            return None
        exact = self.exact
        for key, value in instance.items():
            sub = props.get(key)
            if sub is not None and exact.get(id(sub)) is not type(value):
                errors = self.descend(validator, value, sub)
                if errors:
                    for error in errors:
                        error.path.appendleft(key)
                        error.schema_path.appendleft(key)
                    return errors
        return None

    def required(self, _validator: Any, names: Any, instance: Any, _schema: Any) -> Errors:
        if type(instance) is dict:
            for name in names:
                if name not in instance:
                    return _fail(f"{name!r} is a required property")
        return None

    def additional_properties(
        self, validator: Any, extra: Any, instance: Any, schema: Any
    ) -> Errors:
        if type(instance) is not dict:
            return None
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                continue
            if extra is False:
                return _fail(f"Additional properties are not allowed ({key!r} was unexpected)")
            if extra is not True:
                errors = self.descend(validator, value, extra)
                if errors:
                    return errors
        return None

    def items(self, validator: Any, element: Any, instance: Any, _schema: Any) -> Errors:
        if type(instance) is not list:
            return None
        exact = self.exact.get(id(element))
        if exact is not None and all(type(item) is exact for item in instance):
            return None
        for index, item in enumerate(instance):
            errors = self.descend(validator, item, element)
            if errors:
                for error in errors:
                    error.path.appendleft(index)
                return errors
        return None

    def union(self, validator: Any, spec: Any, instance: Any, _schema: Any) -> Errors:
        if type(instance) is not dict:
            return None
        value = instance.get(spec["tag"])
        case = spec["cases"].get(value) if isinstance(value, str) else None
        if case is None:
            return _fail(f"{value!r} is not a case of union tag {spec['tag']!r}")
        return self.descend(validator, instance, case)

    def alternate(self, validator: Any, branches: Any, instance: Any, _schema: Any) -> Errors:
        branch = branches.get(_ALTERNATE_KIND.get(type(instance), ""))
        if branch is None:
            return _fail(f"{instance!r} matches no branch of {sorted(branches)}")
        return self.descend(validator, instance, branch)

    def walk(self, schema: Any) -> None:
        """Compute the plans of ``schema`` and every subschema (start-up)."""
        stack = [schema]
        while stack:
            s = stack.pop()
            if id(s) in self.plans:
                continue
            self.plan(s)
            stack.extend(_subschemas(s))


def _subschemas(schema: dict[str, Any]) -> Iterable[Any]:
    yield from schema.get("properties", {}).values()
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield schema[key]
    if "qmpUnion" in schema:
        yield from schema["qmpUnion"]["cases"].values()
    yield from schema.get("qmpAlternate", {}).values()


def _int_schema(width: str) -> dict[str, Any]:
    signed, bits = INT_KINDS[width]
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    return {"type": "integer", "minimum": lo, "maximum": hi}


_SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "number": {"type": "number"},
    "null": {"type": "null"},
    "any": {},
}


class _Builder:
    """Translates ``QType`` objects into JSON Schema, named types into ``$defs``."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}
        self._enums: dict[str, dict[str, Any]] = {}

    def schema(self, t: QType) -> dict[str, Any]:
        """A schema for ``t``: inline for scalars and enums, ``$ref`` otherwise."""
        kind = t.kind
        if kind == "int":
            assert isinstance(t, IntType)
            return _int_schema(t.width)
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "enum":
            # One shared dict per enum: one plan, one value set.
            assert isinstance(t, EnumType)
            enum = self._enums.get(t.name)
            if enum is None:
                enum = self._enums[t.name] = {"type": "string", "enum": sorted(t.values)}
            return enum
        if kind == "array":
            # Arrays of ints carry a member-specific width: never shared.
            assert isinstance(t, ArrayType) and t.element is not None
            return {"type": "array", "items": self.schema(t.element)}
        if t.name not in self.defs:
            self.defs[t.name] = {}  # placeholder: breaks recursion
            self.defs[t.name] = self.define(t)
        return {"$ref": f"#/$defs/{t.name}"}

    def define(self, t: QType) -> dict[str, Any]:
        """The schema of a named object or alternate type."""
        if isinstance(t, AlternateType):
            return {"qmpAlternate": {kind: self.schema(b) for kind, b in t.branches.items()}}
        assert isinstance(t, ObjectType)
        if t.tag is None:
            return {"type": "object", **self._object(t.members)}
        return {"type": "object", **self._union(t, [])}

    def _union(self, t: ObjectType, inherited: list[Member]) -> dict[str, Any]:
        # Every case is the whole object: the members so far, the variant's
        # (its base and its own tag among them), and so on down nested unions.
        members = [*inherited, *t.members]
        tag_type = next(m.type for m in t.members if m.name == t.tag)
        assert isinstance(tag_type, EnumType) and t.tag is not None
        cases: dict[str, Any] = {}
        for case in sorted(tag_type.values):
            variant = t.variants.get(case)
            if variant is None:
                cases[case] = self._object(members)
            elif variant.tag is None:
                cases[case] = self._object([*members, *variant.members])
            else:
                cases[case] = self._union(variant, members)
        return {"qmpUnion": {"tag": t.tag, "cases": cases}}

    def _object(self, members: list[Member]) -> dict[str, Any]:
        props = {m.name: self.schema(m.type) for m in members}
        required = [m.name for m in members if not m.optional]
        schema: dict[str, Any] = {"properties": props}
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False
        return schema


def compile_validators(arg_types: dict[str, ObjectType]) -> dict[str, Any]:
    """One validator per command name, sharing a single ``$defs`` table.

    Each command's document is its argument type's schema inlined at the root
    (no ``$ref`` to follow first) next to ``$defs``.
    """
    builder = _Builder()
    roots: dict[str, dict[str, Any]] = {}
    for cmd, t in arg_types.items():
        builder.schema(t)
        roots[cmd] = builder.defs[t.name]
    keywords = _Keywords(builder.defs)
    validator_class = jsonschema.validators.create(
        meta_schema=_BASE.META_SCHEMA,
        validators=keywords.table,
        type_checker=_TYPES,
        format_checker=None,
    )
    for schema in builder.defs.values():
        keywords.walk(schema)
    validators: dict[str, Any] = {}
    for cmd, root in roots.items():
        document = {**root, "$defs": builder.defs}
        keywords.walk(document)
        validators[cmd] = validator_class(document)
    return validators
