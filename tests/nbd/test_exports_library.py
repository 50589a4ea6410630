"""Export commands called as a library (no trio): graph effects, digests, events.

Messages were recorded from qsd 7.2 (export-nbd-*.qmp run the same cases).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.commands.exports import export_table
from qmpgraph.graph.digest import graph_digest


def _client(tmp_path: Path) -> Client:
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(1 << 20))
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(img), "node-name": "f0"})
    c.ok("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r0"})
    ro = {"driver": "null-co", "node-name": "n0", "read-only": True}
    c.ok("blockdev-add", ro)
    return c


def test_failures_leave_the_graph_unchanged(tmp_path: Path) -> None:
    c = _client(tmp_path)
    before = graph_digest(c.daemon.graph)
    reply = c.run("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0"})
    assert reply["error"]["desc"] == "NBD server not running"
    assert graph_digest(c.daemon.graph) == before
    sock = str(tmp_path / "n.sock")
    c.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    try:
        before = graph_digest(c.daemon.graph)
        args = {"type": "nbd", "id": "e0", "node-name": "n0", "writable": True}
        reply = c.run("block-export-add", args)
        assert reply["error"]["desc"] == "Cannot export read-only node as writable"
        args = {"type": "nbd", "id": "e0", "node-name": "r0", "bitmaps": ["b"]}
        assert c.run("block-export-add", args)["error"]["desc"] == "Bitmap 'b' is not found"
        assert graph_digest(c.daemon.graph) == before
        assert export_table(c.daemon).exports == []
    finally:
        c.ok("nbd-server-stop")
    assert not Path(sock).exists()


def test_export_is_a_root_parent_and_deletion_emits_after_commit(tmp_path: Path) -> None:
    c = _client(tmp_path)
    events: list[dict[str, object]] = []
    c.daemon.subscribe(events.append)
    c.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "s")}}})
    c.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "writable": True})
    node = c.daemon.graph.lookup("r0")
    assert node is not None
    (edge,) = node.parents
    assert (edge.name, edge.perm, edge.shared) == ("root", 0x3, 0x7)
    assert c.ok("query-block-exports") == [
        {"id": "e0", "type": "nbd", "node-name": "r0", "shutting-down": False}
    ]
    assert c.run("blockdev-del", {"node-name": "r0"})["error"]["desc"] == "Node r0 is in use"
    assert events == []
    c.ok("block-export-del", {"id": "e0"})
    assert [e["event"] for e in events] == ["BLOCK_EXPORT_DELETED"]
    assert node.parents == []
    c.ok("nbd-server-stop")
