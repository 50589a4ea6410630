"""Block queries through the dispatcher: structure and orders.

Byte-exact replies are compared with qemu-storage-daemon by the differential
scripts ``query-*.qmp`` and ``blockdev-*.qmp``; these tests cover what a
storage daemon cannot show over QMP yet (BlockBackends, jobs) and the caches.
"""

from __future__ import annotations

from pathlib import Path

from cmdkit import Client
from test_blockdev import qcow2

from qmpgraph.graph.model import BlockBackend, Job
from qmpgraph.graph.perms import OpenFlag, Perm, Role
from qmpgraph.transactions.actions import add_root_parent, set_open_flags
from qmpgraph.transactions.composite import root_attach
from qmpgraph.transactions.engine import Transaction


def test_named_nodes_newest_first_and_flat_depth(tmp_path: Path) -> None:
    c = Client()
    qcow2(tmp_path / "base.qcow2")
    qcow2(tmp_path / "mid.qcow2", backing="base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", backing="mid.qcow2")
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)}},
    )
    full = c.ok("query-named-block-nodes")
    flat = c.ok("query-named-block-nodes", {"flat": True})
    assert [i["node-name"] for i in full] == c.names()
    assert full[-1]["node-name"] == "n0"
    info = {i["node-name"]: i for i in full}["top"]
    assert info["backing_file_depth"] == 2
    assert info["image"]["backing-image"]["backing-image"]["filename"] == str(
        tmp_path / "base.qcow2"
    )
    assert info["image"]["full-backing-filename"] == str(tmp_path / "mid.qcow2")
    assert info["backing_file"] == str(tmp_path / "mid.qcow2")
    flat_top = {i["node-name"]: i for i in flat}["top"]
    assert flat_top["backing_file_depth"] == 0 and "backing-image" not in flat_top["image"]
    data = info["image"]["format-specific"]["data"]
    assert data == {
        "compat": "1.1",
        "extended-l2": False,
        "lazy-refcounts": False,
        "corrupt": False,
        "refcount-bits": 16,
        "compression-type": "zlib",
    }


def test_debug_graph_with_backend_and_job() -> None:
    """Visit order: BBs and their root edge, jobs and their edges, then named nodes."""
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"})
    g = c.daemon.graph
    r0, n0 = g.lookup("r0"), g.lookup("n0")
    assert r0 is not None and n0 is not None
    with Transaction() as tran:
        bb = BlockBackend("", device=None)
        add_root_parent(tran, g, bb)
        root_attach(
            tran, g, bb, r0, "root", role=Role.IMAGE, perm=int(Perm.CONSISTENT_READ), shared=0xF
        )
        job = Job("stream", "j0")
        add_root_parent(tran, g, job)
        root_attach(tran, g, job, n0, "main node", role=0, perm=0, shared=0xF)
    out = c.ok("x-debug-query-block-graph")
    nodes = out["nodes"]
    # prepended: reverse visit order; ids on first encounter
    assert [(n["type"], n["name"], n["id"]) for n in nodes] == [
        ("block-driver", "r0", 2),
        ("block-driver", "n0", 4),
        ("block-job", "j0", 3),
        ("block-backend", "", 1),
    ]
    edges = out["edges"]
    assert edges[-1] == {
        "parent": 1,
        "child": 2,
        "name": "root",
        "perm": ["consistent-read"],
        "shared-perm": ["resize", "write-unchanged", "write", "consistent-read"],
    }
    assert edges[-2]["name"] == "main node" and edges[-2]["parent"] == 3
    assert edges[0]["name"] == "file" and edges[0]["parent"] == 2 and edges[0]["child"] == 4


def test_query_block_lists_only_named_backends() -> None:
    c = Client()
    assert c.ok("query-block") == []
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    g = c.daemon.graph
    n0 = g.lookup("n0")
    assert n0 is not None
    with Transaction() as tran:
        anon = BlockBackend("")
        add_root_parent(tran, g, anon)
        root_attach(tran, g, anon, n0, "root", role=Role.IMAGE, perm=0, shared=0xF)
    assert c.ok("query-block") == []
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n1"})
    n1 = g.lookup("n1")
    assert n1 is not None
    with Transaction() as tran:
        named = BlockBackend("disk0")
        add_root_parent(tran, g, named)
        root_attach(tran, g, named, n1, "root", role=Role.IMAGE, perm=0, shared=0xF)
    (info,) = c.ok("query-block")
    assert info["device"] == "disk0" and info["inserted"]["node-name"] == "n1"


def test_many_nodes_query() -> None:
    """A wide graph is queried in one pass (each node's info built once)."""
    c = Client()
    for i in range(300):
        c.dispatcher.dispatch(
            c.session,
            {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": f"n{i}"}},
        )
    out = c.ok("query-named-block-nodes")
    assert len(out) == 300 and out[0]["node-name"] == "n299"


def test_file_facts_follow_the_node_state(tmp_path: Path) -> None:
    """Cached stat facts belong to one node state: a re-added node is re-read."""
    img = tmp_path / "f.img"
    img.write_bytes(bytes(1000))
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    assert c.ok("query-named-block-nodes")[0]["image"]["virtual-size"] == 1024
    c.ok("blockdev-del", {"node-name": "f"})
    img.write_bytes(bytes(5000))
    c.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    assert c.ok("query-named-block-nodes")[0]["image"]["virtual-size"] == 5120


def test_repeated_query_sees_graph_and_file_changes(tmp_path: Path) -> None:
    """The cached reply is reused only while neither the graph nor a file changed."""
    c = Client()
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\0" * 512)
    c.ok("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)})
    first = c.ok("query-named-block-nodes")
    assert c.ok("query-named-block-nodes") == first
    # Another process writes to the image: QEMU stats the file on every query.
    with img.open("ab") as f:
        f.write(b"x" * 65536)
    grown = c.ok("query-named-block-nodes")
    assert grown[0]["image"]["virtual-size"] == 512 + 65536
    # A graph change made directly through the engine, not through a command.
    node = c.daemon.graph.lookup("f0")
    assert node is not None
    with Transaction() as tran:
        set_open_flags(tran, node, int(node.open_flags) & ~int(OpenFlag.RDWR))
    after = c.ok("query-named-block-nodes")
    assert [grown[0]["ro"], after[0]["ro"]] == [False, True]
