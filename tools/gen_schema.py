"""Generate ``qmpgraph/schema/data/`` from the installed qemu-storage-daemon.

Usage: ``python tools/gen_schema.py [--qsd PATH] [--check]``

Writes two committed files:

``qmp-schema.json``
    The ``query-qmp-schema`` reply of a freshly started qsd, verbatim (the
    list of SchemaInfo objects, member order as QEMU printed them).

``qsd-probed.json``
    What introspection masks but QEMU's own error messages reveal:

    * ``alternates``: masked alternate name -> QEMU's real type name. QEMU
      names the alternate when a value of the wrong JSON type is given
      ("Invalid parameter type for 'file', expected: BlockdevRef").
    * ``integers``: ``"<masked object>.<member>"`` -> the integer's real
      width (``int8`` ... ``int64``, ``uint8`` ... ``uint64``). Introspection
      collapses every width (and ``size``) into ``int``, but QEMU's messages
      differ: a signed member rejects a string with "Invalid parameter type
      for 'x', expected: integer", an unsigned one with "Parameter 'x' expects
      uint64"; a narrow member rejects an out-of-range value with "Parameter
      'x' expects uint32_t". ``size`` behaves exactly as ``uint64`` in the
      JSON input visitor, so it is recorded as ``uint64``. For ``[int]``
      members the width is the element's.

How the probing works (the honest source is QEMU itself, not its C headers):
for every object type reachable from a command's arguments, the generator
builds the smallest argument set QEMU's input visitor accepts up to that
object (required members filled with minimal valid values, union tags set to
reach variants), puts a deliberately wrong value in the probed member, and
adds one unknown top-level key. QEMU reports the first problem in visit
order; a value it accepts still ends in "Parameter '...' is unexpected"
(leftover keys are checked last), so no probed command ever executes. The
generator aborts if one does.

What does not live here: loading the data and validating arguments
(``qmpgraph.schema``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qsd_oracle import QSD

DATA_DIR = Path(__file__).resolve().parent.parent / "qmpgraph" / "schema" / "data"
SCHEMA_FILE = "qmp-schema.json"
PROBED_FILE = "qsd-probed.json"
#: A key no QEMU command has: it makes every probe fail before execution.
PROBE_KEY = "qmpgraph-probe"

Entity = dict[str, Any]
Wrap = Callable[[dict[str, Any]], dict[str, Any]]


def _in_list(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda d: [inner(d)]


class SchemaWalker:
    """Builds minimal valid values and routes into a masked schema."""

    def __init__(self, entities: list[Entity]) -> None:
        self.by_name = {e["name"]: e for e in entities}

    def minimal(self, tname: str, depth: int = 0) -> Any:
        """A small value of type ``tname`` that QEMU's input visitor accepts."""
        if depth > 40:
            raise RuntimeError(f"no finite minimal value for {tname}")
        ent = self.by_name[tname]
        meta = ent["meta-type"]
        if meta == "builtin":
            return {
                "string": "x",
                "int": 0,
                "number": 0,
                "boolean": False,
                "null": None,
                "value": {},
            }[ent["json-type"]]
        if meta == "enum":
            return ent["values"][0]
        if meta == "array":
            return []
        if meta == "alternate":
            # Prefer a scalar branch: it needs no further members.
            branches = [m["type"] for m in ent["members"]]
            for b in branches:
                if self.by_name[b]["meta-type"] != "object":
                    return self.minimal(b, depth + 1)
            return self.minimal(branches[0], depth + 1)
        return self.minimal_object(tname, None, depth)

    def minimal_object(self, tname: str, case: str | None, depth: int = 0) -> dict[str, Any]:
        """Required members of object ``tname`` (tag set to ``case`` if given)."""
        ent = self.by_name[tname]
        out: dict[str, Any] = {}
        for m in ent["members"]:
            if "default" not in m:
                out[m["name"]] = self.minimal(m["type"], depth + 1)
        tag = ent.get("tag")
        if tag is not None:
            if case is not None:
                out[tag] = case
            chosen = out[tag]
            for v in ent["variants"]:
                if v["case"] == chosen:
                    out.update(self.minimal_object(v["type"], None, depth + 1))
        return out

    def routes(self, commands: list[Entity]) -> dict[str, tuple[str, Wrap]]:
        """For each object type reachable from command arguments: a command and
        a function placing a dict for that object into that command's arguments.
        Breadth-first, so routes are the shortest."""
        found: dict[str, tuple[str, Wrap]] = {}
        queue: deque[str] = deque()
        for cmd in commands:
            arg = cmd["arg-type"]
            if arg not in found:
                found[arg] = (cmd["name"], lambda d: d)
                queue.append(arg)
        while queue:
            oname = queue.popleft()
            cmd_name, wrap = found[oname]
            ent = self.by_name[oname]
            for m in ent["members"]:
                for target, inner in self._member_targets(m["type"]):
                    if target not in found:
                        found[target] = (
                            cmd_name,
                            self._member_wrap(wrap, oname, m["name"], inner),
                        )
                        queue.append(target)
            for v in ent.get("variants", []):
                if v["type"] not in found:
                    found[v["type"]] = (cmd_name, self._variant_wrap(wrap, oname, v["case"]))
                    queue.append(v["type"])
        return found

    def _member_targets(self, tname: str) -> list[tuple[str, Callable[[Any], Any]]]:
        ent = self.by_name[tname]
        meta = ent["meta-type"]
        if meta == "object":
            return [(tname, lambda d: d)]
        if meta == "array":
            return [(t, _in_list(f)) for t, f in self._member_targets(ent["element-type"])]
        if meta == "alternate":
            out: list[tuple[str, Callable[[Any], Any]]] = []
            for b in ent["members"]:
                if self.by_name[b["type"]]["meta-type"] == "object":
                    out.append((b["type"], lambda d: d))
            return out
        return []

    def _member_wrap(
        self, outer: Wrap, oname: str, member: str, inner: Callable[[Any], Any]
    ) -> Wrap:
        def wrap(d: dict[str, Any]) -> dict[str, Any]:
            parent = self.minimal_object(oname, None)
            parent[member] = inner(d)
            return outer(parent)

        return wrap

    def _variant_wrap(self, outer: Wrap, oname: str, case: str) -> Wrap:
        tag = self.by_name[oname]["tag"]

        def wrap(d: dict[str, Any]) -> dict[str, Any]:
            base = {
                m["name"]: self.minimal(m["type"])
                for m in self.by_name[oname]["members"]
                if "default" not in m
            }
            base[tag] = case
            base.update(d)
            return outer(base)

        return wrap


_EXPECTED = re.compile(r"^Invalid parameter type for '[^']*', expected: (.+)$")
_EXPECTS = re.compile(r"^Parameter '[^']*' expects (.+)$")


class Prober:
    """Sends probes through a live qsd and interprets the error text."""

    def __init__(self, qsd: QSD, walker: SchemaWalker, commands: list[Entity]) -> None:
        self.qsd = qsd
        self.walker = walker
        self.routes = walker.routes(commands)

    def _send(self, oname: str, member: str, value: Any) -> str:
        cmd, wrap = self.routes[oname]
        d = self.walker.minimal_object(oname, None)
        d[member] = value
        args = wrap(d)
        args[PROBE_KEY] = True
        desc = self.qsd.error_desc(cmd, args)
        if desc is None:
            raise RuntimeError(f"probe executed {cmd} {args!r}: refusing to go on")
        return desc

    def _probe_value(self, oname: str, member: str, value: Any, array: bool) -> str:
        return self._send(oname, member, [value] if array else value)

    def integer_width(self, oname: str, member: str, array: bool) -> str:
        """The real integer type of ``member`` of object ``oname``."""
        desc = self._probe_value(oname, member, "x", array)
        if _EXPECTED.match(desc) and desc.endswith("expected: integer"):
            big: int = 2**63 - 1
            signed = True
        elif (m := _EXPECTS.match(desc)) and m.group(1) == "uint64":
            big = 2**64 - 1
            signed = False
        else:
            raise RuntimeError(f"unexpected reply probing {oname}.{member}: {desc}")
        desc = self._probe_value(oname, member, big, array)
        m = _EXPECTS.match(desc)
        if m and m.group(1).endswith("_t"):
            return m.group(1)[: -len("_t")]
        if desc == f"Parameter '{PROBE_KEY}' is unexpected":
            return "int64" if signed else "uint64"
        raise RuntimeError(f"unexpected reply probing width of {oname}.{member}: {desc}")

    def alternate_name(self, oname: str, member: str, alt: Entity, array: bool) -> str:
        """QEMU's real name of alternate ``alt`` (the type of ``oname.member``)."""
        jtypes = set()
        for b in alt["members"]:
            ent = self.walker.by_name[b["type"]]
            meta = ent["meta-type"]
            if meta == "builtin":
                jtypes.add(ent["json-type"])
            elif meta == "enum":
                jtypes.add("string")
            elif meta == "object":
                jtypes.add("object")
            elif meta == "array":
                jtypes.add("array")
        candidates: list[tuple[str, Any]] = [
            ("array", [[]]),
            ("boolean", True),
            ("number", 1.5),
            ("null", None),
            ("string", "x"),
            ("object", {}),
        ]
        for jtype, value in candidates:
            if jtype in jtypes or (jtype == "number" and "int" in jtypes):
                continue
            # Arrays are wrapped once more so a bare list is not taken as the
            # alternate's own list branch.
            probe = value[0] if jtype == "array" else value
            desc = self._probe_value(oname, member, probe, array)
            m = _EXPECTED.match(desc)
            if not m:
                raise RuntimeError(f"unexpected reply probing alternate {alt['name']}: {desc}")
            return m.group(1)
        raise RuntimeError(f"alternate {alt['name']} accepts every JSON type")


def probe_all(qsd: QSD, entities: list[Entity]) -> dict[str, Any]:
    """Probe every integer member and alternate reachable from command arguments."""
    walker = SchemaWalker(entities)
    commands = [e for e in entities if e["meta-type"] == "command"]
    prober = Prober(qsd, walker, commands)
    integers: dict[str, str] = {}
    alternates: dict[str, str] = {}
    for oname in prober.routes:
        for m in walker.by_name[oname]["members"]:
            tname = m["type"]
            ent = walker.by_name[tname]
            array = ent["meta-type"] == "array"
            if array:
                tname = ent["element-type"]
                ent = walker.by_name[tname]
            if tname == "int":
                integers[f"{oname}.{m['name']}"] = prober.integer_width(oname, m["name"], array)
            elif ent["meta-type"] == "alternate" and tname not in alternates:
                alternates[tname] = prober.alternate_name(oname, m["name"], ent, array)
    return {
        "alternates": dict(sorted(alternates.items(), key=lambda kv: int(kv[0]))),
        "integers": dict(sorted(integers.items())),
    }


def generate(qsd_path: str | None = None) -> tuple[list[Entity], dict[str, Any]]:
    """Run a fresh qsd; return its introspection and the probed side data."""
    with QSD(qsd_path) as qsd:
        entities: list[Entity] = qsd.execute("query-qmp-schema")["return"]
        probed = probe_all(qsd, entities)
        probed = {"qemu": qsd.greeting["QMP"]["version"], **probed}
    return entities, probed


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qsd", help="qemu-storage-daemon binary (default: from PATH)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed data is stale")
    opts = ap.parse_args(argv)
    entities, probed = generate(opts.qsd)
    files = {SCHEMA_FILE: _dump(entities), PROBED_FILE: _dump(probed)}
    stale = False
    for name, text in files.items():
        path = DATA_DIR / name
        if opts.check:
            if not path.exists() or path.read_text() != text:
                print(f"stale: {path}", file=sys.stderr)
                stale = True
        else:
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
