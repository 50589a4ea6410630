"""quorum, blkdebug, blkverify and blklogwrites at library level.

Expected messages and permissions were recorded from qemu-storage-daemon 7.2
(tests/differential/scripts/driver-quorum-*.qmp, driver-blk*.qmp run the same
cases against the real daemon).  Every failure must leave the graph digest
unchanged (``Client.fails``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from qmpgraph.drivers.blkdebug import parse_config
from qmpgraph.errors import GenericError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))
from cmdkit import Client  # tests/commands helper, put on sys.path above


def _quorum(name: str, threshold: int, kids: list[Any], **extra: Any) -> dict[str, Any]:
    return {"driver": "quorum", "node-name": name, "vote-threshold": threshold,
            "children": kids, **extra}  # fmt: skip


def _edges(client: Client, parent: str) -> dict[str, tuple[list[str], list[str]]]:
    graph = client.ok("x-debug-query-block-graph")
    ids = {n["id"]: n["name"] for n in graph["nodes"]}
    return {
        e["name"]: (e["perm"], e["shared-perm"])
        for e in graph["edges"]
        if ids[e["parent"]] == parent
    }


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        (_quorum("q", 2, []), "Number of provided children must be 1 or more"),
        (_quorum("q", 0, ["c"]), "Parameter 'vote-threshold' expects a value >= 1"),
        (_quorum("q", 3, ["c", "c"]), "threshold may not exceed children count"),
        (
            _quorum("q", 1, ["c", "c"], blkverify=True),
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ),
        (
            _quorum("q", 2, ["c", "d"], blkverify=True, **{"rewrite-corrupted": True}),
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ),
        (
            _quorum("q", 1, ["c", {"driver": "null-co", "size": 4096}]),
            "Could not refresh total sector count: Input/output error",
        ),
        (_quorum("q", 1, ["nope"]), "Cannot find device='nope' nor node-name='nope'"),
    ],
)
def test_quorum_open_errors(args: dict[str, Any], desc: str) -> None:
    client = Client()
    client.ok("blockdev-add", {"driver": "null-co", "node-name": "c"})
    client.ok("blockdev-add", {"driver": "null-co", "node-name": "d"})
    client.fails("blockdev-add", args, desc)


def test_quorum_children_perms_and_rewrite() -> None:
    client = Client()
    client.ok("blockdev-add", _quorum("q", 1, [{"driver": "null-co"}, {"driver": "null-co"}]))
    client.ok(
        "blockdev-add", _quorum("w", 1, [{"driver": "null-co"}], **{"rewrite-corrupted": True})
    )
    shared = ["write-unchanged", "consistent-read"]
    assert _edges(client, "q") == {"children.0": ([], shared), "children.1": ([], shared)}
    assert _edges(client, "w") == {"children.0": (["write"], shared)}
    node = client.daemon.graph.lookup("q")
    assert node is not None and node.file is None and node.backing is None


def test_x_blockdev_change_order_and_index_reuse() -> None:
    client = Client()
    for name in ("n1", "n2", "n3"):
        client.ok("blockdev-add", {"driver": "null-co", "node-name": name})
    client.ok("blockdev-add", _quorum("q", 1, [{"driver": "null-co", "node-name": "c0"}]))
    change = "x-blockdev-change"
    client.fails(change, {"parent": "nope", "child": "x", "node": "y"},
                 "Cannot find device='nope' nor node-name='nope'")  # fmt: skip
    client.fails(change, {"parent": "q", "child": "x", "node": "y"},
                 "The parameters child and node are in conflict")  # fmt: skip
    client.fails(change, {"parent": "q"}, "Either child or node must be specified")
    client.fails(change, {"parent": "q", "child": "children.5"},
                 "Node 'q' does not have child 'children.5'")  # fmt: skip
    client.fails(change, {"parent": "q", "node": "zz"}, "Node 'zz' not found")
    client.fails(change, {"parent": "q", "node": "c0"}, "The node c0 already has a parent")
    client.fails(change, {"parent": "q", "node": "q"},
                 "Making 'q' a children.1 child of 'q' would create a cycle")  # fmt: skip
    client.fails(change, {"parent": "q", "child": "children.0"},
                 "The number of children cannot be lower than the vote threshold 1")  # fmt: skip
    client.fails(change, {"parent": "n1", "node": "n2"},
                 "The node n1 does not support adding a child")  # fmt: skip
    client.ok(change, {"parent": "q", "node": "n1"})  # children.1: the failed add gave it back
    client.ok(change, {"parent": "q", "node": "n2"})  # children.2
    client.ok(change, {"parent": "q", "child": "children.2"})  # newest index: reused
    client.ok(change, {"parent": "q", "node": "n3"})
    assert sorted(_edges(client, "q")) == ["children.0", "children.1", "children.2"]
    client.ok(change, {"parent": "q", "child": "children.0"})
    client.fails(change, {"parent": "q", "node": "n1"}, "The node n1 already has a parent")
    assert "c0" not in client.names()  # an inline child goes with its edge


def test_blkdebug_perm_modifiers_and_filenames(tmp_path: Any) -> None:
    conf = tmp_path / "d.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\n')
    client = Client()
    image = {"driver": "null-co"}
    client.ok("blockdev-add", {"driver": "blkdebug", "node-name": "a", "config": str(conf),
                               "take-child-perms": ["write"], "image": image})  # fmt: skip
    client.ok("blockdev-add", {"driver": "blkdebug", "node-name": "b", "align": 512,
                               "unshare-child-perms": ["write"], "image": image})  # fmt: skip
    assert _edges(client, "a")["image"][0] == ["write"]
    assert "write" not in _edges(client, "b")["image"][1]
    files = {n["node-name"]: n["file"] for n in client.ok("query-named-block-nodes")}
    assert files["a"] == f"blkdebug:{conf}:null-co://"
    assert files["b"] == 'json:{"image": {"driver": "null-co"}, "driver": "blkdebug", "align": 512}'
    bad = {"driver": "blkdebug", "node-name": "c", "align": 3, "image": image}
    client.fails("blockdev-add", bad, "Cannot meet constraints with align 3")


def test_blkdebug_config_parser() -> None:
    text = (
        '# c\n\n[inject-error "x"]\nevent = "read_aio"\nerrno = "0x10"\n'
        '[set-state]\n  event = "none"\n'
    )
    groups, pending = parse_config(text)
    assert pending is None
    assert groups == [("inject-error", {"event": "read_aio", "errno": 16}),
                      ("set-state", {"event": "none"})]  # fmt: skip
    groups, pending = parse_config('[foo]\nx = "1"\n')
    assert groups == [] and pending is not None and pending.desc == "There is no option group 'foo'"
    with pytest.raises(GenericError, match="no group defined"):
        parse_config("garbage\n")
    with pytest.raises(GenericError, match="parse error"):
        parse_config("   \n")


def test_blkverify_and_blklogwrites_children() -> None:
    client = Client()
    client.ok("blockdev-add", {"driver": "blkverify", "node-name": "v",
                               "raw": {"driver": "null-co"},
                               "test": {"driver": "null-co", "size": 4096}})  # fmt: skip
    null = {"driver": "null-co"}
    client.ok(
        "blockdev-add", {"driver": "blklogwrites", "node-name": "l", "file": null, "log": null}
    )
    assert _edges(client, "v") == {
        "raw": ([], ["resize", "write-unchanged", "write", "consistent-read"]),
        "test": ([], ["write-unchanged", "write", "consistent-read"]),
    }
    assert _edges(client, "l")["log"] == (
        ["resize", "write", "consistent-read"],
        ["write-unchanged", "consistent-read"],
    )
    sizes = {
        n["node-name"]: n["image"]["virtual-size"] for n in client.ok("query-named-block-nodes")
    }
    assert sizes["v"] == 4096  # blkverify's length is the test image's
    bad = {"driver": "blklogwrites", "node-name": "m", "log-sector-size": 1000,
           "file": null, "log": null}  # fmt: skip
    client.fails("blockdev-add", bad, "Invalid log sector size 1000")
