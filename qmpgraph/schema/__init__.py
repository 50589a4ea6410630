"""QEMU 7.2's QMP schema: argument validation and introspection.

The data in ``data/`` is generated from the installed qemu-storage-daemon by
``tools/gen_schema.py`` (its docstring explains how the masked type names and
integer widths are recovered). ``load()`` reads it once; the ``Schema`` it
returns holds:

* one ``jsonschema`` validator per command (``jsonschemas``), compiled at
  start-up: the gate every command's arguments pass before any handler runs
  (1-5 microseconds for typical arguments);
* the replay of QEMU's input visitor (``visitor``), consulted only when the
  gate refuses: it words QEMU's first error in QEMU's order, or returns the
  arguments as QEMU would in fact take them (negative unsigned values wrapped);
  its keyval flavour (``keyval_visitor``) types command-line options such as
  ``--blockdev`` written in keyval syntax;
* the ``query-qmp-schema`` reply for the implemented commands (``introspect``),
  serialized once.

qmpgraph's downstream members (``data/downstream.json``, ``__org.qmpgraph_``
names) are merged into QEMU's entities before any of these is built.

The flow of ``validate_arguments``: validator accepts -> the arguments are
passed on as they are (the JSON Schema is never looser than QEMU, so QEMU
would pass them unchanged); validator refuses -> the visitor decides. The
result is QEMU's decision either way: a refusal the visitor overrules costs
time, never correctness. ``{}`` for a command whose validator accepted ``{}``
at start-up skips the call (a flag derived from the compiled validator).

What does not live here: the command table (``qmpgraph.commands.registry``);
the dispatcher that calls ``validate_arguments`` before any handler runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

from qmpgraph.protocol.qjson import RawJSON
from qmpgraph.schema import downstream
from qmpgraph.schema.introspect import qemu_key_order, restrict
from qmpgraph.schema.jsonschemas import compile_validators
from qmpgraph.schema.keyval_visitor import visit_keyval
from qmpgraph.schema.types import ObjectType, build_types
from qmpgraph.schema.visitor import visit_arguments

__all__ = ["Schema", "load", "load_qemu"]


class Schema:
    """QEMU's schema for qemu-storage-daemon: validators and introspection."""

    def __init__(self, entities: list[dict[str, Any]], probed: dict[str, Any]) -> None:
        self.entities = entities
        self.probed = probed
        types = build_types(entities, probed)
        commands = [e for e in entities if e["meta-type"] == "command"]
        self._arg_types: dict[str, ObjectType] = {}
        for cmd in commands:
            t = types[cmd["arg-type"]]
            assert isinstance(t, ObjectType)
            self._arg_types[cmd["name"]] = t
        #: Commands in QEMU's definition (= registration) order.
        self.command_names: list[str] = [c["name"] for c in commands]
        self._validators = compile_validators(self._arg_types)
        # Asked once: the verdict on ``{}`` never changes.
        self._accepts_empty = {n for n, v in self._validators.items() if v.is_valid({})}
        self._introspection: dict[frozenset[str], RawJSON] = {}

    def validate_arguments(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` as QEMU's input visitor would pass them to ``command``.

        The command's compiled JSON Schema validator is the gate; what it
        refuses goes to the visitor replay, which raises ``GenericError`` with
        QEMU's message for the first problem, in QEMU's visit order, or
        returns the arguments QEMU would in fact take.
        """
        if not args and command in self._accepts_empty:
            return args
        validator = self._validators.get(command)
        if validator is None:
            # Not a QEMU command: nothing to check it against; such a command
            # checks its own arguments (and is absent from introspection).
            return args
        if validator.is_valid(args):
            return args
        return visit_arguments(self._arg_types[command], args)

    def validate_keyval_arguments(self, command: str, tree: dict[str, Any]) -> dict[str, Any]:
        """Keyval ``tree`` (string leaves, e.g. ``--blockdev``'s) as typed arguments
        of ``command``, by QEMU's keyval input visitor (``keyval_visitor``)."""
        return visit_keyval(self._arg_types[command], tree)

    def arg_type(self, command: str) -> ObjectType:
        """``command``'s argument type (to build option types from its members,
        e.g. qsd's ``--nbd-server`` NbdServerOptions, absent from introspection)."""
        return self._arg_types[command]

    def json_schema(self, command: str) -> Any:
        """The compiled JSON Schema validator of ``command``'s arguments
        (never looser than QEMU, see ``qmpgraph.schema.jsonschemas``)."""
        return self._validators[command]

    def ordered_commands(self, implemented: Iterable[str]) -> list[str]:
        """``implemented`` commands that QEMU has, in QEMU's registration order."""
        wanted = set(implemented)
        return [c for c in self.command_names if c in wanted]

    def introspection(self, implemented: Iterable[str]) -> RawJSON:
        """The ``query-qmp-schema`` reply for the ``implemented`` commands.

        Serialized once per command set (``RawJSON`` caches the text).
        """
        key = frozenset(implemented)
        cached = self._introspection.get(key)
        if cached is None:
            kept = restrict(self.entities, key)
            cached = self._introspection[key] = RawJSON(qemu_key_order(kept))
        return cached


def _read(name: str) -> Any:
    return json.loads(resources.files("qmpgraph.schema").joinpath("data", name).read_text())


@cache
def load() -> Schema:
    """The schema generated from QEMU 7.2's qemu-storage-daemon (loaded once),
    with qmpgraph's downstream extensions merged (``downstream``)."""
    entities = downstream.apply(_read("qmp-schema.json"), _read("downstream.json"))
    return Schema(entities, _read("qsd-probed.json"))


@cache
def load_qemu() -> Schema:
    """QEMU 7.2's schema alone, without qmpgraph's downstream members (for
    comparisons with qemu-storage-daemon's own introspection)."""
    return Schema(_read("qmp-schema.json"), _read("qsd-probed.json"))
