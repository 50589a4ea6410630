"""blockdev-snapshot(-sync) and change-backing-file at library level.

The wire behaviour is compared with qemu-storage-daemon by the differential
scripts (snapshot-*.qmp, change-backing-file.qmp); these tests check what a
transcript cannot show: the graph digest after every failure, the images on
disk (read back with qemu-img), and the read-only switch at commit.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

import pytest
from cmdkit import Client

from qmpgraph.graph.digest import graph_digest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)
    return done.stdout.decode()


def info(path: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "-U", "--output=json", str(path)))
    return out


def add_qcow2(c: Client, tmp: pathlib.Path, name: str, *, parent: bool = False) -> None:
    path = str(tmp / f"{name}.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    file = {"driver": "file", "node-name": f"{name}f", "filename": path}
    c.ok("blockdev-add", {"driver": "qcow2", "node-name": name, "file": file})
    if parent:
        c.ok("blockdev-add", {"driver": "raw", "node-name": f"r{name}", "file": name})


def test_sync_with_parent_moves_parent_and_reopens_read_only(tmp_path: pathlib.Path) -> None:
    c = Client()
    add_qcow2(c, tmp_path, "a", parent=True)
    snap = tmp_path / "s.qcow2"
    c.ok("blockdev-snapshot-sync",
         {"node-name": "a", "snapshot-file": str(snap), "snapshot-node-name": "s"})  # fmt: skip
    graph = c.daemon.graph
    a, s, ra = graph.lookup("a"), graph.lookup("s"), graph.lookup("ra")
    assert a is not None and s is not None and ra is not None
    assert ra.file is not None and ra.file.child is s
    assert s.backing is not None and s.backing.child is a
    af = graph.lookup("af")
    assert a.read_only and af is not None and af.read_only
    assert not s.read_only and not s.monitor_owned
    got = info(snap)
    assert got["backing-filename"] == str(tmp_path / "a.qcow2")
    assert got["backing-filename-format"] == "qcow2"
    qemu_img("check", "-U", str(snap))


def test_sync_without_parents_frees_the_overlay(tmp_path: pathlib.Path) -> None:
    c = Client()
    add_qcow2(c, tmp_path, "a")
    c.ok("blockdev-snapshot-sync",
         {"node-name": "a", "snapshot-file": str(tmp_path / "s.qcow2"),
          "snapshot-node-name": "s"})  # fmt: skip
    assert "s" not in c.daemon.graph
    node = c.daemon.graph.lookup("a")
    assert node is not None and node.read_only
    assert (tmp_path / "s.qcow2").exists()


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({"node-name": "a"}, "New overlay node-name missing"),
        ({"node-name": "a", "snapshot-node-name": "af"}, "New overlay node-name already in use"),
        ({"node-name": "a", "snapshot-node-name": "s", "format": "nosuch"},
         "Unknown file format 'nosuch'"),
        ({"node-name": "a", "snapshot-node-name": "s", "format": "raw"},
         "Backing file not supported for file format 'raw'"),
        ({"node-name": "a", "snapshot-node-name": "bad name"}, "Invalid node-name: 'bad name'"),
        ({"node-name": "a", "snapshot-node-name": "s", "format": "raw", "mode": "existing"},
         "The overlay does not support backing images"),
    ],
)  # fmt: skip
def test_sync_failures_leave_the_graph(
    tmp_path: pathlib.Path, args: dict[str, Any], desc: str
) -> None:
    c = Client()
    add_qcow2(c, tmp_path, "a", parent=True)
    snap = tmp_path / "s.qcow2"
    if args.get("mode") == "existing":
        qemu_img("create", "-q", "-f", "raw", str(snap), "1M")
    c.fails("blockdev-snapshot-sync", {**args, "snapshot-file": str(snap)}, desc)
    node = c.daemon.graph.lookup("a")
    assert node is not None and not node.read_only


def test_sync_image_stays_after_a_later_failure(tmp_path: pathlib.Path) -> None:
    c = Client()
    add_qcow2(c, tmp_path, "a", parent=True)
    snap = tmp_path / "s.qcow2"
    c.fails(
        "transaction",
        {"actions": [
            {"type": "blockdev-snapshot-sync",
             "data": {"node-name": "a", "snapshot-file": str(snap), "snapshot-node-name": "s"}},
            {"type": "abort", "data": {}},
        ]},
        "Transaction aborted using Abort action",
    )  # fmt: skip
    assert snap.exists()
    assert info(snap)["backing-filename"] == str(tmp_path / "a.qcow2")
    assert "s" not in c.daemon.graph
    # The aborted open released the new image's locks: it can be opened again.
    c.ok("blockdev-snapshot-sync",
         {"node-name": "a", "snapshot-file": str(snap), "snapshot-node-name": "s",
          "mode": "existing"})  # fmt: skip
    assert "s" in c.daemon.graph


def test_blockdev_snapshot_checks_keep_the_digest(tmp_path: pathlib.Path) -> None:
    c = Client()
    add_qcow2(c, tmp_path, "a", parent=True)
    add_qcow2(c, tmp_path, "o")
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n"})
    c.fails("blockdev-snapshot", {"node": "a", "overlay": "af"}, "The overlay is already in use")
    c.fails("blockdev-snapshot", {"node": "a", "overlay": "n"},
            "The overlay does not support backing images")  # fmt: skip
    c.fails("blockdev-snapshot", {"node": "a", "overlay": "a"},
            "Making 'a' a backing child of 'a' would create a cycle")  # fmt: skip
    c.ok("blockdev-snapshot", {"node": "a", "overlay": "o"})
    o = c.daemon.graph.lookup("o")
    assert o is not None and o.monitor_owned and o.refcnt == 2  # monitor + the raw parent
    c.fails("blockdev-snapshot", {"node": "a", "overlay": "o"},
            "Node 'a' is busy: node is used as backing hd of 'o'")  # fmt: skip


def test_change_backing_file_rewrites_only_the_header(tmp_path: pathlib.Path) -> None:
    base, top = tmp_path / "base.img", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "raw", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top), "1M")
    c = Client()
    c.ok("blockdev-add",
         {"driver": "qcow2", "node-name": "top", "read-only": True,
          "file": {"driver": "file", "filename": str(top)}})  # fmt: skip
    before = graph_digest(c.daemon.graph)
    node = c.daemon.graph.lookup("top")
    assert node is not None
    backing = node.backing.child if node.backing is not None else None
    c.ok("change-backing-file", {"device": "top", "image-node-name": "top", "backing-file": "x"})
    got = info(top)
    # QEMU 7.2 stores the image's own format as the backing format here.
    assert (got["backing-filename"], got["backing-filename-format"]) == ("x", "qcow2")
    assert node.read_only
    assert node.backing is not None and node.backing.child is backing
    assert graph_digest(c.daemon.graph) != before  # the header view changed, nothing else
    c.fails("change-backing-file",
            {"device": "top", "image-node-name": "top", "backing-file": "y" * 1024},
            f"Could not change backing file to '{'y' * 1024}': Invalid argument")  # fmt: skip
    assert info(top)["backing-filename"] == "x"
