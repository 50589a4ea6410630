"""blockdev-add and blockdev-del through the dispatcher (no sockets).

Messages are those of the reference (section 5.1/5.2, verified on 7.2); the
byte-exact comparison with qemu-storage-daemon is in
``tests/differential/scripts/blockdev-*.qmp``.  Here: one transaction per
command, atomicity (digest unchanged on failure), ownership and references.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cmdkit import Client

from qmpgraph.graph.model import BlockBackend
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.actions import add_root_parent
from qmpgraph.transactions.composite import root_attach
from qmpgraph.transactions.engine import Transaction


def qcow2(path: Path, backing: str | None = None, size: int = 1 << 20) -> Path:
    """A header-only qcow2 v3 image (all the control plane reads)."""
    name = backing.encode() if backing else b""
    off = 112 + 8 if backing else 0
    # QEMU refuses images without a refcount table or with a too small L1 table.
    l1_size = max(1, -(-size // (1 << 29)))
    head = struct.pack(
        ">IIQIIQIIQQIIQ", 0x514649FB, 3, off, len(name), 16, size, 0, l1_size, 3 << 16,
        1 << 16, 1, 0, 0,
    )  # fmt: skip
    head += struct.pack(">QQQII", 0, 0, 0, 4, 112) + bytes(8)
    path.write_bytes((head + bytes(8) + name).ljust(65536, b"\0"))
    return path


@pytest.fixture
def c() -> Client:
    return Client()


def test_add_null_co_monitor_owned(c: Client) -> None:
    assert c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"}) == {}
    node = c.daemon.graph.lookup("n0")
    assert node is not None and node.monitor_owned and node.refcnt == 1


def test_inline_child_not_owned_reference_gains_one(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"})
    c.ok(
        "blockdev-add",
        {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co", "node-name": "xf"}},
    )
    g = c.daemon.graph
    n0, xf = g.lookup("n0"), g.lookup("xf")
    assert n0 is not None and n0.refcnt == 2 and n0.monitor_owned
    assert xf is not None and xf.refcnt == 1 and not xf.monitor_owned


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({"driver": "null-co"}, "'node-name' must be specified for the root node"),
        ({"driver": "null-co", "node-name": "0abc"}, "Invalid node-name: '0abc'"),
        ({"driver": "null-co", "node-name": ""}, "Invalid node-name: ''"),
        ({"driver": "null-co", "node-name": "a b"}, "Invalid node-name: 'a b'"),
        ({"driver": "null-co", "node-name": "a" * 32}, "Node name too long"),
        ({"driver": "null-co", "node-name": "n0"}, "Duplicate nodes with node-name='n0'"),
        (
            {"driver": "raw", "node-name": "r", "file": "nosuch"},
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "n0"}},
            "Duplicate nodes with node-name='n0'",
        ),
        (
            {"driver": "null-co", "node-name": "n1", "force-share": True},
            "force-share=on can only be used with read-only images",
        ),
    ],
)
def test_add_errors_leave_graph_unchanged(c: Client, args: dict[str, object], desc: str) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.fails("blockdev-add", args, desc)
    assert c.names() == ["n0"]


def test_failed_add_leaves_no_inline_child(c: Client, tmp_path: Path) -> None:
    """A failure after an inline child was opened removes that child too."""
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(4096))
    c.fails(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "node-name": "xf", "filename": str(raw)},
        },
        "Image is not in qcow2 format",
    )
    assert c.names() == []


def test_missing_file(c: Client, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    c.fails(
        "blockdev-add",
        {"driver": "file", "node-name": "f", "filename": str(missing)},
        f"Could not open '{missing}': No such file or directory",
    )


def test_del_checks_in_order(c: Client, tmp_path: Path) -> None:
    """Each §5.2 check, each one shadowing the later ones."""
    c.fails("blockdev-del", {"node-name": "nosuch"}, "Failed to find node with node-name='nosuch'")
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "n0"})
    c.fails("blockdev-del", {"node-name": "n0"}, "Block device n0 is in use")
    c.ok(
        "blockdev-add",
        {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co", "node-name": "xf"}},
    )
    c.fails("blockdev-del", {"node-name": "xf"}, "Node xf is not owned by the monitor")
    # busy (backing) comes before "not owned"
    c.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "o",
            "file": {"driver": "file", "filename": str(qcow2(tmp_path / "o.qcow2"))},
            "backing": {
                "driver": "qcow2",
                "node-name": "ib",
                "file": {"driver": "file", "filename": str(qcow2(tmp_path / "ib.qcow2"))},
            },
        },
    )
    c.fails(
        "blockdev-del", {"node-name": "ib"}, "Node 'ib' is busy: node is used as backing hd of 'o'"
    )
    c.ok("blockdev-del", {"node-name": "o"})
    assert "ib" not in c.daemon.graph
    c.ok("blockdev-del", {"node-name": "r0"})
    c.ok("blockdev-del", {"node-name": "n0"})
    c.ok("blockdev-del", {"node-name": "r1"})
    assert c.names() == []


def _attach_backend(c: Client, node_name: str, bb_name: str) -> None:
    graph = c.daemon.graph
    node = graph.lookup(node_name)
    assert node is not None
    with Transaction() as tran:
        bb = BlockBackend(bb_name)
        add_root_parent(tran, graph, bb)
        root_attach(tran, graph, bb, node, "root", role=Role.IMAGE, perm=0, shared=0xF)


def test_del_node_in_use_by_backend(c: Client) -> None:
    """A BlockBackend parent (anonymous, like an export) beats every later check."""
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    _attach_backend(c, "n0", "")
    c.fails("blockdev-del", {"node-name": "n0"}, "Node n0 is in use")


def test_implicit_backing_chain_deleted_with_overlay(c: Client, tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", backing="base.qcow2")
    c.ok(
        "blockdev-add",
        {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)}},
    )
    assert len(c.names()) == 4
    auto = [n for n in c.names() if n.startswith("#block")]
    c.fails(
        "blockdev-del",
        {"node-name": auto[0]},
        f"Node '{auto[0]}' is busy: node is used as backing hd of 'top'",
    )
    c.ok("blockdev-del", {"node-name": "top"})
    assert c.names() == []


def test_generated_names_follow_the_seed() -> None:
    """Same seed, same commands: same #block names (what replay relies on)."""
    names = []
    for _ in range(2):
        c = Client(seed=42)
        c.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "null-co"}})
        names.append(c.names())
    assert names[0] == names[1]
