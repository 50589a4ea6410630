"""The ``query-qmp-schema`` reply, restricted to what qmpgraph implements.

QEMU's reply lists commands and events in definition order, then the types
they use; type names are masked numbers. qmpgraph answers with the same
entities, in the same order and with the same masked names, keeping:

* the commands it implements (a client must never see a command that then
  answers CommandNotFound);
* every event qemu-storage-daemon declares: they are part of the daemon's
  interface whichever of them this version emits, and a client's event
  handlers must keep matching QEMU's definitions;
* every type reachable from those commands' arguments and returns and from
  the events' data.

Masked names are not renumbered: they are opaque, and keeping QEMU's numbers
keeps a type's name stable whatever subset is implemented.

What does not live here: the data files (``tools/gen_schema.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Entity = dict[str, Any]


def qemu_key_order(value: Any) -> Any:
    """``value`` with every object's keys re-inserted so that QDict order
    (``qjson.qdict_order``) reproduces the order QEMU printed them in.

    QDict iterates one hash bucket at a time, newest key first within a
    bucket; inserting the printed keys in reverse gives exactly that.
    """
    if isinstance(value, dict):
        return {k: qemu_key_order(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [qemu_key_order(v) for v in value]
    return value


def _type_refs(ent: Entity) -> Iterable[str]:
    meta = ent["meta-type"]
    if meta == "command":
        yield ent["arg-type"]
        yield ent["ret-type"]
    elif meta == "event":
        yield ent["arg-type"]
    elif meta == "object":
        for m in ent["members"]:
            yield m["type"]
        for v in ent.get("variants", []):
            yield v["type"]
    elif meta == "array":
        yield ent["element-type"]
    elif meta == "alternate":
        for m in ent["members"]:
            yield m["type"]


def restrict(entities: list[Entity], commands: Iterable[str]) -> list[Entity]:
    """QEMU's entity list keeping ``commands``, all events and what they reach."""
    wanted = set(commands)
    by_name = {e["name"]: e for e in entities}
    keep: set[str] = set()
    todo = [
        e["name"]
        for e in entities
        if e["meta-type"] == "event" or (e["meta-type"] == "command" and e["name"] in wanted)
    ]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(_type_refs(by_name[name]))
    return [e for e in entities if e["name"] in keep]
