"""qmpgraph's downstream schema extensions, merged into QEMU's schema at load.

``data/downstream.json`` lists members qmpgraph adds to QEMU 7.2's types;
their names carry the ``__RFQDN_`` prefix the QMP specification reserves
for downstream extensions (``__org.qmpgraph_...``), so no QEMU client can
mistake them for upstream members.  ``apply(entities, overlay)`` returns
the introspected entity list with them merged, so argument validation, the
keyval visitor (``--blockdev``) and ``query-qmp-schema`` all see one schema.

Only one kind of addition exists so far, ``variant-members``: optional
members added to one variant of every flat union tagged ``tag`` (the
``driver`` unions: blockdev-add's and blockdev-reopen's BlockdevOptions).
QEMU shares one masked object type between many variants (``snapshot-access``
uses the generic format options of bochs, cloop, ...), so the variant gets
a new object type of its own: the shared type's members plus the added
ones, named with the next free masked number.  Every other entity is left
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


def apply(entities: list[Entity], overlay: dict[str, Any]) -> list[Entity]:
    """``entities`` (QEMU's SchemaInfo list) with ``overlay``'s additions merged."""
    out = copy.deepcopy(entities)
    by_name = {e["name"]: e for e in out}
    for addition in overlay.get("variant-members", []):
        tag, case = addition["tag"], addition["case"]
        added = [{k: v for k, v in m.items()} for m in addition["members"]]
        made: dict[str, str] = {}  # QEMU's variant type -> its extended copy
        for ent in list(out):
            if ent["meta-type"] != "object" or ent.get("tag") != tag:
                continue
            for variant in ent.get("variants", []):
                if variant["case"] != case:
                    continue
                old = variant["type"]
                if old not in made:
                    name = str(_next_name(out))
                    base = by_name[old]
                    new = {
                        "name": name,
                        "members": [*copy.deepcopy(base["members"]), *added],
                        "meta-type": "object",
                    }
                    out.append(new)
                    by_name[name] = new
                    made[old] = name
                variant["type"] = made[old]
    return out
