"""blockdev-reopen through the dispatcher (no sockets).

Every expected message was recorded from qemu-storage-daemon 7.2 (the
byte-exact comparisons, queries included, are the
``tests/differential/scripts/reopen-*.qmp`` scripts).  Here: the engine side,
one transaction per command, the digest unchanged after every failure, the
flags and options a reopen leaves, and the paths QMP alone cannot reach
(frozen and implicit links, a filter asked for a missing child).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cmdkit import Client
from test_blockdev import qcow2

from qmpgraph.commands.reopen import EMPTY_LIST_ERROR
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.transactions.actions import set_frozen, set_runtime
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.reopen import ReopenRequest, flatten, qobject_equal, reopen_multiple


@pytest.fixture
def c() -> Client:
    return Client()


def node(c: Client, name: str) -> Node:
    found = c.daemon.graph.lookup(name)
    assert found is not None
    return found


def reopen(*options: dict[str, Any]) -> dict[str, Any]:
    return {"options": list(options)}


def chain(c: Client, tmp_path: Path) -> None:
    """base <- mid <- top, each qcow2 on its own file node ``<name>-f``."""
    base = qcow2(tmp_path / "base.qcow2")
    mid = qcow2(tmp_path / "mid.qcow2", backing=str(base))
    top = qcow2(tmp_path / "top.qcow2", backing=str(mid))
    for name, path, backing in (("base", base, None), ("mid", mid, "base"), ("top", top, "mid")):
        args: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "node-name": f"{name}-f", "filename": str(path)},
        }
        if backing is not None:
            args["backing"] = backing
        c.ok("blockdev-add", args)


def q(name: str, backing: Any = "__absent__", **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": "qcow2", "node-name": name, "file": f"{name}-f", **extra}
    if backing != "__absent__":
        args["backing"] = backing
    return args


# -- list and entry checks ------------------------------------------------------


def test_empty_list_is_an_error_not_an_abort(c: Client) -> None:
    # QEMU 7.2 asserts on the empty queue and dies (SIGABRT); qmpgraph refuses.
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.fails("blockdev-reopen", {"options": []}, EMPTY_LIST_ERROR)


def test_node_name_checks_in_list_order(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    ro = {"driver": "null-co", "node-name": "n0", "read-only": True}
    c.fails("blockdev-reopen", reopen({"driver": "null-co"}), "node-name not specified")
    c.fails("blockdev-reopen", reopen(ro, {"driver": "null-co"}), "node-name not specified")
    c.fails(
        "blockdev-reopen",
        reopen(ro, {"driver": "null-co", "node-name": "nope"}),
        "Failed to find node with node-name='nope'",
    )
    assert not node(c, "n0").read_only


# -- generic options ------------------------------------------------------------


def test_read_only_cache_and_detect_zeroes(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    n0 = node(c, "n0")
    c.ok("blockdev-reopen", reopen({"driver": "null-co", "node-name": "n0", "read-only": True}))
    # update_flags_from_options never clears ALLOW_RDWR: the node may go back.
    assert n0.read_only and n0.open_flags & OpenFlag.ALLOW_RDWR
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "null-co", "node-name": "n0", "detect-zeroes": "unmap"}),
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
    )
    c.ok(
        "blockdev-reopen",
        reopen(
            {
                "driver": "null-co",
                "node-name": "n0",
                "detect-zeroes": "unmap",
                "discard": "unmap",
                "cache": {"direct": True, "no-flush": True},
            }
        ),
    )
    assert not n0.read_only and n0.open_flags & OpenFlag.ALLOW_RDWR
    assert n0.detect_zeroes == "unmap"
    assert n0.open_flags & OpenFlag.UNMAP and n0.open_flags & OpenFlag.NOCACHE
    assert n0.open_flags & OpenFlag.NO_FLUSH
    # Omitted options fall back to their defaults (UNMAP stays: discard was not given).
    c.ok("blockdev-reopen", reopen({"driver": "null-co", "node-name": "n0"}))
    assert n0.detect_zeroes == "off" and not n0.open_flags & OpenFlag.NOCACHE
    assert n0.open_flags & OpenFlag.UNMAP


@pytest.mark.parametrize(
    ("extra", "desc"),
    [
        ({"force-share": True}, "Cannot change the option 'force-share'"),
        ({"force-share": True, "read-only": True}, "Cannot change the option 'force-share'"),
        ({"size": 4096}, "Cannot change the option 'size'"),
        ({"driver": "null-aio"}, "Cannot change the option 'driver'"),
    ],
)
def test_options_that_cannot_change(c: Client, extra: dict[str, Any], desc: str) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.fails("blockdev-reopen", reopen({"driver": "null-co", "node-name": "n0", **extra}), desc)


def test_reset_to_default_and_typed_compare(c: Client) -> None:
    c.ok(
        "blockdev-add",
        {"driver": "null-co", "node-name": "n1", "size": 65536, "read-zeroes": True},
    )
    base = {"driver": "null-co", "node-name": "n1"}
    c.fails(
        "blockdev-reopen",
        reopen(base),
        "Option 'read-zeroes' cannot be reset to its default value",
    )
    c.fails(
        "blockdev-reopen",
        reopen({**base, "size": 65536, "read-zeroes": False}),
        "Cannot change the option 'read-zeroes'",
    )
    c.ok("blockdev-reopen", reopen({**base, "size": 65536, "read-zeroes": True}))


def test_same_node_twice_merges(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 65536})
    base = {"driver": "null-co", "node-name": "n1", "size": 65536}
    c.ok(
        "blockdev-reopen",
        reopen({**base, "auto-read-only": True, "read-only": True}, {**base, "read-only": False}),
    )
    n1 = node(c, "n1")
    # The later entry's read-only wins; the earlier auto-read-only is kept.
    assert not n1.read_only and n1.open_flags & OpenFlag.AUTO_RDONLY


def test_unsupported_driver(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "copy-on-read", "node-name": "c0", "file": "n0"})
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "copy-on-read", "node-name": "c0", "file": "n0"}),
        "Block format 'copy-on-read' used by node 'c0' does not support reopening files",
    )


# -- file and raw ---------------------------------------------------------------


def test_file_options_compare_as_strings(c: Client, tmp_path: Path) -> None:
    img = tmp_path / "r.img"
    img.write_bytes(bytes(1 << 20))
    c.ok(
        "blockdev-add",
        {"driver": "file", "node-name": "f1", "filename": str(img), "locking": "off",
         "aio-max-batch": 3},
    )  # fmt: skip
    base = {"driver": "file", "node-name": "f1", "filename": str(img)}
    c.fails(
        "blockdev-reopen", reopen(base), "Option 'locking' cannot be reset to its default value"
    )
    c.fails(
        "blockdev-reopen",
        reopen({**base, "locking": "off", "aio-max-batch": 3}),
        "Cannot change the option 'aio-max-batch'",
    )


def test_raw_window_set_reset_and_file_switch(c: Client, tmp_path: Path) -> None:
    img = tmp_path / "r.img"
    img.write_bytes(bytes(1 << 20))
    c.ok("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)})
    c.ok("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(img),
                          "locking": "off"})  # fmt: skip
    c.ok("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"})
    r0 = node(c, "r0")
    c.ok(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 512, "size": 4096}),
    )
    assert r0.driver is not None and r0.driver.size(r0) == 4096
    assert "file" not in r0.options and r0.options["offset"] == 512
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "r0", "file": "f0", "offset": 2000000}),
        "Offset (2000000) cannot be greater than size of the containing file (1048576)",
    )
    c.ok("blockdev-reopen", reopen({"driver": "raw", "node-name": "r0", "file": "f1"}))
    assert r0.driver.size(r0) == 1 << 20 and "offset" not in r0.options
    assert r0.file is not None and r0.file.child is node(c, "f1")
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "r0", "file": "r0"}),
        "Making 'r0' a file child of 'r0' would create a cycle",
    )
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "r0", "file": "nosuch"}),
        "Cannot find device='' nor node-name='nosuch'",
    )
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "r0", "file": {"driver": "file",
                                                             "filename": str(img)}}),
        "Cannot change the option 'file.driver'",
    )  # fmt: skip


# -- qcow2 chains ---------------------------------------------------------------


def test_backing_missing_and_switches(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    top, mid, base = node(c, "top"), node(c, "mid"), node(c, "base")
    c.fails("blockdev-reopen", reopen(q("top")), "backing is missing for 'top'")
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "raw", "node-name": "top", "file": "top-f"}),
        "backing is missing for 'top'",
    )
    c.ok("blockdev-reopen", reopen(q("top", "base")))
    assert top.backing is not None and top.backing.child is base
    c.ok("blockdev-reopen", reopen(q("top", None)))
    assert top.backing is None
    c.fails(
        "blockdev-reopen",
        reopen(q("mid", "mid")),
        "Making 'mid' a backing child of 'mid' would create a cycle",
    )
    c.ok("blockdev-reopen", reopen(q("top", "mid")))
    c.fails(
        "blockdev-reopen",
        reopen(q("mid", "top")),
        "Making 'top' a backing child of 'mid' would create a cycle",
    )
    c.fails(
        "blockdev-reopen",
        reopen(q("top", {"driver": "qcow2", "file": "base-f"})),
        "Cannot change the option 'backing.driver'",
    )
    assert mid.backing is not None and mid.backing.child is base


def test_whole_list_is_atomic(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    c.ok("blockdev-reopen", reopen(q("top", None)))
    # The first entry switches top's backing, the second fails: nothing stays.
    c.fails(
        "blockdev-reopen",
        reopen(q("top", "base", **{"read-only": True}), q("mid", "nosuch")),
        "Cannot find device='' nor node-name='nosuch'",
    )
    top = node(c, "top")
    assert top.backing is None and not top.read_only
    # A later failure in the permission refresh undoes both entries too.
    c.fails(
        "blockdev-reopen",
        reopen(q("top", "mid"), {"driver": "qcow2", "node-name": "mid", "file": "base-f",
                                 "backing": None}),
        "Permission conflict on node 'base-f': permissions 'write, resize' are both required "
        "by node 'base' (uses node 'base-f' as 'file' child) and unshared by node 'mid' "
        "(uses node 'base-f' as 'file' child).",
    )  # fmt: skip
    assert top.backing is None


def test_read_only_inheritance_subtlety(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    c.ok("blockdev-reopen", reopen(q("mid", "base", **{"read-only": True})))
    assert node(c, "mid").read_only and node(c, "mid-f").read_only
    # mid-f is named by its current node name: it keeps read-only=on, mid does not.
    c.fails("blockdev-reopen", reopen(q("mid", "base")), "Block node is read-only")
    c.ok("blockdev-reopen", reopen(q("mid", "base", **{"read-only": False})))
    assert not node(c, "mid").read_only and not node(c, "mid-f").read_only


def test_inline_file_reopens_inherited_child(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    path = str(tmp_path / "top.qcow2")
    c.ok(
        "blockdev-reopen",
        reopen({"driver": "qcow2", "node-name": "top", "backing": "mid",
                "file": {"driver": "file", "filename": path, "read-only": True},
                "read-only": True}),
    )  # fmt: skip
    assert node(c, "top-f").read_only and node(c, "top").read_only
    c.fails(
        "blockdev-reopen",
        reopen({"driver": "qcow2", "node-name": "top", "backing": "mid",
                "file": {"driver": "file", "filename": path, "node-name": "x"}}),
        "Cannot change the option 'node-name'",
    )  # fmt: skip


# -- links QMP alone cannot make ------------------------------------------------


def test_frozen_backing_link(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    top = node(c, "top")
    assert top.backing is not None
    with Transaction() as tran:
        set_frozen(tran, top.backing, True)
    c.fails(
        "blockdev-reopen",
        reopen(q("top", "base")),
        "Cannot change frozen 'backing' link from 'top' to 'mid'",
    )
    c.ok("blockdev-reopen", reopen(q("top", "mid")))


def test_implicit_backing_child(c: Client, tmp_path: Path) -> None:
    chain(c, tmp_path)
    with Transaction() as tran:
        set_runtime(tran, node(c, "mid"), implicit=True)
    c.fails(
        "blockdev-reopen",
        reopen(q("top", "base")),
        "Cannot replace implicit backing child of top",
    )


def test_filter_without_such_child(c: Client) -> None:
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "preallocate", "node-name": "p0", "file": "n0"})
    graph = c.daemon.graph
    p0 = node(c, "p0")
    before = graph_digest(graph)
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        reopen_multiple(tran, graph, [ReopenRequest(p0, p0.open_flags, backing="n0")])
    assert exc.value.desc == (
        "'p0' is a preallocate filter node that does not support a backing child"
    )
    assert graph_digest(graph) == before


# -- helpers --------------------------------------------------------------------


def test_flatten_and_qobject_equal() -> None:
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1, {"e": 2}]}) == {
        "a.b": 1, "a.c": {}, "d.0": 1, "d.1.e": 2,
    }  # fmt: skip
    assert not qobject_equal(True, 1) and not qobject_equal("3", 3)
    assert qobject_equal(3, 3.0) and qobject_equal({"a": [1]}, {"a": [1]})
