"""The open path against the real qemu-storage-daemon: same blockdev-add commands,
same results (error texts, generated-name counters, edges with perms)."""

from __future__ import annotations

import pathlib
from typing import Any

import conformance
import pytest
from conformance import graph_edges, norm
from test_drivers import needs_qemu_img, qemu_img

from qmpgraph.drivers.open import open_node_tree
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.perms import perm_qapi_names
from qmpgraph.transactions.engine import Transaction

pytestmark = [pytest.mark.qemu, needs_qemu_img]


def run_qsd(qsd: str, adds: list[dict[str, Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Results of each blockdev-add ("ok" or the error text) and the final edges."""
    cmds: list[dict[str, Any]] = [{"execute": "blockdev-add", "arguments": a} for a in adds]
    replies = conformance.run_qsd(qsd, [*cmds, {"execute": "x-debug-query-block-graph"}])
    results = ["ok" if "return" in r else norm(r["error"]["desc"]) for r in replies[:-1]]
    return results, graph_edges(replies[-1]["return"])


def run_qmpgraph(adds: list[dict[str, Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The same through the engine."""
    graph = BlockGraph()
    results = []
    for a in adds:
        try:
            with Transaction() as tran:
                open_node_tree(graph, a, tran)
            results.append("ok")
        except GenericError as err:
            results.append(norm(err.desc))
        assert check_invariants(graph) == []
    edges = sorted(
        (
            norm(n.node_name),
            e.name,
            norm(e.child.node_name),
            tuple(perm_qapi_names(e.perm)),
            tuple(perm_qapi_names(e.shared)),
        )
        for n in graph.named_nodes_oldest_first()
        for e in n.children
        if e.child is not None
    )
    return results, edges


def test_open_matches_qemu(qsd_path: str, tmp_path: pathlib.Path) -> None:
    t = str(tmp_path)
    qemu_img("create", "-f", "qcow2", f"{t}/base.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{t}/mid.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", f"{t}/mid.qcow2", "-F", "qcow2", f"{t}/top.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={t}/data.raw", f"{t}/ext.qcow2", "1M")
    qemu_img("create", "-f", "raw", f"{t}/raw.img", "64K")
    (tmp_path / "dir").mkdir()

    def f(name: str) -> dict[str, Any]:
        return {"driver": "file", "filename": f"{t}/{name}"}

    adds: list[dict[str, Any]] = [
        {"driver": "file", "node-name": "missing", "filename": f"{t}/nope"},
        {"driver": "file", "node-name": "d", "filename": f"{t}/dir"},
        {"driver": "file", "node-name": "d2", "filename": f"{t}/dir", "read-only": True},
        {"driver": "qcow2", "node-name": "notq", "file": f("raw.img")},
        {"driver": "qcow2", "file": f("raw.img")},
        {"driver": "qcow2", "node-name": "top", "file": f("top.qcow2")},
        {"driver": "qcow2", "node-name": "ext", "file": f("ext.qcow2")},
        {"driver": "null-co", "node-name": "n0", "size": 1024},
        {"driver": "raw", "node-name": "r0", "file": "n0"},
        {"driver": "raw", "node-name": "r1", "file": "n0", "offset": 2048},
        {"driver": "raw", "node-name": "r2", "file": "n0", "size": 1000},
        {"driver": "raw", "node-name": "r3", "file": "n0", "offset": 512, "size": 1024},
        {"driver": "raw", "node-name": "r4", "file": "nosuch"},
        {"driver": "raw", "node-name": "0bad", "file": "n0"},
        {"driver": "raw", "node-name": "top", "file": "n0"},
        {"driver": "raw", "node-name": "x" * 32, "file": "n0"},
        {"driver": "null-co", "node-name": "fs", "force-share": True},
        {"driver": "null-co", "node-name": "dz", "detect-zeroes": "unmap"},
        {"driver": "qcow2", "node-name": "q9", "file": {**f("raw.img"), "node-name": "xf"}},
        {"driver": "file", "node-name": "xf", "filename": f"{t}/raw.img"},
        {"driver": "qcow2", "node-name": "q1", "file": "xf"},
        {"driver": "qcow2", "node-name": "q2", "file": "xf", "backing": None},
        {"driver": "copy-before-write", "node-name": "cbw",
         "file": {"driver": "null-co"}, "target": {"driver": "null-co"}},
        {"driver": "snapshot-access", "node-name": "sa", "file": "cbw"},
    ]  # fmt: skip
    expected = run_qsd(qsd_path, adds)
    assert run_qmpgraph(adds) == expected
