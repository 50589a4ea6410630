"""Meta contexts of a fleecing export as backup tools negotiate them, live, qsd against qmpgraph.

A pull-mode backup tool (virtnbdbackup, libvirt's consumers) first lists
what an export offers, then picks the contexts it needs.  The graph here is
QEMU's image-fleecing one (a copy-before-write filter exported as the
guest, a snapshot-access node over it), and the snapshot export carries
``qemu:allocation-depth`` and bitmaps given as node/name pairs, two of them
with the same name on different nodes (the disk's and the fleecing
image's, each dirtied differently).  With python3-libnbd in option mode,
both daemons must answer the same:

* NBD_OPT_LIST (names, descriptions) and NBD_OPT_LIST_META_CONTEXT for
  each query a client may send (none, ``base:``, ``qemu:``,
  ``qemu:dirty-bitmap:``, exact names, unknown names and namespaces), on
  the snapshot export and on the guest export;
* after NBD_OPT_GO with a set of contexts: which were negotiated and the
  block status of every context over the whole disk (the duplicated
  bitmap name included).

Every tool runs with a timeout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run

pytestmark = pytest.mark.qemu

# Run by /usr/bin/python3 (python3-libnbd is not in the venv).
CLIENT = r"""
import json, sys, nbd
uri, queries, picks = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
out["list"] = sorted(names)
for q in queries:
    h.clear_meta_contexts()
    for one in q:
        h.add_meta_context(one)
    got = []
    try:
        n = h.opt_list_meta_context(lambda name: got.append(name) or 0)
        out["q " + json.dumps(q)] = [n, got]
    except nbd.Error as e:
        out["q " + json.dumps(q)] = ["error", e.errno, str(e)]
h.clear_meta_contexts()
for one in picks:
    h.add_meta_context(one)
h.opt_go()
out["can"] = {c: h.can_meta_context(c) for c in picks + ["qemu:dirty-bitmap:none"]}
size = h.get_size()
seen = []
def cb(meta, off, ents, err):
    seen.append([meta, off, list(ents)])
    return 0
off = 0
while off < size:
    before = len(seen)
    h.block_status(size - off, off, cb)
    # Advance by the shortest extent any context reported at this offset.
    step = min(e[2][0] for e in seen[before:])
    off += step
out["status"] = seen
h.shutdown()
print(json.dumps(out, sort_keys=True))
"""

QUERIES: list[list[str]] = [
    [],
    ["base:"],
    ["base:allocation"],
    ["qemu:"],
    ["qemu:dirty-bitmap:"],
    ["qemu:dirty-bitmap:b"],
    ["qemu:dirty-bitmap:c"],
    ["qemu:dirty-bitmap:nope", "qemu:allocation-depth"],
    ["qemu:allocation-depth:x"],
    ["qemu:dirty-bitmap"],
    ["other:", "base:allocation"],
    ["qemu:dirty-bitmap:b", "qemu:dirty-bitmap:b"],
]
PICKS = ["base:allocation", "qemu:dirty-bitmap:b", "qemu:allocation-depth", "qemu:dirty-bitmap:c"]


def _tool(*cmd: str) -> list[Any]:
    """A tool's exit status, output and error (failures are data here)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return [res.returncode, res.stdout, res.stderr]


def _write(daemon: LiveDaemon, export: str, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    res = _tool("qemu-io", "-f", "raw", *args, daemon.uri(export))
    assert res[0] == 0, res


def _session(kind: str, d: Path) -> dict[str, Any]:
    d.mkdir(parents=True)
    disk, tmp = str(d / "disk.qcow2"), str(d / "tmp.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 512k", disk)
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp, "1M")
    daemon = LiveDaemon(kind, require_qemu(), d / "run", [])
    out: dict[str, Any] = {}
    try:
        daemon.start_nbd()
        daemon.ok("blockdev-add", driver="qcow2", node_name="disk", file=_file(disk))
        daemon.ok(
            "blockdev-add", driver="qcow2", node_name="fl-tmp", file=_file(tmp), backing="disk"
        )
        # The disk's bitmap b records a write before the backup.
        daemon.ok("block-dirty-bitmap-add", node="disk", name="b", granularity=128 * 1024)
        daemon.ok("block-export-add", type="nbd", id="pre", node_name="disk", writable=True)
        _write(daemon, "disk", "write -P 2 768k 4k")
        daemon.ok("block-export-del", id="pre")
        daemon.ok("block-dirty-bitmap-disable", node="disk", name="b")
        # The fleecing image's bitmap b records the cbw's copies.
        daemon.ok("block-dirty-bitmap-add", node="fl-tmp", name="b")
        daemon.ok("block-dirty-bitmap-add", node="disk", name="c", disabled=True)
        daemon.ok(
            "blockdev-add",
            driver="copy-before-write",
            node_name="cbw",
            file="disk",
            target="fl-tmp",
        )
        daemon.ok("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw")
        daemon.ok(
            "block-export-add",
            type="nbd",
            id="g",
            node_name="cbw",
            name="guest",
            writable=True,
            description="the guest",
        )
        _write(daemon, "guest", "write -P 3 64k 4k", "write -P 4 900k 64k")
        daemon.ok("block-dirty-bitmap-disable", node="fl-tmp", name="b")
        bitmaps = [
            {"node": "disk", "name": "b"},
            {"node": "fl-tmp", "name": "b"},
            {"node": "disk", "name": "c"},
        ]
        daemon.ok(
            "block-export-add",
            type="nbd",
            id="f",
            node_name="snap",
            name="fleece",
            description="backup",
            allocation_depth=True,
            bitmaps=bitmaps,
        )
        for name in ("fleece", "guest"):
            res = _tool(
                "/usr/bin/python3",
                "-c",
                CLIENT,
                daemon.uri(name),
                json.dumps(QUERIES),
                json.dumps(PICKS),
            )
            out[name] = [res[0], json.loads(res[1]) if res[0] == 0 else res[1], res[2]]
        out["exports"] = daemon.ok("query-block-exports")
        for exp in ("f", "g"):
            out[f"del {exp}"] = daemon.qmp("block-export-del", id=exp)
        out["events"] = [(e["event"], e.get("data")) for e in daemon.events]
    finally:
        daemon.stop()
    normalized: dict[str, Any] = json.loads(json.dumps(out).replace(str(d), "$D"))
    return normalized


def _file(path: str) -> dict[str, str]:
    return {"driver": "file", "filename": path}


def test_fleecing_meta_contexts_equal_qsd(tmp_path: Path) -> None:
    if shutil.which("/usr/bin/python3") is None:
        pytest.fail("/usr/bin/python3 with python3-libnbd is required")
    want = _session("qsd", tmp_path / "qsd")
    assert want["fleece"][0] == 0, want["fleece"]
    got = _session("qmpgraph", tmp_path / "qmpgraph")
    assert got == want
