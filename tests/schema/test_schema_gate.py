"""The jsonschema gate of ``validate_arguments`` decides exactly as QEMU.

* ``validate_arguments`` really consults the command's compiled validator:
  its verdict decides whether the visitor replay runs at all.
* Arguments generated from the type model (every command, every union case
  and alternate branch reachable): when valid by construction the gate
  accepts them (the fast path is the common path); when mutated, the gate
  never accepts what the visitor refuses or would change, and
  ``validate_arguments`` answers exactly as the visitor.
* The fast keyword implementations agree with stock ``jsonschema`` (its own
  Draft 2020-12 keywords, the two QMP keywords written the plain way).
* Every exported document is JSON and a valid Draft 2020-12 schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import jsonschema.validators
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmpgraph.schema
from qmpgraph.errors import GenericError
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
from qmpgraph.schema.visitor import visit_arguments

SCHEMA = load()
COMMANDS = SCHEMA.command_names
# Past this depth, alternates take a non-object branch and optional members
# are left out, so recursive types (BlockdevRef) end.
MAX_DEPTH = 3

# Values of any JSON kind that replace a generated value in mutated mode.
ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1.5, 255, 256, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 2**64]),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.text(max_size=3),
    st.just([]),
    st.just({}),
    st.just({"x": 1}),
)


def _int(width: str, mutate: bool) -> st.SearchStrategy[Any]:
    signed, bits = INT_KINDS[width]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    valid = st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi]))
    if mutate:
        return st.one_of(valid, st.sampled_from([lo - 1, hi + 1, -1]))
    return valid


def values(t: QType, depth: int, mutate: bool) -> st.SearchStrategy[Any]:
    """Values of type ``t``; in ``mutate`` mode sometimes of another shape."""
    valid = st.deferred(lambda: _valid(t, depth, mutate))
    return _rarely(valid, ODD) if mutate else valid


def _rarely(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # One value in ten goes wrong: most arguments have one or two faults.
    return st.integers(0, 9).flatmap(lambda n: odd if n == 0 else usual)


def _valid(t: QType, depth: int, mutate: bool) -> st.SearchStrategy[Any]:
    kind = t.kind
    if kind == "int":
        assert isinstance(t, IntType)
        return _int(t.width, mutate)
    if kind == "str":
        return st.text(max_size=3)
    if kind == "bool":
        return st.booleans()
    if kind == "number":
        return st.one_of(st.integers(), st.floats(allow_nan=False))
    if kind == "null":
        return st.none()
    if kind == "any":
        return ODD
    if kind == "enum":
        assert isinstance(t, EnumType)
        return st.sampled_from(sorted(t.values))
    if kind == "array":
        assert isinstance(t, ArrayType) and t.element is not None
        return st.lists(values(t.element, depth + 1, mutate), max_size=2)
    if isinstance(t, AlternateType):
        branches = list(t.branches.values())
        if depth >= MAX_DEPTH:
            branches = [b for b in branches if b.kind != "object"] or branches
        return st.one_of([values(b, depth, mutate) for b in branches])
    assert isinstance(t, ObjectType)
    return objects(t, depth, mutate)


def objects(t: ObjectType, depth: int, mutate: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of type ``t`` (a struct, or a union with a chosen case)."""
    if t.tag is None:
        return _members(t.members, {}, depth, mutate)
    tag = next(m for m in t.members if m.name == t.tag)
    assert isinstance(tag.type, EnumType)

    def case(value: str) -> st.SearchStrategy[dict[str, Any]]:
        base = _members(t.members, {t.tag or "": value}, depth, mutate)
        variant = t.variants.get(value)
        if variant is None:
            return base
        return st.tuples(base, objects(variant, depth, mutate)).map(lambda p: {**p[0], **p[1]})

    return st.sampled_from(sorted(tag.type.values)).flatmap(case)


def _members(
    members: list[Member], fixed: dict[str, Any], depth: int, mutate: bool
) -> st.SearchStrategy[dict[str, Any]]:
    required = {
        m.name: st.just(fixed[m.name]) if m.name in fixed else values(m.type, depth + 1, mutate)
        for m in members
        if not m.optional or m.name in fixed
    }
    optional = {}
    if depth < MAX_DEPTH:
        optional = {
            m.name: values(m.type, depth + 1, mutate)
            for m in members
            if m.optional and m.name not in fixed
        }
    made = st.fixed_dictionaries(required, optional=optional)
    if not mutate:
        return made
    return _rarely(made, made.flatmap(_mutate_keys))


def _mutate_keys(d: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    # Drop a member or add an unknown one.
    drop = st.sampled_from(sorted(d)).map(lambda k: {x: v for x, v in d.items() if x != k})
    add = st.sampled_from(["x", "node-name", "driver", "file"]).map(lambda k: {**d, k: 1})
    return st.one_of(drop, add) if d else add


def arguments(
    mutate: bool, commands: list[str] = COMMANDS
) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(command, arguments) drawn from the type model."""
    return st.sampled_from(commands).flatmap(
        lambda c: st.tuples(st.just(c), objects(SCHEMA._arg_types[c], 0, mutate))
    )


def _visitor(command: str, args: dict[str, Any]) -> tuple[str, Any]:
    try:
        return ("ok", visit_arguments(SCHEMA._arg_types[command], args))
    except GenericError as err:
        return ("error", err.desc)


def _gate(command: str, args: dict[str, Any]) -> tuple[str, Any]:
    try:
        return ("ok", SCHEMA.validate_arguments(command, args))
    except GenericError as err:
        return ("error", err.desc)


FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(arguments(mutate=False))
def test_valid_arguments_take_the_fast_path(case: tuple[str, dict[str, Any]]) -> None:
    command, args = case
    assert SCHEMA.json_schema(command).is_valid(args)
    assert _visitor(command, args) == ("ok", args)
    assert SCHEMA.validate_arguments(command, args) is args


# The commands with the deepest argument types get a test of their own.
DEEP = ["blockdev-add", "blockdev-reopen", "transaction", "nbd-server-start", "object-add"]


@FAST
@given(arguments(mutate=False, commands=DEEP))
def test_valid_deep_arguments_take_the_fast_path(case: tuple[str, dict[str, Any]]) -> None:
    command, args = case
    assert SCHEMA.json_schema(command).is_valid(args)
    assert _visitor(command, args) == ("ok", args)


@FAST
@given(st.one_of(arguments(mutate=True), arguments(mutate=True, commands=DEEP)))
def test_gate_decides_exactly_as_the_visitor(case: tuple[str, dict[str, Any]]) -> None:
    command, args = case
    expected = _visitor(command, args)
    if SCHEMA.json_schema(command).is_valid(args):
        assert expected == ("ok", args)
    assert _gate(command, args) == expected


# --- stock jsonschema as the reference for the fast keywords -----------------


def _plain_union(validator: Any, spec: Any, instance: Any, _schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    value = instance.get(spec["tag"])
    cases = spec["cases"]
    if not isinstance(value, str) or value not in cases:
        yield jsonschema.ValidationError(f"{value!r} is not a case")
        return
    yield from validator.descend(instance, cases[value])


def _plain_alternate(validator: Any, branches: Any, instance: Any, _schema: Any) -> Iterator[Any]:
    for kind, branch in branches.items():
        json_types = ["integer", "number"] if kind == "number" else [kind]
        if any(validator.is_type(instance, t) for t in json_types):
            yield from validator.descend(instance, branch)
            return
    yield jsonschema.ValidationError(f"{instance!r} matches no branch")


def _reference(document: Any) -> Any:
    real = SCHEMA.json_schema(COMMANDS[0])
    cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        validators={"qmpUnion": _plain_union, "qmpAlternate": _plain_alternate},
        type_checker=real.TYPE_CHECKER,
    )
    return cls(document)


REFERENCE = {c: _reference(SCHEMA.json_schema(c).schema) for c in COMMANDS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(arguments(mutate=True), arguments(mutate=True, commands=DEEP)))
def test_fast_keywords_agree_with_stock_jsonschema(case: tuple[str, dict[str, Any]]) -> None:
    command, args = case
    assert SCHEMA.json_schema(command).is_valid(args) == REFERENCE[command].is_valid(args)


# --- the dispatch path consults the validator -------------------------------


class _Spy:
    def __init__(self, real: Any, verdict: bool | None = None) -> None:
        self.real = real
        self.verdict = verdict
        self.calls: list[Any] = []

    def is_valid(self, instance: Any) -> bool:
        self.calls.append(instance)
        real: bool = self.real.is_valid(instance)
        return real if self.verdict is None else self.verdict


def test_validate_arguments_consults_the_compiled_validator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = qmpgraph.schema.Schema(SCHEMA.entities, SCHEMA.probed)
    spy = _Spy(schema.json_schema("blockdev-add"))
    monkeypatch.setitem(schema._validators, "blockdev-add", spy)
    visited: list[Any] = []
    real_visit = visit_arguments

    def visit(t: ObjectType, args: dict[str, Any]) -> dict[str, Any]:
        visited.append(args)
        return real_visit(t, args)

    monkeypatch.setattr("qmpgraph.schema.visit_arguments", visit)
    args = {"driver": "null-co", "node-name": "n0"}
    assert schema.validate_arguments("blockdev-add", args) is args
    assert spy.calls == [args]
    assert visited == []  # accepted by the gate: no replay

    bad = {"driver": "null-co", "size": "big"}
    with pytest.raises(GenericError, match="Invalid parameter type for 'size', expected: integer"):
        schema.validate_arguments("blockdev-add", bad)
    assert spy.calls[-1] is bad
    assert visited == [bad]  # refused by the gate: the replay words it

    # The verdict is what decides: a gate that refused everything would send
    # even valid arguments to the replay.
    spy.verdict = False
    assert schema.validate_arguments("blockdev-add", args) == args
    assert visited[-1] is args


def test_empty_arguments_flag_comes_from_the_validator() -> None:
    for command in COMMANDS:
        accepts = SCHEMA.json_schema(command).is_valid({})
        assert (command in SCHEMA._accepts_empty) is accepts
    assert SCHEMA.validate_arguments("query-version", {}) == {}
    with pytest.raises(GenericError, match="Parameter 'node-name' is missing"):
        SCHEMA.validate_arguments("blockdev-del", {})


@pytest.mark.parametrize(
    ("command", "args", "key"),
    [
        ("block-set-write-threshold", {"node-name": "n", "write-threshold": -1}, "write-threshold"),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": -2}, "latency-ns"),
    ],
)
def test_negative_unsigned_values_are_refused_then_wrapped(
    command: str, args: dict[str, Any], key: str
) -> None:
    # QEMU accepts a negative int64 for a uint64 member and wraps it: the
    # gate must refuse it, so that the visitor hands on the wrapped value.
    assert not SCHEMA.json_schema(command).is_valid(args)
    out = SCHEMA.validate_arguments(command, args)
    assert out == {**args, key: args[key] % 2**64}


def test_exported_documents_are_json_schema() -> None:
    for command in COMMANDS:
        document = SCHEMA.json_schema(command).schema
        json.dumps(document)
        jsonschema.Draft202012Validator.check_schema(document)
