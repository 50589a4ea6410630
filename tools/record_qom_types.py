#!/usr/bin/env python3
"""Record qemu-storage-daemon 7.2's QOM type table for ``qom-list-types``
and ``qom-list-properties``.

Writes ``qmpgraph/schema/data/qom-types.json``:

* ``types``: every type (``qom-list-types`` with ``abstract: true``) in
  QEMU's reply order, each ``{"name", "abstract"?, "parent"?}``;
* ``implements``: for each type, the names of the types QEMU lists for
  ``implements: <type>`` (subclasses and, for interfaces, implementers,
  itself included), so any query can be answered by filtering ``types``;
* ``properties``: for each type, ``qom-list-properties``'s reply (a list),
  its error (``{"class", "desc"}``), or ``{"abort": <exit status>}`` where
  the query kills the daemon (QEMU 7.2 aborts for ``qio-net-listener``);
  the tool then starts a fresh daemon for the remaining types.

Members are stored in QAPI order so that qmpgraph's writer reproduces
QEMU's member order.  The tool checks its own premise: every filtered query
it made came back in the order of the full list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qsd_oracle import QSD

OUT = Path(__file__).resolve().parents[1] / "qmpgraph" / "schema" / "data" / "qom-types.json"
_TYPE_MEMBERS = ("name", "abstract", "parent")
_PROPERTY_MEMBERS = ("name", "type", "description", "default-value")


def _ordered(obj: dict[str, Any], members: tuple[str, ...]) -> dict[str, Any]:
    if set(obj) - set(members):
        raise RuntimeError(f"unexpected members in {obj!r}")
    return {k: obj[k] for k in members if k in obj}


def _answer(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        return {"class": reply["error"]["class"], "desc": reply["error"]["desc"]}
    return reply["return"]


def _properties(qsd: QSD, name: str) -> Any:
    try:
        answer = _answer(qsd.execute("qom-list-properties", {"typename": name}))
    except OSError:
        proc = qsd._proc  # the oracle keeps its process private; its exit status
        status = proc.wait(10) if proc is not None else None
        return {"abort": status}
    if isinstance(answer, list):
        answer = [_ordered(p, _PROPERTY_MEMBERS) for p in answer]
    return answer


def record(binary: str | None) -> dict[str, Any]:
    """Ask the daemon (a fresh one after each crash) for the whole table."""
    with QSD(binary) as qsd:
        full = qsd.execute("qom-list-types", {"abstract": True})["return"]
        types = [_ordered(t, _TYPE_MEMBERS) for t in full]
        names = [t["name"] for t in types]
        position = {n: i for i, n in enumerate(names)}
        implements: dict[str, list[str]] = {}
        for name in names:
            reply = qsd.execute("qom-list-types", {"implements": name, "abstract": True})
            got = [t["name"] for t in reply["return"]]
            if got != sorted(got, key=position.__getitem__):
                raise RuntimeError(f"implements={name}: not in the full list's order")
            implements[name] = got
        concrete = [t["name"] for t in qsd.execute("qom-list-types")["return"]]
        if concrete != [t["name"] for t in types if not t.get("abstract")]:
            raise RuntimeError("qom-list-types without abstract is not the full list filtered")
    properties: dict[str, Any] = {}
    pending = list(names)
    while pending:
        with QSD(binary) as qsd:
            while pending:
                name = pending.pop(0)
                properties[name] = answer = _properties(qsd, name)
                if isinstance(answer, dict) and "abort" in answer:
                    break
    return {"types": types, "implements": implements, "properties": properties}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qsd", help="qemu-storage-daemon binary (default: from PATH)")
    opts = ap.parse_args(argv)
    with QSD(opts.qsd) as qsd:
        version = qsd.greeting["QMP"]["version"]["qemu"]
    table = record(opts.qsd)
    table = {"qemu": version, **table}
    OUT.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(table['types'])} types to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
