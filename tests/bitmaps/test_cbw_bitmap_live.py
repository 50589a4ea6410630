"""copy-before-write with a user bitmap, against qemu-storage-daemon 7.2.

Both daemons: a qcow2 source gets a 4 KiB bitmap that marks two areas (NBD
writes after a clear), a copy-before-write node uses it, a snapshot-access
export shows the snapshot and the guest overwrites everything through the
cbw node.  Then, read with libnbd's python client: the snapshot's marked
clusters hold the old data, the others are refused; and the query's
internal bitmaps right after open.  Expected values are qsd's, live.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

# Reads through /usr/bin/python3 (python3-libnbd lives there only).
READER = r"""
import hashlib, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for off, n in ((0, 65536), (589824, 131072), (65536, 65536), (0, 1048576), (720896, 65536)):
    try:
        print(off, n, hashlib.sha256(h.pread(n, off)).hexdigest())
    except nbd.Error as e:
        print(off, n, "error", e.errno)
"""


def _session(kind: str, qsd: str, work: Path) -> list[Any]:
    work.mkdir(parents=True)
    for name in ("a", "t"):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "1M")
    spec = f"driver=qcow2,node-name=a,file.driver=file,file.filename={work}/a.qcow2"
    d = LiveDaemon(kind, qsd, work, [spec])
    try:
        d.start_nbd()
        d.ok("block-dirty-bitmap-add", node="a", name="b0", granularity=4096)
        d.ok("block-export-add", type="nbd", id="w", node_name="a", name="w", writable=True)
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", d.uri("w"))
        d.ok("block-dirty-bitmap-clear", node="a", name="b0")
        run("qemu-io", "-f", "raw", "-c", "write -P 2 4096 4096",
            "-c", "write -P 3 600000 70000", d.uri("w"))  # fmt: skip
        d.ok("block-export-del", id="w")
        for _ in range(100):
            if not d.ok("query-block-exports"):
                break
            time.sleep(0.05)
        d.ok("block-dirty-bitmap-disable", node="a", name="b0")
        d.ok("blockdev-add", driver="qcow2", node_name="t",
             file={"driver": "file", "filename": str(work / "t.qcow2")})  # fmt: skip
        d.ok("blockdev-add", driver="copy-before-write", node_name="cbw", file="a", target="t",
             bitmap={"node": "a", "name": "b0"})  # fmt: skip
        d.ok("blockdev-add", driver="snapshot-access", node_name="snap", file="cbw")
        d.ok("block-export-add", type="nbd", id="g", node_name="cbw", name="g", writable=True)
        d.ok("block-export-add", type="nbd", id="s", node_name="snap", name="s")
        infos = {i["node-name"]: i.get("dirty-bitmaps") for i in d.ok("query-named-block-nodes")}
        run("qemu-io", "-f", "raw", "-c", "write -P 9 0 1M", d.uri("g"))
        reads = subprocess.run(
            ["/usr/bin/python3", "-c", READER, d.uri("s")],
            capture_output=True, text=True, timeout=TIMEOUT, check=True,
        ).stdout  # fmt: skip
    finally:
        d.stop()
    return [infos["a"], infos["cbw"], reads]


def test_cbw_copies_only_what_the_bitmap_marks(tmp_path: Path) -> None:
    qsd = require_qemu()
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], check=False).returncode:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("python3-libnbd is required when CI=true")
        pytest.skip("python3-libnbd is not installed for /usr/bin/python3")
    assert shutil.which("qemu-io")
    want = _session("qsd", qsd, tmp_path / "qsd")
    got = _session("qmpgraph", qsd, tmp_path / "qmpgraph")
    assert got == want
    assert want[2].count("error") == 3
