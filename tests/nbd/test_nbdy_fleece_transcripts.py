"""libnbd sessions on fleecing exports, live, qsd against qmpgraph.

Two independent fleecing graphs (QEMU's image-fleecing one: a qcow2 disk
under a copy-before-write filter exported as the guest, a snapshot-access
node over the filter), the guest having overwritten a few clusters through
its export first:

* ``snap-rw``: the snapshot-access node of the first graph exported
  writable (QEMU 7.2 allows it): its flags, contexts, status, reads and
  NBD_CMD_CACHE.  Not the write session: a trim not aligned to the
  filter's cluster makes qsd 7.2 abort (hbitmap_reset's alignment
  assertion); test_fleecing covers aligned writes, zeroes and trims;
* ``snap-bm``: the second graph's filter has a ``bitmap`` (the first half
  of the disk), so the snapshot is readable only there: the read-only
  session (status, structured reads, DF reads), the ``cache`` session and
  the session without structured replies fail where QEMU's do.

Each session is ``libnbd_transcript.py`` (the same client as
test_clients); its JSON transcript must be equal for both daemons.  Every
tool runs with a timeout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run
from test_clients import SYSTEM_PYTHON, TRANSCRIPT, need_libnbd

pytestmark = pytest.mark.qemu

GUEST = ["write -P 7 0 4k", "write -z 512k 64k", "discard 1M 64k", "write -P 8 1600k 8k"]
SESSIONS = [("snap-rw", "ro"), ("snap-rw", "cache"), ("snap-bm", "ro"), ("snap-bm", "cache")]
SESSIONS += [("snap-bm", "simple"), ("snap-bm", "reads:0+4096,1048576+4096,1040384+16384")]


def _graph(daemon: LiveDaemon, d: Path, n: int, bitmap: bool) -> None:
    """disk{n} (2 MiB of data) under cbw{n} with target tmp{n}, snapshot snap{n}."""
    disk, tmp = str(d / f"disk{n}.qcow2"), str(d / f"tmp{n}.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "2M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1536k", "-c", "write -z 1536k 64k", disk)
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp, "2M")
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        node_name=f"disk{n}",
        file={"driver": "file", "filename": disk},
    )
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        node_name=f"tmp{n}",
        discard="unmap",
        file={"driver": "file", "filename": tmp},
    )
    cbw: dict[str, Any] = {"file": f"disk{n}", "target": f"tmp{n}"}
    if bitmap:
        daemon.ok("block-dirty-bitmap-add", node=f"disk{n}", name="half", disabled=True)
        guest = f"disk{n}"
        # block-dirty-bitmap-merge cannot set bits; a bitmap made dirty by a
        # write is what a backup tool has: record one on a scratch bitmap.
        daemon.ok("block-dirty-bitmap-add", node=guest, name="rec")
        daemon.ok("block-export-add", type="nbd", id="pre", node_name=guest, writable=True)
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", daemon.uri(guest)],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert res.returncode == 0, res
        daemon.ok("block-export-del", id="pre")
        daemon.ok("block-dirty-bitmap-merge", node=guest, target="half", bitmaps=["rec"])
        daemon.ok("block-dirty-bitmap-remove", node=guest, name="rec")
        cbw["bitmap"] = {"node": guest, "name": "half"}
    daemon.ok("blockdev-add", driver="copy-before-write", node_name=f"cbw{n}", **cbw)
    daemon.ok(
        "blockdev-add",
        driver="snapshot-access",
        node_name=f"snap{n}",
        discard="unmap",
        file=f"cbw{n}",
    )
    daemon.ok("block-export-add", type="nbd", id=f"g{n}", node_name=f"cbw{n}", writable=True)
    args = [a for c in GUEST for a in ("-c", c)]
    res = subprocess.run(
        ["qemu-io", "-f", "raw", *args, daemon.uri(f"cbw{n}")],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert res.returncode == 0, res


def _session(kind: str, d: Path) -> dict[str, Any]:
    d.mkdir(parents=True)
    daemon = LiveDaemon(kind, require_qemu(), d / "run", [])
    out: dict[str, Any] = {}
    try:
        daemon.start_nbd()
        _graph(daemon, d, 1, bitmap=False)
        _graph(daemon, d, 2, bitmap=True)
        daemon.ok(
            "block-export-add",
            type="nbd",
            id="rw",
            node_name="snap1",
            name="snap-rw",
            writable=True,
        )
        daemon.ok("block-export-add", type="nbd", id="bm", node_name="snap2", name="snap-bm")
        for name, mode in SESSIONS:
            res = subprocess.run(
                [SYSTEM_PYTHON, TRANSCRIPT, daemon.nbd_path, name, mode],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            got = json.loads(res.stdout) if res.returncode == 0 else res.stderr[-300:]
            out[f"{name} {mode}"] = [res.returncode, got]
        out["nodes"] = {
            n["node-name"]: n.get("dirty-bitmaps")
            for n in daemon.ok("query-named-block-nodes", flat=True)
            if n["node-name"] in ("cbw1", "cbw2")
        }
    finally:
        daemon.stop()
    normalized: dict[str, Any] = json.loads(json.dumps(out).replace(str(d), "$D"))
    return normalized


def test_fleecing_export_sessions_equal_qsd(tmp_path: Path) -> None:
    need_libnbd()
    want = _session("qsd", tmp_path / "qsd")
    # QEMU 7.2's facts pinned here: every session ran, and the bitmap-limited
    # snapshot refuses reads outside its bitmap.
    assert all(v[0] == 0 for k, v in want.items() if k != "nodes"), want
    got = _session("qmpgraph", tmp_path / "qmpgraph")
    for key in want:
        assert got.get(key) == want[key], key
    assert got == want
