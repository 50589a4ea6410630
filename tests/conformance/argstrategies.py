"""Hypothesis strategies: schema-valid QMP arguments, biased to hit the graph.

The approach of ``tests/schema/test_schema_gate.py`` (values drawn from the
type model, depth-bounded so recursive types such as ``BlockdevRef`` end),
with the valid-only mode and biases that make commands get past their
first checks: strings are often the names of nodes that exist or of files
in the working directory; integers are often edge values (0, sizes, the
limits of their width); a ``driver`` is usually one qmpgraph implements;
block node options usually name their node. Strings never contain ``/``: every filename stays
relative to the working directory, which the tests set to a temp dir.

What does not live here: the daemon fixture and the assertions
(``test_bad_input.py``).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from qmpgraph.drivers import REGISTRY as DRIVERS
from qmpgraph.schema import load
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

SCHEMA = load()
# Past this depth alternates take a non-object branch and optional members
# are left out, so recursive types end.
MAX_DEPTH = 3

#: Node names the fuzzed daemon's graph starts with (see test_bad_input.py).
NODE_NAMES = ["null0", "file0", "qcow0", "raw0"]
#: Files in the working directory: the qcow2 image, a raw file, a missing one.
FILE_NAMES = ["image.qcow2", "raw.img", "missing.img", "new.img"]

_TEXT = st.text(alphabet=st.characters(blacklist_characters="/"), max_size=4)
# Existing node names come up most: lookups are the first check of most commands.
STRINGS = st.one_of(
    st.sampled_from(NODE_NAMES),
    st.sampled_from(NODE_NAMES + FILE_NAMES + ["", "#block123", "n1", "obj0", "json:{}"]),
    _TEXT,
)

# Values for the schema's ``any``: every JSON kind.
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    STRINGS,
    st.just([]),
    st.just({}),
    st.just({"driver": "null-co"}),
)


def _int(width: str) -> st.SearchStrategy[int]:
    signed, bits = INT_KINDS[width]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (0, 1, -1, 512, 4096, 1 << 20, 1 << 30, 1 << 62) if lo <= v <= hi]
    return st.one_of(st.sampled_from([lo, hi, *edges]), st.integers(lo, hi))


def values(t: QType, depth: int) -> st.SearchStrategy[Any]:
    """Valid values of type ``t``."""
    return st.deferred(lambda: _valid(t, depth))


def _valid(t: QType, depth: int) -> st.SearchStrategy[Any]:
    kind = t.kind
    if kind == "int":
        assert isinstance(t, IntType)
        return _int(t.width)
    if kind == "str":
        return STRINGS
    if kind == "bool":
        return st.booleans()
    if kind == "number":
        return st.one_of(st.integers(-(2**63), 2**64), st.floats(allow_nan=False))
    if kind == "null":
        return st.none()
    if kind == "any":
        return ANY
    if kind == "enum":
        assert isinstance(t, EnumType)
        return st.sampled_from(sorted(t.values))
    if kind == "array":
        assert isinstance(t, ArrayType) and t.element is not None
        return st.lists(values(t.element, depth + 1), max_size=3)
    if isinstance(t, AlternateType):
        branches = list(t.branches.values())
        if depth >= MAX_DEPTH:
            branches = [b for b in branches if b.kind != "object"] or branches
        return st.one_of([values(b, depth) for b in branches])
    assert isinstance(t, ObjectType)
    return objects(t, depth)


def objects(t: ObjectType, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of type ``t`` (a struct, or a union with a chosen case)."""
    if t.tag is None:
        return _members(t.members, {}, depth)
    tag = next(m for m in t.members if m.name == t.tag)
    assert isinstance(tag.type, EnumType)

    def case(value: str) -> st.SearchStrategy[dict[str, Any]]:
        base = _members(t.members, {t.tag or "": value}, depth)
        variant = t.variants.get(value)
        if variant is None:
            return base
        return st.tuples(base, objects(variant, depth)).map(lambda p: {**p[0], **p[1]})

    made = _tag_values(t.tag, sorted(tag.type.values)).flatmap(case)
    if t.tag != "driver":
        return made
    # Block node options (blockdev-add, blockdev-reopen's list, inline
    # children): without a node-name the top level stops at its first check.
    names = st.sampled_from(["n1", "n2", *NODE_NAMES])
    return st.tuples(made, st.one_of(names, names, names, st.none())).map(
        lambda p: p[0] if p[1] is None or "node-name" in p[0] else {**p[0], "node-name": p[1]}
    )


def _tag_values(tag: str, values: list[str]) -> st.SearchStrategy[str]:
    # Two draws in three pick an implemented driver: the others stop at
    # "Unknown driver" and test little past it.
    implemented = [v for v in values if v in DRIVERS] if tag == "driver" else []
    if not implemented:
        return st.sampled_from(values)
    return st.one_of(
        st.sampled_from(implemented), st.sampled_from(implemented), st.sampled_from(values)
    )


def _members(
    members: list[Member], fixed: dict[str, Any], depth: int
) -> st.SearchStrategy[dict[str, Any]]:
    required = {
        m.name: st.just(fixed[m.name]) if m.name in fixed else values(m.type, depth + 1)
        for m in members
        if not m.optional or m.name in fixed
    }
    optional = {}
    if depth < MAX_DEPTH:
        optional = {
            m.name: values(m.type, depth + 1) for m in members if m.optional and m.name not in fixed
        }
    return st.fixed_dictionaries(required, optional=optional)


def arguments(command: str) -> st.SearchStrategy[dict[str, Any]]:
    """Schema-valid arguments of ``command``."""
    return objects(SCHEMA._arg_types[command], 0)


def requests(commands: list[str]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(command, arguments) for one of ``commands`` (blockdev-add drawn more often:
    it builds the graph the other commands act on)."""
    weighted = [*commands, *["blockdev-add"] * 3 * ("blockdev-add" in commands)]
    return st.sampled_from(weighted).flatmap(lambda c: st.tuples(st.just(c), arguments(c)))
