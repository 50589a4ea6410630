"""Internal snapshots at library level, checked against QEMU's tools.

The messages and check order are compared live with qemu-storage-daemon by
the snapshot-internal-*.qmp differential scripts; replies carrying dates
(``blockdev-snapshot-delete-internal-sync`` of a snapshot taken over QMP,
``query-named-block-nodes`` after one) cannot be, so here the expected
values come from ``qemu-img info --output=json`` and ``qemu-img snapshot
-l`` of the same image, and ``qemu-img check`` must find it clean.  The
copy-on-write of shared clusters after a snapshot is checked with
``qemu-img convert -l`` against the image as it was.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cmdkit import Client

from qmpgraph.drivers.qcow2_io import open_image
from qmpgraph.drivers.qcow2_snapshot_write import create_snapshot, delete_snapshot
from qmpgraph.drivers.qcow2_storage import FdFile
from qmpgraph.graph.digest import graph_digest
from qmpgraph.io.qcow2_hook import QCOW2_IO
from qmpgraph.schema import load, load_qemu

pytestmark = pytest.mark.qemu
OPTION = "__org.qmpgraph_snapshot"


def _tool(*cmd: str) -> str:
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (cmd, res.stdout, res.stderr)
    return res.stdout


def _image(path: Path, *writes: str, opts: str = "", size: str = "4M") -> Path:
    _tool("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []),
          str(path), size)  # fmt: skip
    if writes:
        _tool("qemu-io", "-f", "qcow2", *[a for w in writes for a in ("-c", w)], str(path))
    return path


def _qemu_snapshots(path: Path) -> list[dict[str, Any]]:
    info = json.loads(_tool("qemu-img", "info", "-U", "--output=json", str(path)))
    return list(info.get("snapshots", []))


def _node_snapshots(client: Client, name: str) -> list[dict[str, Any]]:
    nodes = client.ok("query-named-block-nodes", {"flat": True})
    node = next(n for n in nodes if n["node-name"] == name)
    return list(node["image"].get("snapshots", []))


def _check(path: Path) -> None:
    _tool("qemu-img", "check", "-U", "-f", "qcow2", str(path))


def _open(client: Client, path: Path, name: str = "q") -> None:
    client.ok("blockdev-add", {"driver": "qcow2", "node-name": name,
                               "file": {"driver": "file", "filename": str(path)}})  # fmt: skip


def test_snapshots_listed_and_deleted_as_qemu_img_sees_them(tmp_path: Path, qsd_path: str) -> None:
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k")
    client = Client()
    _open(client, image)
    before = time.time()
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"})
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "s2"})
    listed = _qemu_snapshots(image)
    assert [(s["id"], s["name"]) for s in listed] == [("1", "s1"), ("2", "s2")]
    assert _node_snapshots(client, "q") == listed
    # qemu-storage-daemon's virtual clock is its host clock: vm-clock = date.
    for snap in listed:
        assert before - 1 <= snap["date-sec"] <= time.time() + 1
        assert (snap["vm-clock-sec"], snap["vm-clock-nsec"]) == (snap["date-sec"],
                                                                snap["date-nsec"])  # fmt: skip
        assert "icount" not in snap
    _check(image)
    assert client.ok("blockdev-snapshot-delete-internal-sync",
                     {"device": "q", "name": "s1"}) == listed[0]  # fmt: skip
    assert _qemu_snapshots(image) == listed[1:] == _node_snapshots(client, "q")
    _check(image)
    # A new id is one more than the largest left.
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "s3"})
    assert [s["id"] for s in _qemu_snapshots(image)] == ["2", "3"]
    assert client.ok("blockdev-snapshot-delete-internal-sync",
                     {"device": "q", "id": "2", "name": "s2"}) == listed[1]  # fmt: skip
    client.ok("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "3"})
    assert _qemu_snapshots(image) == [] == _node_snapshots(client, "q")
    _check(image)


def test_failed_transaction_deletes_the_new_snapshots(tmp_path: Path, qsd_path: str) -> None:
    """As QEMU's internal_snapshot_abort: deleted, not undone byte for byte (the
    file keeps its grown length; script fuzz-snapshot-internal-abort shows qsd's)."""
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 0x11 0 1M")
    client = Client()
    _open(client, image)
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "kept"})
    raw = image.read_bytes()
    digest = graph_digest(client.daemon.graph)
    actions = [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "t1"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "t2"}},
        {"type": "abort", "data": {}},
    ]
    client.fails("transaction", {"actions": actions}, "Transaction aborted using Abort action")
    assert len(image.read_bytes()) > len(raw)
    assert graph_digest(client.daemon.graph) == digest
    assert [s["name"] for s in _node_snapshots(client, "q")] == ["kept"]
    _check(image)


def test_refcount_overflow_fails_cleanly(tmp_path: Path, qsd_path: str) -> None:
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 1 0 128k", opts="refcount_bits=1")
    client = Client()
    _open(client, image)
    raw = image.read_bytes()
    client.fails("blockdev-snapshot-internal-sync", {"device": "q", "name": "x"},
                 "Failed to create snapshot 'x' on device 'q': Invalid argument")  # fmt: skip
    assert image.read_bytes() == raw


def test_writes_after_a_snapshot_copy_shared_clusters(tmp_path: Path, qsd_path: str) -> None:
    """Data, compressed and zero clusters are shared after a snapshot; writes to
    the active layer copy them, and convert -l still gives the old data."""
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k",
                   "write -z 3M 64k", "write -P 0x44 3136k 64k")  # fmt: skip
    orig = tmp_path / "orig.raw"
    _tool("qemu-img", "convert", "-O", "raw", str(image), str(orig))
    host = FdFile.open(image)
    try:
        now = time.time_ns()
        create_snapshot(host, "a", date_sec=now // 10**9, date_nsec=now % 10**9)
        create_snapshot(host, "b", date_sec=now // 10**9, date_nsec=now % 10**9)
    finally:
        host.close()
    _check(image)
    with open_image(image) as img:
        img.write(0, b"\x33" * 70000)  # data clusters, partly
        img.write(2 * (1 << 20) + 100, b"\x55" * 10)  # the compressed cluster
        img.write_zeroes(512 << 10, 128 << 10, may_unmap=True)
        img.discard(3136 << 10, 64 << 10)
        img.write(3 << 20, b"\x66" * 4096)  # the zero cluster
    _check(image)
    for name in ("a", "b"):
        snap = tmp_path / f"{name}.raw"
        _tool("qemu-img", "convert", "-l", name, "-O", "raw", str(image), str(snap))
        assert snap.read_bytes() == orig.read_bytes()
    out = _tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 70000",
                "-c", "read -P 0x55 2097252 10", "-c", "read -P 0 512k 128k",
                "-c", "read -P 0x66 3M 4k", str(image))  # fmt: skip
    assert "verification failed" not in out, out
    # Deleting every snapshot leaves the clusters to the active layer alone.
    host = FdFile.open(image)
    try:
        delete_snapshot(host, None, "a")
        _check(image)
        delete_snapshot(host, "2", None)
    finally:
        host.close()
    _check(image)
    with open_image(image) as img:
        img.write(0, b"\x77" * 4096)  # in place now (COPIED again)
    _check(image)
    assert _qemu_snapshots(image) == []


def test_downstream_member_only_on_blockdev_adds_snapshot_access() -> None:
    """The overlay adds one type and retargets one variant; QEMU's rest is intact."""
    qemu, ours = load_qemu().entities, load().entities
    assert len(ours) == len(qemu) + 1
    new = ours[-1]
    assert new["members"][-1] == {"name": OPTION, "default": None, "type": "str"}
    changed = [(a, b) for a, b in zip(qemu, ours, strict=False) if a != b]
    assert len(changed) == 1
    old_union, union = changed[0]
    add = next(e for e in qemu if e["name"] == "blockdev-add")
    assert union["name"] == add["arg-type"]
    moved = [
        (a["case"], a["type"], b["type"])
        for a, b in zip(old_union["variants"], union["variants"], strict=True)
        if a != b
    ]
    assert len(moved) == 1 and moved[0][0] == "snapshot-access" and moved[0][2] == new["name"]
    base = next(e for e in qemu if e["name"] == moved[0][1])
    assert new["members"][:-1] == base["members"]


@pytest.mark.parametrize(
    ("seed", "opts"),
    [(1, "cluster_size=4096"), (2, "cluster_size=4096,compat=0.10"), (3, "cluster_size=65536")],
)
def test_random_writes_and_snapshots_match_a_model(
    tmp_path: Path, qsd_path: str, seed: int, opts: str
) -> None:
    """Random guest writes, zeroes, discards, snapshots and deletes on one image;
    every snapshot's convert -l and the active layer equal a byte model, and
    qemu-img check finds the image clean after every snapshot operation."""
    del qsd_path
    rng = random.Random(seed)
    size = 8 << 20
    image = _image(tmp_path / "a.qcow2", "write -P 0x10 0 3M", opts=opts, size="8M")
    active = bytearray(b"\x10" * (3 << 20) + bytes(size - (3 << 20)))
    snaps: dict[str, bytes] = {}
    counter = 0
    img = open_image(image)
    try:
        for _ in range(60):
            op = rng.random()
            if op < 0.15 or (op < 0.25 and snaps):
                if op < 0.15:
                    counter += 1
                    create_snapshot(img.host, f"s{counter}", date_sec=counter, date_nsec=0)
                    snaps[f"s{counter}"] = bytes(active)
                else:
                    name = rng.choice(sorted(snaps))
                    delete_snapshot(img.host, None, name)
                    del snaps[name]
                # The metadata changed under the image: reopen, as the data path does.
                img.close()
                _check(image)
                img = open_image(image)
                continue
            offset = rng.randrange(0, size - 1)
            length = rng.randrange(1, min(size - offset, 700_000) + 1)
            if op < 0.8:
                data = bytes([rng.randrange(1, 256)]) * length
                img.write(offset, data)
                active[offset : offset + length] = data
            elif op < 0.9:
                img.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
                active[offset : offset + length] = bytes(length)
            else:
                # Discard drops whole clusters only (they read zeros: no backing).
                img.discard(offset, length)
                cs = img.cluster_size
                lo, hi = -(-offset // cs) * cs, (offset + length) // cs * cs
                if hi > lo:
                    active[lo:hi] = bytes(hi - lo)
    finally:
        img.close()
    assert counter >= 3
    _check(image)
    listed = [s["name"] for s in _qemu_snapshots(image)]
    assert listed == sorted(snaps, key=lambda n: int(n[1:]))
    for name, want in snaps.items():
        out = tmp_path / f"{name}.raw"
        _tool("qemu-img", "convert", "-l", name, "-O", "raw", str(image), str(out))
        assert out.read_bytes() == want, name
    out = tmp_path / "active.raw"
    _tool("qemu-img", "convert", "-O", "raw", str(image), str(out))
    assert out.read_bytes() == bytes(active)


def test_resize_after_a_snapshot_keeps_it(tmp_path: Path, qsd_path: str) -> None:
    """block_resize (shrink, then grow) of a node whose image has a snapshot taken
    over QMP: the node state carries the new snapshot count to the resize, the
    image checks clean, the snapshot keeps its data, the active layer is cut."""
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 0x11 0 4M")
    orig = tmp_path / "orig.raw"
    _tool("qemu-img", "convert", "-O", "raw", str(image), str(orig))
    client = Client()
    _open(client, image)
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "x"})
    client.ok("block_resize", {"node-name": "q", "size": 1 << 20})
    client.ok("block_resize", {"node-name": "q", "size": 8 << 20})
    _check(image)
    snap = tmp_path / "x.raw"
    _tool("qemu-img", "convert", "-U", "-l", "x", "-O", "raw", str(image), str(snap))
    assert snap.read_bytes()[: 4 << 20] == orig.read_bytes()
    out = _tool("qemu-io", "-U", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 1M 7M",
                str(image))  # fmt: skip
    assert "verification failed" not in out, out


def test_refused_while_the_data_path_works_on_the_image(tmp_path: Path, qsd_path: str) -> None:
    """QEMU drains the node; a synchronous command cannot wait for a worker
    thread, so it refuses (EBUSY) instead of changing metadata under it."""
    del qsd_path
    image = _image(tmp_path / "a.qcow2", "write -P 0x11 0 1M")
    client = Client()
    _open(client, image)
    node = client.daemon.graph.lookup("q")
    assert node is not None
    opened = QCOW2_IO._image(node)
    opened.runner.busy = True  # as while a worker drains the image's calls
    try:
        busy = "Failed to create snapshot 'x' on device 'q': Device or resource busy"
        client.fails("blockdev-snapshot-internal-sync", {"device": "q", "name": "x"}, busy)
    finally:
        opened.runner.busy = False
    client.ok("blockdev-snapshot-internal-sync", {"device": "q", "name": "x"})
    opened = QCOW2_IO._image(node)
    opened.runner.busy = True
    try:
        client.fails("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "x"},
                     "Failed to remove snapshot from snapshot list: "
                     "Device or resource busy")  # fmt: skip
    finally:
        opened.runner.busy = False
    client.ok("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "x"})
    _check(image)
