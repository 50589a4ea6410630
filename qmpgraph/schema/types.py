"""The QMP type model: QEMU's masked introspection plus the probed facts.

``build_types`` turns the committed ``query-qmp-schema`` data and the side
file written by ``tools/gen_schema.py`` into frozen type objects that the
validators walk. Names stay the masked ones ("29", "[int]"); the real
alternate names and integer widths come from the side file, which is what
QEMU's error messages need.

What does not live here: validation (``qmpgraph.schema.visitor`` and
``qmpgraph.schema.jsonschemas``) and the introspection reply
(``qmpgraph.schema.introspect``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Integer kinds as QEMU's visitor checks them: (signed, bits).
INT_KINDS: dict[str, tuple[bool, int]] = {
    "int8": (True, 8),
    "int16": (True, 16),
    "int32": (True, 32),
    "int64": (True, 64),
    "uint8": (False, 8),
    "uint16": (False, 16),
    "uint32": (False, 32),
    "uint64": (False, 64),
}


@dataclass(slots=True, eq=False)
class QType:
    """One schema type. ``kind`` is the builtin name or the meta-type."""

    name: str
    kind: str


@dataclass(slots=True, eq=False)
class IntType(QType):
    """An integer of a known width (``int`` in introspection)."""

    width: str = "int64"


@dataclass(slots=True, eq=False)
class EnumType(QType):
    """An enumeration; QEMU checks membership after the string type."""

    values: frozenset[str] = frozenset()


@dataclass(slots=True, eq=False)
class ArrayType(QType):
    """A list of ``element``."""

    element: QType | None = None


@dataclass(slots=True, eq=False)
class Member:
    """One object member in QAPI (visit) order."""

    name: str
    type: QType
    optional: bool


@dataclass(slots=True, eq=False)
class ObjectType(QType):
    """A struct or flat union: members (base first, tag among them), variants."""

    members: list[Member] = field(default_factory=list)
    tag: str | None = None
    variants: dict[str, ObjectType] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class AlternateType(QType):
    """An alternate: the branch is chosen by the JSON type of the value."""

    real_name: str = ""
    #: JSON kind ("object", "string", "number", "boolean", "null", "array")
    #: -> branch type.
    branches: dict[str, QType] = field(default_factory=dict)


_BUILTIN_KINDS = {"str", "bool", "null", "number", "any"}


def json_kind(t: QType) -> str:
    """The JSON kind that selects ``t`` as an alternate branch."""
    return {
        "str": "string",
        "enum": "string",
        "bool": "boolean",
        "null": "null",
        "number": "number",
        "int": "number",
        "object": "object",
        "array": "array",
    }[t.kind]


def build_types(entities: list[dict[str, Any]], probed: dict[str, Any]) -> dict[str, QType]:
    """Every type of the masked schema, resolved into linked ``QType`` objects.

    Integer members get their own ``IntType`` carrying the probed width,
    since the one ``int`` entity of introspection stands for all widths.
    """
    by_name = {e["name"]: e for e in entities}
    types: dict[str, QType] = {}
    ints: dict[str, str] = probed.get("integers", {})
    alt_names: dict[str, str] = probed.get("alternates", {})

    def get(name: str) -> QType:
        t = types.get(name)
        if t is not None:
            return t
        ent = by_name[name]
        meta = ent["meta-type"]
        if meta == "builtin":
            t = IntType(name, "int") if name == "int" else QType(name, name)
            types[name] = t
        elif meta == "enum":
            t = types[name] = EnumType(name, "enum", frozenset(ent["values"]))
        elif meta == "array":
            arr = ArrayType(name, "array")
            types[name] = arr
            arr.element = get(ent["element-type"])
            t = arr
        elif meta == "alternate":
            alt = AlternateType(name, "alternate", alt_names.get(name, name))
            types[name] = alt
            for m in ent["members"]:
                b = get(m["type"])
                alt.branches[json_kind(b)] = b
            t = alt
        elif meta == "object":
            obj = ObjectType(name, "object", tag=ent.get("tag"))
            types[name] = obj
            for m in ent["members"]:
                mt = get(m["type"])
                width = ints.get(f"{name}.{m['name']}")
                if width is not None:
                    if isinstance(mt, ArrayType):
                        mt = ArrayType(mt.name, "array", IntType("int", "int", width))
                    else:
                        mt = IntType("int", "int", width)
                obj.members.append(Member(m["name"], mt, "default" in m))
            for v in ent.get("variants", []):
                vt = get(v["type"])
                assert isinstance(vt, ObjectType)
                obj.variants[v["case"]] = vt
            t = obj
        else:
            raise ValueError(f"{name}: meta-type {meta} is not a type")
        return t

    for ent in entities:
        if ent["meta-type"] not in ("command", "event"):
            get(ent["name"])
    return types
