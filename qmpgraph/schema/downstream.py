"""qmpgraph's downstream schema extensions, merged into QEMU's schema at load.

``data/downstream.json`` lists members qmpgraph adds to QEMU 7.2's types;
their names carry the ``__RFQDN_`` prefix the QMP specification reserves
for downstream extensions (``__org.qmpgraph_...``), so no QEMU client can
mistake them for upstream members.  ``apply(entities, overlay)`` returns
the introspected entity list with them merged, so argument validation, the
keyval visitor (``--blockdev``) and ``query-qmp-schema`` all see one schema.

Only one kind of addition exists so far, ``variant-members``: optional
members added to one variant of one flat union, named as "arg-type of
COMMAND" (``blockdev-add``'s BlockdevOptions, which ``blockdev-reopen`` and
``--blockdev`` use too; other unions tagged ``driver``, such as
BlockdevCreateOptions, are not touched).  QEMU shares one masked object
type between many variants (``snapshot-access`` uses the generic format
options of bochs, cloop, ...), so the variant gets a new object type of its
own: the shared type's members plus the added ones, named with the next
free masked number.  Every other entity is left
exactly as QEMU printed it.

What does not live here: the generated data (``tools/gen_schema.py``), what
the added members do (the drivers and commands that read them).
"""

from __future__ import annotations

import copy
from typing import Any

Entity = dict[str, Any]


def _next_name(entities: list[Entity]) -> int:
    return 1 + max((int(e["name"]) for e in entities if str(e["name"]).isdigit()), default=0)


def _union(by_name: dict[str, Entity], where: str) -> Entity:
    """The union named by ``where``: "arg-type of COMMAND"."""
    what, _, command = where.partition(" of ")
    if what != "arg-type" or command not in by_name:
        raise ValueError(f"downstream.json: cannot find the union '{where}'")
    return by_name[by_name[command]["arg-type"]]


def apply(entities: list[Entity], overlay: dict[str, Any]) -> list[Entity]:
    """``entities`` (QEMU's SchemaInfo list) with ``overlay``'s additions merged."""
    out = copy.deepcopy(entities)
    by_name = {e["name"]: e for e in out}
    for addition in overlay.get("variant-members", []):
        union = _union(by_name, addition["union"])
        variant = next(v for v in union["variants"] if v["case"] == addition["case"])
        name = str(_next_name(out))
        new = {
            "name": name,
            "members": [*copy.deepcopy(by_name[variant["type"]]["members"]),
                        *copy.deepcopy(addition["members"])],
            "meta-type": "object",
        }  # fmt: skip
        out.append(new)
        by_name[name] = new
        variant["type"] = name
    return out
