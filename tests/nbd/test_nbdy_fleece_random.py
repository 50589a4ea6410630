"""Random guest writes under a fleecing export, live, qsd against qmpgraph.

For a few fixed seeds, a qcow2 disk (with or without a backing file, with
data, zeroes and discards of its own) sits under a copy-before-write filter
exported writable as the guest; the fleecing target is a qcow2 (backed by
the disk or not) or a raw image, and the filter sometimes has a ``bitmap``
recorded by earlier guest writes.  The guest then writes patterns, zeroes
and discards at random offsets and lengths (512 B to ~200 KiB, aligned to
512, 4096 or 65536).  Both daemons must show the same:

* the snapshot export's ``nbdinfo --map`` (base:allocation and
  qemu:allocation-depth), block status and reads (digests) of random
  ranges through libnbd, failures included (outside the cbw bitmap);
* ``nbdcopy`` of the whole snapshot (without a cbw bitmap);
* after teardown, ``qemu-img map`` of the fleecing image and of the disk,
  without host offsets and with adjacent extents of the same kind merged:
  qsd 7.2 copies clusters with parallel tasks, so where each copy lands in
  the fleecing qcow2 varies from run to run of qsd itself.

Each seed runs both daemons in a few seconds; every tool has a timeout.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run

pytestmark = pytest.mark.qemu

# Run by /usr/bin/python3 (python3-libnbd is not in the venv).
CLIENT = r"""
import hashlib, json, sys, nbd
h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(sys.argv[1])
out = []
for off, ln in json.loads(sys.argv[2]):
    got = []
    try:
        h.block_status(ln, off, lambda m, o, e, err: got.append([m, o, list(e)]) or 0)
        out.append(got)
    except nbd.Error as e:
        out.append(["err", e.errno])
    try:
        d = h.pread(ln, off); out.append(hashlib.sha256(d).hexdigest()[:12])
    except nbd.Error as e:
        out.append(["rerr", e.errno])
print(json.dumps(out))
"""

MiB = 1 << 20
SIZE = 2 * MiB
SEEDS = [4, 7, 8, 12]


def _ops(r: random.Random) -> list[str]:
    """qemu-io commands: patterns, zeroes and discards at random places."""
    out = []
    for _ in range(r.randint(3, 12)):
        off = r.randrange(0, SIZE, r.choice([512, 4096, 65536]))
        length = min(SIZE - off, r.choice([512, 4096, 65536, 99840, 200704]))
        k = r.random()
        if k < 0.5:
            out.append(f"write -P {r.randint(1, 250)} {off} {length}")
        elif k < 0.75:
            out.append(f"write -z {off} {length}")
        else:
            out.append(f"discard {off} {length}")
    return out


def _tool(*cmd: str) -> list[Any]:
    """A tool's exit status, output and the end of its error output."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return [res.returncode, res.stdout, res.stderr[-300:]]


def _io(uri: str, cmds: list[str]) -> None:
    res = _tool("qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], uri)
    assert res[0] == 0, res


def _map(path: str, fmt: str) -> list[dict[str, Any]]:
    """qemu-img map without host offsets, adjacent extents of a kind merged."""
    kind = ("depth", "present", "zero", "data")
    merged: list[dict[str, Any]] = []
    for e in json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, path)):
        last = merged[-1] if merged else None
        if (
            last
            and all(last[k] == e[k] for k in kind)
            and last["start"] + last["length"] == e["start"]
        ):
            last["length"] += e["length"]
        else:
            merged.append({k: e[k] for k in ("start", "length", *kind)})
    return merged


def _session(kind: str, d: Path, seed: int) -> dict[str, Any]:
    r = random.Random(seed)
    d.mkdir(parents=True)
    disk, tmp, base = str(d / "disk.qcow2"), str(d / "tmp.qcow2"), str(d / "base.qcow2")
    if r.random() < 0.5:
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "2M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 1536k 256k", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk, "2M")
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", disk, "2M")
    run("qemu-io", "-f", "qcow2", *[a for c in _ops(r) for a in ("-c", c)], disk)
    tmp_fmt = r.choice(["qcow2", "raw"])
    run("qemu-img", "create", "-q", "-f", tmp_fmt, tmp, "2M")
    tmp_backed = tmp_fmt == "qcow2" and r.random() < 0.5
    with_bitmap = r.random() < 0.3
    guest = _ops(r)
    ranges = []
    for _ in range(10):
        off = r.randrange(0, SIZE, r.choice([512, 4096, 65536]))
        ranges.append([off, min(SIZE - off, r.choice([4096, 65536, 131072, 300000]))])
    daemon = LiveDaemon(kind, require_qemu(), d / "run", [])
    out: dict[str, Any] = {}
    try:
        daemon.start_nbd()
        daemon.ok("blockdev-add", driver="qcow2", node_name="disk", file=_file(disk))
        target: dict[str, Any] = {"driver": tmp_fmt, "node_name": "tmp", "file": _file(tmp)}
        if tmp_backed:
            target["backing"] = "disk"
        daemon.ok("blockdev-add", **target)
        cbw: dict[str, Any] = {"file": "disk", "target": "tmp"}
        if with_bitmap:
            daemon.ok("block-dirty-bitmap-add", node="disk", name="rec")
            daemon.ok("block-export-add", type="nbd", id="pre", node_name="disk", writable=True)
            _io(daemon.uri("disk"), ["write -P 9 0 700k", "write -P 9 1200k 64k"])
            daemon.ok("block-export-del", id="pre")
            daemon.ok("block-dirty-bitmap-disable", node="disk", name="rec")
            cbw["bitmap"] = {"node": "disk", "name": "rec"}
        daemon.ok("blockdev-add", driver="copy-before-write", node_name="cbw", **cbw)
        daemon.ok("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw")
        daemon.ok("block-export-add", type="nbd", id="g", node_name="cbw", writable=True)
        daemon.ok("block-export-add", type="nbd", id="f", node_name="snap", allocation_depth=True)
        _io(daemon.uri("cbw"), guest)
        uri = daemon.uri("snap")
        for ctx in ("", "=qemu:allocation-depth"):
            out["map" + ctx] = _tool("nbdinfo", "--map" + ctx, uri)
        out["libnbd"] = _tool("/usr/bin/python3", "-c", CLIENT, uri, json.dumps(ranges))
        if not with_bitmap:
            copy = d / "copy.raw"
            res = _tool("nbdcopy", uri, str(copy))
            out["copy"] = [res[0], hashlib.sha256(copy.read_bytes()).hexdigest()[:16]]
        for exp in ("f", "g"):
            daemon.ok("block-export-del", id=exp)
        for node in ("snap", "cbw", "tmp", "disk"):
            daemon.ok("blockdev-del", node_name=node)
    finally:
        daemon.stop()
    out["tmp map"] = _map(tmp, tmp_fmt)
    out["disk map"] = _map(disk, "qcow2")
    normalized: dict[str, Any] = json.loads(json.dumps(out).replace(str(d), "$D"))
    return normalized


def _file(path: str) -> dict[str, str]:
    return {"driver": "file", "filename": path}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_guest_writes_under_fleecing_equal_qsd(tmp_path: Path, seed: int) -> None:
    want = _session("qsd", tmp_path / "qsd", seed)
    assert want["libnbd"][0] == 0, want["libnbd"]
    got = _session("qmpgraph", tmp_path / "qmpgraph", seed)
    for key in want:
        assert got[key] == want[key], key
