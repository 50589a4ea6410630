"""Record qemu-storage-daemon's answers to wrong command arguments.

Usage: ``python tools/record_arg_errors.py [--qsd PATH] [--seed N] [--count N]``

Writes ``tests/schema/data/qsd-arg-errors.json``: a list of
``{"command", "arguments", "error"}`` where ``error`` is the ``desc`` QEMU
7.2 answered. The cases are hand-picked message forms plus seeded random
mutations of valid arguments for every command in QEMU's schema (members
dropped, unknown keys added, values replaced by boundary integers, wrong
JSON types, unknown enum values), so the recorded texts cover QEMU's
ordering rules and not only single faults.

Every case carries one extra unknown top-level key (``PROBE_KEY``): QEMU
reports leftover keys last, so a case whose other arguments are all valid is
still refused ("Parameter 'qmpgraph-probe' is unexpected") and no command
ever runs. The key is part of the recorded arguments: qmpgraph is tested on
exactly the same input.

``cases(entities, rng, count)`` is importable (tests use it for a live
differential run with a fresh seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_schema import PROBE_KEY, SchemaWalker
from qsd_oracle import QSD

OUT = Path(__file__).resolve().parent.parent / "tests" / "schema" / "data" / "qsd-arg-errors.json"

Case = tuple[str, dict[str, Any]]

#: Message forms and ordering questions, written by hand.
HAND_CASES: list[Case] = [
    ("query-version", {"a": 1}),
    ("query-version", {"a": 1, "b": 2, "c": 3}),
    ("qmp_capabilities", {"enable": ["foo"]}),
    ("qmp_capabilities", {"enable": "oob"}),
    ("qmp_capabilities", {"enable": [1]}),
    ("qmp_capabilities", {"enable": None}),
    ("qmp_capabilities", {"enable": ["oob", "oob", "x"]}),
    ("query-qmp-schema", {"enable": []}),
    ("blockdev-add", {}),
    ("blockdev-add", {"node-name": "a", "zz": 1}),
    ("blockdev-add", {"driver": 5}),
    ("blockdev-add", {"driver": "nope"}),
    ("blockdev-add", {"driver": "raw", "discard": "bad", "foo": 1}),
    ("blockdev-add", {"driver": "raw", "file": []}),
    ("blockdev-add", {"driver": "raw", "file": {}}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "foo"}}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file"}}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": 1}}),
    ("blockdev-add", {"driver": "quorum", "children": [True], "vote-threshold": 1}),
    ("blockdev-add", {"driver": "quorum", "children": ["a", {}], "vote-threshold": 1}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "backing": 1}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "backing": None, "cache-size": -1}),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "max-discard": 2**40}),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "align": 1.0}),
    ("blockdev-add", {"driver": "blklogwrites", "file": "x", "log": "y", "log-sector-size": -1}),
    ("blockdev-add", {"driver": "blklogwrites", "file": "x", "log": "y", "log-sector-size": "s"}),
    ("blockdev-add", {"driver": "blklogwrites", "file": "x", "log": "y", "log-sector-size": 2**64}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "overlap-check": 3}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "overlap-check": "bogus"}),
    ("blockdev-add", {"driver": "qcow2", "file": "f", "overlap-check": {"template": 1}}),
    ("block-job-set-speed", {"device": "x", "speed": 1.5}),
    ("block-job-set-speed", {"device": "x", "speed": 2**63}),
    ("block-job-set-speed", {"device": "x", "speed": -(2**63) - 1}),
    ("block-job-set-speed", {"device": "x", "speed": True}),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}),
    ("transaction", {"actions": [{"type": "abort"}]}),
    ("transaction", {"actions": {}}),
    (
        "transaction",
        {"actions": [{"type": "blockdev-snapshot-sync", "data": {"snapshot-file": 3}}]},
    ),
    ("qom-set", {"path": "x", "property": "y"}),
    ("qom-set", {"path": "x", "property": "y", "value": None}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [1]}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": ["a", {"node": 1}]}),
    ("block-stream", {"job-id": "j", "device": "d", "base-node": None, "backing-file": None}),
    ("block-set-write-threshold", {"node-name": "n", "write-threshold": -1}),
    ("block-set-write-threshold", {"node-name": "n", "write-threshold": -(2**63) - 1}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": -1}),
    (
        "qom-set",
        {"path": "x", "property": "y", "value": {"deep": [1, {"x": None}]}, "a": 1, "b": 2},
    ),
    ("blockdev-add", {"driver": "raw", "file": "f", "k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5}),
    ("blockdev-add", {"driver": "null-co", "size": 1.5}),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet"}}),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "unix", "path": "p", "x": 1}}),
    ("nbd-server-start", {"addr": {"type": "bogus"}}),
    ("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": "x"}),
    ("object-add", {"qom-type": "throttle-group", "id": "t", "limits": {"iops-total": 1.5}}),
]

_JUNK_VALUES: list[Any] = [
    "x",
    "",
    0,
    -1,
    1,
    127,
    128,
    255,
    256,
    32767,
    32768,
    65535,
    65536,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**31) - 1,
    -(2**63),
    1.5,
    -0.5,
    1e300,
    True,
    False,
    None,
    [],
    {},
    [1],
    ["x"],
    [{}],
    {"a": 1},
]
_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz-_0123456789"


class RandomArgs:
    """Random valid arguments from the masked schema, and mutations of them."""

    def __init__(self, entities: list[dict[str, Any]], rng: random.Random) -> None:
        self.walker = SchemaWalker(entities)
        self.by_name = self.walker.by_name
        self.rng = rng

    def value(self, tname: str, depth: int) -> Any:
        """A random value of type ``tname`` (small; optional members sometimes)."""
        ent = self.by_name[tname]
        meta = ent["meta-type"]
        rng = self.rng
        if depth > 4:
            return self.walker.minimal(tname)
        if meta == "builtin":
            jt = ent["json-type"]
            if jt == "int":
                return rng.choice([0, 1, 4096, 65536, 2**31 - 1])
            if jt == "number":
                return rng.choice([0, 0.5, 2])
            if jt == "value":
                return copy.deepcopy(rng.choice([None, 1, "s", {"k": [1]}]))
            return self.walker.minimal(tname) if jt != "string" else rng.choice(["a", "node0"])
        if meta == "enum":
            return rng.choice(ent["values"])
        if meta == "array":
            return [self.value(ent["element-type"], depth + 1) for _ in range(rng.randint(0, 2))]
        if meta == "alternate":
            return self.value(rng.choice(ent["members"])["type"], depth + 1)
        out: dict[str, Any] = {}
        self._fill(tname, out, depth)
        return out

    def _fill(self, tname: str, out: dict[str, Any], depth: int) -> None:
        ent = self.by_name[tname]
        for m in ent["members"]:
            if "default" not in m or self.rng.random() < 0.3:
                out[m["name"]] = self.value(m["type"], depth + 1)
        tag = ent.get("tag")
        if tag is not None:
            for v in ent["variants"]:
                if v["case"] == out[tag]:
                    self._fill(v["type"], out, depth + 1)

    def _containers(self, value: Any, acc: list[Any]) -> list[Any]:
        if isinstance(value, dict):
            acc.append(value)
            for v in value.values():
                self._containers(v, acc)
        elif isinstance(value, list):
            acc.append(value)
            for v in value:
                self._containers(v, acc)
        return acc

    def _junk(self) -> Any:
        # A fresh copy: later mutations must never edit a shared constant.
        return copy.deepcopy(self.rng.choice(_JUNK_VALUES))

    def mutate(self, args: dict[str, Any]) -> None:
        """Apply one random fault somewhere in ``args`` (in place)."""
        rng = self.rng
        target = rng.choice(self._containers(args, []))
        op = rng.random()
        if isinstance(target, list):
            if target and op < 0.7:
                target[rng.randrange(len(target))] = self._junk()
            else:
                target.append(self._junk())
            return
        if target and op < 0.25:
            del target[rng.choice(list(target))]
        elif target and op < 0.75:
            target[rng.choice(list(target))] = self._junk()
        else:
            key = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 10)))
            target[key] = self._junk()


def cases(entities: list[dict[str, Any]], rng: random.Random, count: int) -> list[Case]:
    """``count`` random cases over every command of QEMU's schema."""
    gen = RandomArgs(entities, rng)
    commands = [e for e in entities if e["meta-type"] == "command"]
    out: list[Case] = []
    for _ in range(count):
        cmd = rng.choice(commands)
        args = gen.value(cmd["arg-type"], 0)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            gen.mutate(args)
        out.append((cmd["name"], args))
    return out


def with_probe(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` plus the key that keeps QEMU from running the command."""
    return {**args, PROBE_KEY: 0}


def record(qsd: QSD, batch: list[Case]) -> list[dict[str, Any]]:
    """QEMU's answer to each case (arguments as sent, probe key included)."""
    out = []
    for cmd, args in batch:
        sent = with_probe(args)
        desc = qsd.error_desc(cmd, sent)
        if desc is None:
            raise RuntimeError(f"{cmd} {sent!r} executed: the probe key failed")
        out.append({"command": cmd, "arguments": sent, "error": desc})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qsd", help="qemu-storage-daemon binary (default: from PATH)")
    ap.add_argument("--seed", type=int, default=7202)
    ap.add_argument("--count", type=int, default=1500)
    opts = ap.parse_args(argv)
    with QSD(opts.qsd) as qsd:
        entities = qsd.execute("query-qmp-schema")["return"]
        batch = HAND_CASES + cases(entities, random.Random(opts.seed), opts.count)
        recorded = record(qsd, batch)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(recorded, indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {len(recorded)} cases to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
