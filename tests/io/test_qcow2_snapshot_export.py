"""qcow2 internal snapshots exported over NBD by a qmpgraph daemon (live).

qmpgraph's downstream option ``__org.qmpgraph_snapshot`` of snapshot-access
selects an internal snapshot of the qcow2 node under it.  Images are made by
``qemu-img`` and written by ``qemu-io``; snapshots are taken by ``qemu-img
snapshot -c`` or by ``blockdev-snapshot-internal-sync``; while the active
layer keeps changing through a writable export, ``nbdcopy`` of the snapshot
export must equal ``qemu-img convert -l SNAP`` of the same image (the
expected side comes from QEMU's tool), and ``qemu-img check`` must find the
image clean.  Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_qcow2_export import _io, _need

pytestmark = pytest.mark.qemu

MiB = 1 << 20
OPTION = "__org.qmpgraph_snapshot"
# Written over NBD after the snapshots: over their data, partial clusters,
# zeroes, a discard and the end of the image.
ACTIVE_WRITES = [
    "write -P 0x5a 0 3M",
    "write -P 0x66 1000000 300000",
    "write -z 2M 128k",
    "discard 3M 64k",
    "write -P 0x77 4000k 96k",
    "flush",
]


def _raw(daemon: LiveDaemon, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A command with argument names as given (``LiveDaemon.qmp`` rewrites ``_``)."""
    daemon.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
    daemon.file.flush()
    while True:
        reply = json.loads(daemon.file.readline())
        if "event" not in reply:
            return dict(reply)


def _add_snapshot_access(daemon: LiveDaemon, name: str, snapshot: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": "snapshot-access", "node-name": name, "file": "q0"}
    if snapshot is not None:
        args[OPTION] = snapshot
    return _raw(daemon, "blockdev-add", args)


def _convert(image: Path, snapshot: str, out: Path) -> bytes:
    run(
        "qemu-img",
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-l",
        snapshot,
        "-O",
        "raw",
        str(image),
        str(out),
    )
    return out.read_bytes()


def make_image(d: Path) -> Path:
    """a.qcow2 (4 MiB): data, a compressed and a zero cluster; snapshot 'snap1'
    (qemu-img), then more data in the active layer."""
    d.mkdir(parents=True, exist_ok=True)
    image = d / "a.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(image), "4M")
    _io(image, "qcow2", "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k", "write -z 3M 64k")
    run("qemu-img", "snapshot", "-c", "snap1", str(image))
    _io(image, "qcow2", "write -P 0x33 512k 1M")
    return image


@pytest.fixture
def image_daemon(tmp_path: Path) -> Iterator[tuple[LiveDaemon, Path]]:
    """A qmpgraph daemon with a.qcow2 as node q0 and an NBD server."""
    qsd = require_qemu()
    work = tmp_path / "d"
    image = make_image(work)
    daemon = LiveDaemon("qmpgraph", qsd, work, [])
    try:
        daemon.start_nbd()
        daemon.ok("blockdev-add", driver="qcow2", node_name="q0",
                  file={"driver": "file", "filename": "a.qcow2"})  # fmt: skip
        yield daemon, image
    finally:
        daemon.stop()


def test_snapshots_read_while_active_layer_changes(
    image_daemon: tuple[LiveDaemon, Path], tmp_path: Path
) -> None:
    """snap1 (qemu-img's, by name) and snap2 (taken over QMP, by id) read their
    own data while the active layer is rewritten through another export."""
    _need("nbdcopy")
    daemon, image = image_daemon
    daemon.ok("block-export-add", type="nbd", id="rw", node_name="q0", name="rw", writable=True)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 1536k 512k", daemon.uri("rw"))
    daemon.ok("blockdev-snapshot-internal-sync", device="q0", name="snap2")
    assert "return" in _add_snapshot_access(daemon, "sa1", "snap1")
    assert "return" in _add_snapshot_access(daemon, "sa2", "2")
    daemon.ok("block-export-add", type="nbd", id="e1", node_name="sa1", name="snap1")
    daemon.ok("block-export-add", type="nbd", id="e2", node_name="sa2", name="snap2")
    out = run("qemu-io", "-f", "raw", *[a for w in ACTIVE_WRITES for a in ("-c", w)],
              daemon.uri("rw"))  # fmt: skip
    assert "error" not in out.lower(), out
    got1, got2 = tmp_path / "got1.raw", tmp_path / "got2.raw"
    run("nbdcopy", daemon.uri("snap1"), str(got1))
    run("nbdcopy", daemon.uri("snap2"), str(got2))
    # The snapshot-access nodes still exist: the image is open, so -U.
    assert got1.read_bytes() == _convert(image, "snap1", tmp_path / "want1.raw")
    assert got2.read_bytes() == _convert(image, "snap2", tmp_path / "want2.raw")
    assert got1.read_bytes() != got2.read_bytes()
    # The active layer holds the new data.
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0x77 4000k 96k",
        daemon.uri("rw"))  # fmt: skip
    daemon.stop()
    run("qemu-img", "check", "-f", "qcow2", str(image))
    listed = run("qemu-img", "snapshot", "-l", str(image))
    assert " snap1 " in listed and " snap2 " in listed


def test_snapshot_with_its_own_size(image_daemon: tuple[LiveDaemon, Path], tmp_path: Path) -> None:
    """A snapshot taken at 4 MiB exports 4 MiB after the image grew to 8 MiB."""
    _need("nbdcopy")
    _need("nbdinfo")
    daemon, image = image_daemon
    daemon.ok("blockdev-snapshot-internal-sync", device="q0", name="small")
    daemon.ok("block_resize", node_name="q0", size=8 * MiB)
    daemon.ok("block-export-add", type="nbd", id="rw", node_name="q0", name="rw", writable=True)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x99 3M 2M", "-c", "write -P 0x98 7M 1M",
        daemon.uri("rw"))  # fmt: skip
    assert "return" in _add_snapshot_access(daemon, "sa", "small")
    daemon.ok("block-export-add", type="nbd", id="e", node_name="sa", name="small")
    size = run("nbdinfo", "--size", daemon.uri("small")).strip()
    assert int(size) == 4 * MiB
    got = tmp_path / "got.raw"
    run("nbdcopy", daemon.uri("small"), str(got))
    # convert -l reads the snapshot at the image's current size (QEMU has no
    # snapshot-sized view): what lies past the snapshot's size reads as zeros.
    want = _convert(image, "small", tmp_path / "want.raw")
    assert len(want) == 8 * MiB
    assert got.read_bytes() == want[: 4 * MiB]
    assert want[4 * MiB :] == bytes(4 * MiB)
    info = run("qemu-img", "info", "-U", "--output=json", str(image))
    assert json.loads(info)["virtual-size"] == 8 * MiB
    daemon.stop()
    run("qemu-img", "check", "-f", "qcow2", str(image))


def test_writes_refused_and_exported_snapshot_kept(image_daemon: tuple[LiveDaemon, Path]) -> None:
    """Writes to the snapshot export fail, and its snapshot cannot be deleted
    while the snapshot-access node exists (reached through a throttle root)."""
    daemon, image = image_daemon
    daemon.ok("object-add", qom_type="throttle-group", id="tg")
    daemon.ok("blockdev-add", driver="throttle", node_name="thr", throttle_group="tg", file="q0")
    assert "return" in _add_snapshot_access(daemon, "sa", "1")
    reply = daemon.qmp("blockdev-snapshot-delete-internal-sync", device="thr", name="snap1")
    assert reply["error"]["desc"] == "Snapshot 'snap1' on device 'thr' is in use by node 'sa'"
    daemon.ok("block-export-add", type="nbd", id="e", node_name="sa", name="s", writable=True)
    res = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x12 0 64k", daemon.uri("s")],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert "write failed: Operation not supported" in res.stdout + res.stderr
    for _ in range(100):
        # qemu-io has exited, but the daemon may not have seen its hang-up yet
        # (either daemon: the check is "clients still connected").
        reply = daemon.qmp("block-export-del", id="e")
        if "error" not in reply or "still in use" not in reply["error"]["desc"]:
            break
        time.sleep(0.02)
    assert "return" in reply, reply
    for _ in range(100):  # the export goes away once its clients did
        if not daemon.ok("query-block-exports"):
            break
        time.sleep(0.02)
    daemon.ok("blockdev-del", node_name="sa")
    info = daemon.ok("blockdev-snapshot-delete-internal-sync", device="thr", name="snap1")
    assert (info["id"], info["name"]) == ("1", "snap1")
    daemon.stop()
    run("qemu-img", "check", "-f", "qcow2", str(image))
    assert "snap1" not in run("qemu-img", "snapshot", "-l", str(image))


def test_open_errors_and_schema(image_daemon: tuple[LiveDaemon, Path]) -> None:
    """Unknown snapshots and non-qcow2 children are refused; the option is in
    query-qmp-schema; without it snapshot-access over qcow2 opens as in 7.2."""
    daemon, _ = image_daemon
    reply = _add_snapshot_access(daemon, "sa", "nope")
    assert reply["error"]["desc"] == "Can't find snapshot 'nope' on node 'q0'"
    daemon.ok("blockdev-add", driver="null-co", node_name="n0")
    args = {"driver": "snapshot-access", "node-name": "sn", "file": "n0", OPTION: "1"}
    reply = _raw(daemon, "blockdev-add", args)
    assert reply["error"]["desc"] == f"'{OPTION}' needs a qcow2 node as 'file', not 'null-co'"
    reply = _raw(daemon, "blockdev-add", {**args, "driver": "raw", "node-name": "r"})
    assert reply["error"]["desc"] == f"Parameter '{OPTION}' is unexpected"
    schema = daemon.ok("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    add = next(e for e in schema if e.get("name") == "blockdev-add")
    variants = by_name[add["arg-type"]]["variants"]
    access = by_name[next(v["type"] for v in variants if v["case"] == "snapshot-access")]
    assert access["members"][-1] == {"name": OPTION, "default": None, "type": "str"}
    # Only snapshot-access has it (its QEMU type is shared with other drivers).
    owners = [e["name"] for e in schema if {"name": OPTION, "default": None, "type": "str"}
              in e.get("members", [])]  # fmt: skip
    assert owners == [access["name"]]
    assert "return" in _add_snapshot_access(daemon, "plain", None)
    nodes = daemon.ok("query-named-block-nodes", flat=True)
    plain = next(n for n in nodes if n["node-name"] == "plain")
    assert plain["image"]["virtual-size"] == 4 * MiB


def _snapshot_session(kind: str, qsd: str, work: Path) -> Path:
    """One daemon takes and deletes snapshots between guest writes over NBD."""
    image = make_image(work)
    daemon = LiveDaemon(kind, qsd, work, [])
    try:
        daemon.start_nbd()
        daemon.ok("blockdev-add", driver="qcow2", node_name="q0",
                  file={"driver": "file", "filename": "a.qcow2"})  # fmt: skip
        daemon.ok("block-export-add", type="nbd", id="rw", node_name="q0", name="rw",
                  writable=True)  # fmt: skip
        steps: list[tuple[str, dict[str, Any]] | str] = [
            "write -P 0x41 100k 300k",
            ("blockdev-snapshot-internal-sync", {"name": "t1"}),
            "write -P 0x42 0 2M",
            ("blockdev-snapshot-internal-sync", {"name": "t2"}),
            "write -z 1M 1M",
            ("blockdev-snapshot-delete-internal-sync", {"name": "t1"}),
            "discard 0 512k",
            ("blockdev-snapshot-delete-internal-sync", {"id": "1"}),  # qemu-img's snap1
            "write -P 0x43 3M 1M",
        ]
        for step in steps:
            if isinstance(step, str):
                run("qemu-io", "-f", "raw", "-c", step, daemon.uri("rw"))
            else:
                daemon.ok(step[0], device="q0", **step[1])
    finally:
        daemon.stop()
    return image


def test_snapshots_taken_as_qsd_takes_them(tmp_path: Path) -> None:
    """The same QMP snapshot commands between the same guest writes, on qsd and
    on qmpgraph: both images check clean, list the same snapshots (dates
    aside) and hold the same data in every snapshot and the active layer."""
    _need("nbdcopy")
    qsd = require_qemu()
    images = {kind: _snapshot_session(kind, qsd, tmp_path / kind) for kind in ("qsd", "qmpgraph")}
    listed: dict[str, list[dict[str, Any]]] = {}
    for kind, image in images.items():
        run("qemu-img", "check", "-f", "qcow2", str(image))
        info = json.loads(run("qemu-img", "info", "--output=json", str(image)))
        listed[kind] = [
            {k: v for k, v in s.items() if not k.startswith(("date", "vm-clock"))}
            for s in info["snapshots"]
        ]
    assert listed["qmpgraph"] == listed["qsd"]
    assert [(s["id"], s["name"]) for s in listed["qsd"]] == [("3", "t2")]
    for snap in ("t2",):
        want = _convert(images["qsd"], snap, tmp_path / f"qsd-{snap}.raw")
        assert _convert(images["qmpgraph"], snap, tmp_path / f"mine-{snap}.raw") == want
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(images["qmpgraph"]),
        str(images["qsd"]))  # fmt: skip
