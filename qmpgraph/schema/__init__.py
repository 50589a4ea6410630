"""QEMU 7.2's QMP schema: argument validation and introspection.

The data in ``data/`` is generated from the installed qemu-storage-daemon by
``tools/gen_schema.py`` (its docstring explains how the masked type names and
integer widths are recovered). ``load()`` reads it once; the ``Schema`` it
returns holds:

* the replay of QEMU's input visitor (``visitor``): every command's
  arguments go through it; it decides exactly as QEMU and words QEMU's first
  error (and costs well under 10 microseconds for typical arguments); its
  keyval flavour (``keyval_visitor``) types command-line options such as
  ``--blockdev`` written in keyval syntax;
* one compiled JSON Schema validator per command (``jsonschemas``), built at
  start-up: an independent, stricter cross-check (tests) and an export;
* the ``query-qmp-schema`` reply for the implemented commands (``introspect``),
  serialized once.

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
from qmpgraph.schema.introspect import qemu_key_order, restrict
from qmpgraph.schema.jsonschemas import compile_validators
from qmpgraph.schema.keyval_visitor import visit_keyval
from qmpgraph.schema.types import ObjectType, build_types
from qmpgraph.schema.visitor import visit_arguments

__all__ = ["Schema", "load"]


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
        # Commands that take no arguments at all: ``{}`` is the whole check.
        self._no_args = {name for name, t in self._arg_types.items() if not t.members}
        self._validators = compile_validators(self._arg_types)
        self._introspection: dict[frozenset[str], RawJSON] = {}

    def validate_arguments(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` as QEMU's input visitor would pass them to ``command``.

        Raises ``GenericError`` with QEMU's message for the first problem, in
        QEMU's visit order.
        """
        if not args and command in self._no_args:
            return args
        arg_type = self._arg_types.get(command)
        if arg_type is None:
            # Not a QEMU command: nothing to check it against; such a command
            # checks its own arguments (and is absent from introspection).
            return args
        return visit_arguments(arg_type, args)

    def validate_keyval_arguments(self, command: str, tree: dict[str, Any]) -> dict[str, Any]:
        """Keyval ``tree`` (string leaves, e.g. ``--blockdev``'s) as typed arguments
        of ``command``, by QEMU's keyval input visitor (``keyval_visitor``)."""
        return visit_keyval(self._arg_types[command], tree)

    def json_schema(self, command: str) -> Any:
        """The compiled JSON Schema validator of ``command``'s arguments
        (stricter than QEMU, see ``qmpgraph.schema.jsonschemas``)."""
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
    """The schema generated from QEMU 7.2's qemu-storage-daemon (loaded once)."""
    return Schema(_read("qmp-schema.json"), _read("qsd-probed.json"))
