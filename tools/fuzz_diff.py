#!/usr/bin/env python3
"""Differential fuzzer: random QMP scripts against qemu-storage-daemon and qmpgraph.

``tools/fuzz_diff.py 0 200`` generates one script per seed in ``[0, 200)``
(deterministic: ``random.Random(seed)``), runs it against both daemons with
the differential harness (``tests/differential/harness.py``) and prints the
seeds whose transcripts differ, with the diff. ``--show SEED`` prints a
seed's script instead of running it; ``--save DIR`` writes each divergent
script there, ready to minimize by hand.

What lives here: the generator (synchronous, job-free commands only: node
adds and deletes, dirty bitmaps, transactions of bitmap and snapshot actions,
external and internal snapshots, block_resize, blockdev-reopen, and the graph
queries that show the state) and the loop that runs it. What does not: the
harness, and jobs or anything timing-dependent.

The generator avoids what crashes qemu-storage-daemon 7.2 (SIGSEGV): an
enable or disable transaction action whose lookup fails, a merge with an
empty list, and enable, disable or merge actions under completion-mode =
grouped. So transaction enable/disable actions only name the reserved
bitmaps (``k0`` on ``n0``, ``k1`` on ``a``), which no step removes and whose
nodes no step deletes.  It also adds no bitmap to a file node: with one
there, an internal snapshot deletion (or its rollback) or a shrink after
other resizes can end qsd 7.2 with an assertion in hbitmap_set.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "differential"))

from harness import Script, parse_script, run_differential

MIB = 1 << 20

#: Nodes present from the command line, never deleted by a step.
RESERVED_NODES = ("n0", "a")
#: Bitmaps added by the first steps, never removed: the only names that
#: transaction enable/disable actions use (a failed lookup there crashes qsd).
RESERVED_BITMAPS = (("n0", "k0"), ("a", "k1"))

NODE_NAMES = ("n0", "a", "af", "n1", "n2", "q", "qf", "r", "rf", "b", "o1", "o2", "ov")
#: File nodes, and the format node a bitmap goes to instead.
FILE_NODES = {"af": "a", "qf": "q", "rf": "r", "bf": "b"}
BAD_NODE_NAMES = ("nope", "", "#bad", "1x")
BITMAP_NAMES = ("b0", "b1", "b2", "stored", "st2", "sa", "bad", "k0", "k1")
BAD_BITMAP_NAMES = ("", "x" * 1024, "nope")
GRANULARITIES = (512, 4096, 65536, 1 << 20, 1 << 31)
BAD_GRANULARITIES = (0, 256, 3000, 1 << 32, -512)
IMAGES = ("a.qcow2", "b.qcow2", "c.qcow2", "r.raw")
ACTION_KINDS = (
    "add",
    "add",
    "remove",
    "clear",
    "enable",
    "disable",
    "merge",
    "abort",
    "snap",
    "int",
)
SIZES = (MIB, 2 * MIB, 512 * 1024, 3 * 512, 0)


def _cmd(name: str, args: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"execute": name}
    if args is not None:
        body["arguments"] = args
    return "> " + json.dumps(body)


class Generator:
    """One seed's script: a setup, then a random walk over the command set."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.seed = seed
        self.snap_files = 0
        self.nbd = False
        self.internal = ["s0", "s1", "1"]
        # Names some step tried to create: picked more often, so that later
        # steps find what earlier ones made.
        self.nodes: list[str] = list(RESERVED_NODES)
        self.bitmaps: list[str] = ["k0", "k1", "stored", "st2", "sa"]

    # -- choices ------------------------------------------------------------

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self.r.random() < p

    def node(self, *, allow_reserved: bool = True) -> str:
        """A node name: mostly plausible ones, sometimes bad."""
        if self.chance(0.08):
            return self.r.choice(BAD_NODE_NAMES)
        pool = self.nodes if self.chance(0.6) else list(NODE_NAMES)
        pool = [n for n in pool if allow_reserved or n not in RESERVED_NODES]
        return self.r.choice(pool or list(NODE_NAMES[2:]))

    def bitmap(self, *, allow_reserved: bool = True) -> str:
        """A bitmap name: mostly plausible ones, sometimes bad."""
        if self.chance(0.08):
            return self.r.choice(BAD_BITMAP_NAMES)
        pool = self.bitmaps if self.chance(0.6) else list(BITMAP_NAMES)
        pool = [b for b in pool if allow_reserved or b not in ("k0", "k1")]
        return self.r.choice(pool or ["b0"])

    def granularity(self) -> int:
        """A bitmap granularity, valid most of the time."""
        if self.chance(0.2):
            return self.r.choice(BAD_GRANULARITIES)
        return self.r.choice(GRANULARITIES)

    # -- script ---------------------------------------------------------------

    def setup(self) -> list[str]:
        """Images, the command line, and the reserved bitmaps."""
        r = self.r
        lines = [f"# fuzz_diff seed {self.seed}"]
        lines.append("#! setup: qemu-img create -q -f qcow2 b.qcow2 1M")
        if self.chance(0.5):
            lines.append("#! setup: qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 a.qcow2 1M")
        else:
            lines.append("#! setup: qemu-img create -q -f qcow2 a.qcow2 1M")
        lines.append("#! setup: qemu-img create -q -f qcow2 c.qcow2 2M")
        # Stored bitmaps, then writes (qemu-io dirties the enabled ones).
        for image, names in (("c.qcow2", ("stored", "st2")), ("a.qcow2", ("sa",))):
            for name in names:
                if self.chance(0.5):
                    extra = r.choice(("", " --disable", " -g 4096", " -g 1M"))
                    lines.append(f"#! setup: qemu-img bitmap --add{extra} {image} {name}")
            if self.chance(0.6):
                cmds = " ".join(
                    f"-c 'write {r.randrange(16) * 64}k {r.choice((512, 4096, 65536))}'"
                    for _ in range(r.randint(1, 3))
                )
                lines.append(f"#! setup: qemu-io {cmds} {image} >/dev/null")
        if self.chance(0.25):
            # A writer that dies leaves the stored bitmaps in use: inconsistent.
            lines.append("#! setup: qemu-img bitmap --add c.qcow2 bad")
            lines.append(
                "#! setup: (ulimit -c 0; qemu-io -c 'write 0 4k' -c abort c.qcow2) "
                ">/dev/null 2>&1 || true"
            )
        if self.chance(0.4):
            lines.append("#! setup: qemu-img snapshot -c s0 c.qcow2")
        lines.append("#! setup: qemu-img create -q -f raw r.raw 1M")
        a_opts = "driver=qcow2,node-name=a,file=af"
        if self.chance(0.2):
            a_opts += ",read-only=on"
        lines += [
            "#! args: --blockdev driver=null-co,node-name=n0,size=1048576",
            "#! args: --blockdev driver=file,node-name=af,filename=$TMP/a.qcow2",
            f"#! args: --blockdev {a_opts}",
            _cmd("qmp_capabilities"),
        ]
        for node, name in RESERVED_BITMAPS:
            args: dict[str, Any] = {"node": node, "name": name}
            if self.chance(0.5):
                args["granularity"] = r.choice(GRANULARITIES)
            if self.chance(0.3):
                args["disabled"] = True
            lines.append(_cmd("block-dirty-bitmap-add", args))
        return lines

    def generate(self) -> str:
        """The whole script text."""
        lines = self.setup()
        steps = self.r.randint(8, 22)
        kinds = [
            (self.blockdev_add, 5),
            (self.blockdev_del, 2),
            (self.bitmap_add, 5),
            (self.bitmap_simple, 4),
            (self.bitmap_merge, 2),
            (self.sha256, 1),
            (self.transaction, 5),
            (self.snapshot_sync, 1),
            (self.snapshot, 1),
            (self.internal_snapshot, 2),
            (self.resize, 1),
            (self.reopen, 1),
            (self.query, 2),
            (self.cycle, 2),
            (self.export, 1),
        ]
        funcs = [f for f, _ in kinds]
        weights = [w for _, w in kinds]
        for _ in range(steps):
            lines.extend(self.r.choices(funcs, weights)[0]())
        lines.append(_cmd("query-named-block-nodes", {"flat": True}))
        lines.append(_cmd("x-debug-query-block-graph"))
        return "\n".join(lines) + "\n"

    # -- commands ---------------------------------------------------------------

    def query(self) -> list[str]:
        """One of the state queries."""
        if self.chance(0.7):
            return [_cmd("query-named-block-nodes", {"flat": True})]
        return [_cmd("x-debug-query-block-graph")]

    def file_ref(self) -> dict[str, Any] | str:
        """A ``file`` child: a new file node, or a reference."""
        if self.chance(0.15):
            return self.r.choice(("af", "qf", "rf", "nope"))
        image = self.r.choice((*IMAGES, "missing.qcow2"))
        ref: dict[str, Any] = {"driver": "file", "filename": f"$TMP/{image}"}
        if self.chance(0.6):
            ref["node-name"] = self.r.choice(("qf", "rf", "af", "bf"))
        return ref

    def blockdev_add(self) -> list[str]:
        """blockdev-add of null-co, qcow2 or raw nodes, some invalid."""
        r = self.r
        kind = r.choice(("null-co", "qcow2", "qcow2", "raw", "bad"))
        name = r.choice(("n1", "n2", "q", "r", "b", "ov", "o1", "n0", "#bad", ""))
        args: dict[str, Any]
        if kind == "null-co":
            args = {"driver": "null-co", "node-name": name}
            if self.chance(0.7):
                args["size"] = r.choice(SIZES)
            if self.chance(0.2):
                args["read-zeroes"] = True
        elif kind in ("qcow2", "raw"):
            args = {"driver": kind, "node-name": name, "file": self.file_ref()}
            if kind == "qcow2" and self.chance(0.4):
                args["backing"] = None
        else:
            args = {"driver": r.choice(("nope", "qcow2")), "node-name": name}
        if self.chance(0.25):
            args["read-only"] = True
        if self.chance(0.1):
            args["auto-read-only"] = True
        if self.chance(0.05):
            del args["node-name"]
        else:
            self.nodes.append(name)
        return [_cmd("blockdev-add", args)]

    def cycle(self) -> list[str]:
        """Delete and re-add a qcow2 node, so stored bitmaps are written and read back."""
        name, image = self.r.choice((("q", "c.qcow2"), ("b", "b.qcow2"), ("q", "a.qcow2")))
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": f"$TMP/{image}", "node-name": name + "f"},
        }
        if self.chance(0.3):
            args["read-only"] = True
        self.nodes.append(name)
        lines = [_cmd("blockdev-del", {"node-name": name})] if self.chance(0.7) else []
        return [*lines, _cmd("blockdev-add", args)]

    def export(self) -> list[str]:
        """An NBD export with bitmaps (no client: the bitmaps only get busy)."""
        lines = []
        if not self.nbd:
            self.nbd = True
            addr = {"type": "unix", "data": {"path": "$TMP/nbd.sock"}}
            lines.append(_cmd("nbd-server-start", {"addr": addr}))
        if self.chance(0.3):
            return [*lines, _cmd("block-export-del", {"id": self.r.choice(("e0", "e1"))})]
        args: dict[str, Any] = {
            "type": "nbd",
            "id": self.r.choice(("e0", "e1")),
            "node-name": self.node(),
            "bitmaps": [self.bitmap() for _ in range(self.r.randint(0, 2))],
        }
        if self.chance(0.3):
            args["writable"] = True
        return [*lines, _cmd("block-export-add", args)]

    def blockdev_del(self) -> list[str]:
        """blockdev-del of any but the reserved nodes."""
        return [_cmd("blockdev-del", {"node-name": self.node(allow_reserved=False)})]

    def bitmap_add_args(self) -> dict[str, Any]:
        """Arguments of block-dirty-bitmap-add (command or action)."""
        node = self.node()
        # No bitmaps on file nodes: qsd 7.2 can then abort (hbitmap_set's
        # assertion) when an internal snapshot deletion or a shrink discards.
        node = FILE_NODES.get(node, node)
        args: dict[str, Any] = {"node": node, "name": self.bitmap(allow_reserved=False)}
        self.bitmaps.append(args["name"])
        if self.chance(0.5):
            args["granularity"] = self.granularity()
        if self.chance(0.35):
            args["persistent"] = self.chance(0.8)
        if self.chance(0.25):
            args["disabled"] = self.chance(0.8)
        return args

    def bitmap_add(self) -> list[str]:
        """block-dirty-bitmap-add."""
        return [_cmd("block-dirty-bitmap-add", self.bitmap_add_args())]

    def bitmap_simple(self) -> list[str]:
        """remove, clear, enable or disable (never a reserved bitmap's remove)."""
        cmd = self.r.choice(("remove", "clear", "enable", "disable"))
        name = self.bitmap(allow_reserved=cmd != "remove")
        return [_cmd(f"block-dirty-bitmap-{cmd}", {"node": self.node(), "name": name})]

    def merge_args(self) -> dict[str, Any]:
        """Arguments of a merge: a non-empty source list (empty crashes qsd)."""
        sources: list[Any] = []
        for _ in range(self.r.randint(1, 3)):
            if self.chance(0.3):
                sources.append({"node": self.node(), "name": self.bitmap()})
            else:
                sources.append(self.bitmap())
        return {"node": self.node(), "target": self.bitmap(), "bitmaps": sources}

    def bitmap_merge(self) -> list[str]:
        """block-dirty-bitmap-merge."""
        return [_cmd("block-dirty-bitmap-merge", self.merge_args())]

    def sha256(self) -> list[str]:
        """x-debug-block-dirty-bitmap-sha256."""
        return [
            _cmd("x-debug-block-dirty-bitmap-sha256", {"node": self.node(), "name": self.bitmap()})
        ]

    def snapshot_file(self) -> str:
        """A fresh overlay file name (sometimes an existing image)."""
        if self.chance(0.1):
            return "$TMP/" + self.r.choice(IMAGES)
        self.snap_files += 1
        return f"$TMP/s{self.snap_files}.qcow2"

    def snapshot_sync_args(self) -> dict[str, Any]:
        """Arguments of blockdev-snapshot-sync."""
        args: dict[str, Any] = {"snapshot-file": self.snapshot_file()}
        args["node-name" if self.chance(0.8) else "device"] = self.node()
        if self.chance(0.8):
            args["snapshot-node-name"] = self.r.choice(("o1", "o2", "ov", "n0", "o1"))
            self.nodes.append(args["snapshot-node-name"])
        if self.chance(0.2):
            args["format"] = self.r.choice(("qcow2", "raw"))
        return args

    def snapshot_sync(self) -> list[str]:
        """blockdev-snapshot-sync."""
        return [_cmd("blockdev-snapshot-sync", self.snapshot_sync_args())]

    def snapshot(self) -> list[str]:
        """blockdev-snapshot onto a node added with backing: null (or not)."""
        lines: list[str] = []
        overlay = self.r.choice(("ov", "o2", "n1", "q"))
        if self.chance(0.6):
            self.snap_files += 1
            image = f"s{self.snap_files}.qcow2"
            lines.insert(0, f"#! setup: qemu-img create -q -f qcow2 {image} 1M")
            add: dict[str, Any] = {
                "driver": "qcow2",
                "node-name": overlay,
                "file": {"driver": "file", "filename": f"$TMP/{image}"},
            }
            if self.chance(0.8):
                add["backing"] = None
            lines.append(_cmd("blockdev-add", add))
        lines.append(_cmd("blockdev-snapshot", {"node": self.node(), "overlay": overlay}))
        return lines

    def internal_args(self, delete: bool) -> dict[str, Any]:
        """Arguments of blockdev-snapshot-internal-sync or its delete."""
        args: dict[str, Any] = {"device": self.node()}
        name = self.r.choice(self.internal)
        if not delete:
            if self.chance(0.5):
                name = f"s{len(self.internal)}"
                self.internal.append(name)
            args["name"] = name
        else:
            if self.chance(0.7):
                args["name"] = name
            if self.chance(0.3):
                args["id"] = self.r.choice(("1", "2", "3"))
        return args

    def internal_snapshot(self) -> list[str]:
        """blockdev-snapshot-internal-sync or -delete-internal-sync."""
        if self.chance(0.6):
            return [_cmd("blockdev-snapshot-internal-sync", self.internal_args(False))]
        return [_cmd("blockdev-snapshot-delete-internal-sync", self.internal_args(True))]

    def resize(self) -> list[str]:
        """block_resize by node name (grow, shrink, unaligned)."""
        size = self.r.choice((2 * MIB, MIB, 512 * 1024, 4 * MIB + 512, 1000, -1, 4 * MIB))
        return [_cmd("block_resize", {"node-name": self.node(), "size": size})]

    def reopen(self) -> list[str]:
        """blockdev-reopen of a null-co or qcow2 node with simple options."""
        r = self.r
        if self.chance(0.5):
            opts: dict[str, Any] = {"driver": "null-co", "node-name": r.choice(("n0", "n1", "n2"))}
            if self.chance(0.5):
                opts["size"] = r.choice(SIZES)
        else:
            node = r.choice(("a", "q", "b"))
            opts = {"driver": "qcow2", "node-name": node, "file": node + "f"}
            if self.chance(0.3):
                opts["backing"] = None
        if self.chance(0.5):
            opts["read-only"] = self.chance(0.5)
        return [_cmd("blockdev-reopen", {"options": [opts]})]

    def transaction(self) -> list[str]:
        """A transaction of bitmap and snapshot actions, often rolled back."""
        r = self.r
        actions: list[dict[str, Any]] = []
        crashy = False  # enable/disable/merge: never under grouped
        for _ in range(r.randint(1, 4)):
            kind = r.choice(ACTION_KINDS)
            data: dict[str, Any]
            if kind == "add":
                data = self.bitmap_add_args()
            elif kind in ("remove", "clear"):
                data = {"node": self.node(), "name": self.bitmap(allow_reserved=kind == "clear")}
            elif kind in ("enable", "disable"):
                crashy = True
                node, name = r.choice(RESERVED_BITMAPS)
                data = {"node": node, "name": name}
            elif kind == "merge":
                crashy = True
                data = self.merge_args()
            elif kind == "abort":
                data = {}
            elif kind == "snap":
                data = self.snapshot_sync_args()
            else:
                data = self.internal_args(False)
            type_ = {
                "abort": "abort",
                "snap": "blockdev-snapshot-sync",
                "int": "blockdev-snapshot-internal-sync",
            }.get(kind, f"block-dirty-bitmap-{kind}")
            actions.append({"type": type_, "data": data})
        args: dict[str, Any] = {"actions": actions}
        if not crashy and self.chance(0.1):
            args["properties"] = {"completion-mode": "grouped"}
        return [_cmd("transaction", args)]


def generate(seed: int) -> str:
    """The script text for ``seed`` (setup lines hoisted to the top)."""
    text = Generator(seed).generate()
    lines = text.splitlines()
    head = [ln for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if not ln.startswith("#")]
    return "\n".join(head + body) + "\n"


# Internal snapshots carry their creation time (qsd's vm-clock is that clock
# too): equal runs differ in it.
_DATES = re.compile(r'("(?:date|vm-clock)-(?:sec|nsec)": )\d+')


def _comparable(lines: list[str]) -> list[str]:
    return [_DATES.sub(r"\1N", ln) for ln in lines]


def run_seed(seed: int, qsd: str) -> str | None:
    """Run one seed; the diff if the daemons differ, else None."""
    script: Script = parse_script(generate(seed), f"fuzz-{seed}")
    # No QEMU reruns: without jobs qsd answers one way, and reruns cost time.
    result = run_differential(script, qsd, oracle_reruns=0)
    if _comparable(result.reference) == _comparable(result.candidate):
        return None
    return result.diff()


def main(argv: list[str] | None = None) -> int:
    """Run seeds ``[start, stop)``; print each divergent seed with its diff."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=int)
    parser.add_argument("stop", type=int, nargs="?")
    parser.add_argument("--show", action="store_true", help="print the scripts, run nothing")
    parser.add_argument("--save", type=Path, help="write divergent scripts to this directory")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    args = parser.parse_args(argv)
    stop = args.start + 1 if args.stop is None else args.stop
    if args.show:
        for seed in range(args.start, stop):
            print(generate(seed))
        return 0
    if args.qsd is None:
        print("qemu-storage-daemon not found (use --qsd PATH)", file=sys.stderr)
        return 2
    failed = []
    for seed in range(args.start, stop):
        try:
            diff = run_seed(seed, args.qsd)
        except RuntimeError as exc:  # a setup line failed: the generator's bug
            diff = f"harness error: {exc}"
        if diff is None:
            print(f"seed {seed}: identical", flush=True)
            continue
        failed.append(seed)
        print(f"seed {seed}: DIFFERENT\n{diff}", flush=True)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"fuzz-{seed}.qmp").write_text(generate(seed))
    print(f"{len(failed)} of {stop - args.start} seeds differ: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
