"""``qom-list-types`` and ``qom-list-properties``: qemu-storage-daemon's QOM types.

The answers are qemu-storage-daemon 7.2's own, recorded from the real
daemon by ``tools/record_qom_types.py`` into
``qmpgraph/schema/data/qom-types.json``: the full type list in QEMU's
order, which types each type's ``implements`` matches, and each type's
property list (or error).  They are served as recorded, including the types
qmpgraph does not model (chardevs, TLS credentials, ...), because they are
facts about the daemon qmpgraph stands in for: a management tool probes
them to learn what the daemon is (e.g. whether ``throttle-group`` or
``iothread`` exist and which properties they take), and it learns about an
unmodelled type from ``object-add``'s refusal, as it would from any
command's.

One deliberate departure: ``qom-list-properties`` of ``qio-net-listener``
aborts QEMU 7.2 (an assertion in the type's instance setup); qmpgraph
answers it with an error instead of dying.

What does not live here: the object tree and ``qom-list``/``qom-get``
(``qom.py``, ``qmpgraph.objects``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.errors import DeviceNotFound, GenericError


@cache
def _table() -> dict[str, Any]:
    text = resources.files("qmpgraph.schema").joinpath("data", "qom-types.json").read_text()
    table: dict[str, Any] = json.loads(text)
    return table


@command("qom-list-types")
def qom_list_types(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Types (abstract ones only if asked), optionally those implementing one."""
    table = _table()
    abstract = bool(args.get("abstract", False))
    implements = args.get("implements")
    wanted: set[str] | None = None
    if implements is not None:
        # An unknown type matches nothing (object_class_by_name gives NULL).
        wanted = set(table["implements"].get(implements, ()))
    return [
        dict(t)
        for t in table["types"]
        if (abstract or not t.get("abstract")) and (wanted is None or t["name"] in wanted)
    ]


@command("qom-list-properties")
def qom_list_properties(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The properties of an instance of ``typename`` (class ones for abstract types)."""
    name = str(args["typename"])
    answer = _table()["properties"].get(name)
    if answer is None:
        raise DeviceNotFound(f"Class '{name}' not found")
    if isinstance(answer, dict):
        if "abort" in answer:
            raise GenericError(f"Listing the properties of '{name}' aborts qemu-storage-daemon")
        raise GenericError(str(answer["desc"]))
    return [dict(p) for p in answer]
