"""The shared driver conformance suite; each driver's test subclasses it in a few lines.

A subclass (in ``test_conformance.py``, where a test checks that every driver
of the registry has one) sets:

* ``driver_name``: the registry entry under test;
* ``options(tmp_path)``: blockdev-add options of a tree whose top node is
  ``top`` and opens successfully (creating image files in ``tmp_path``);
* ``children``: the top node's child edges, ``(name, role)`` pairs, as section 1.8
  of QEMU-BLOCK-GRAPH.md catalogues them;
* ``rejected``: option overrides (merged into ``options``) that QEMU refuses
  at open time; at least one, so the failure paths are exercised;
* ``objects``: ``object-add`` arguments the tree needs (secrets, groups).

The suite checks the registry entry, the open tree (invariants, refcounts,
edges and roles), options (unknown keys and the ``rejected`` ones fail),
permissions (each edge holds what its parent's driver asks for, no
conflicts), and that any failed open (injected faults, late failures, the
rejected options) leaves the graph digest unchanged with nothing left: no
nodes, no new file descriptors, no image locks, object references as before.
With QEMU present, the same commands run against qemu-storage-daemon and
qmpgraph must give the same replies and the same edges with the same
permissions (``x-debug-query-block-graph``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any, ClassVar

import pytest

from qmpgraph.drivers import REGISTRY
from qmpgraph.drivers.filelock import holders, ofd_supported
from qmpgraph.drivers.open import open_node_tree
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.permissions import child_perms
from qmpgraph.graph.perms import Role
from qmpgraph.objects import create_object, tree_for
from qmpgraph.schema import load as load_schema
from qmpgraph.transactions.engine import InjectedFault, Transaction

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "commands"))
from cmdkit import Client, plain  # tests/commands helper, put on sys.path above

_AUTO = re.compile(r"#block(\d+)\d\d")


def norm(text: str) -> str:
    """Generated node names without their two random digits."""
    return _AUTO.sub(r"#block\1", text)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _locked_files(root: pathlib.Path) -> list[str]:
    """Files under ``root`` on which some descriptor holds an image lock byte."""
    if not ofd_supported():
        return []
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if holders(fd) != (0, 0):
                found.append(path.name)
        finally:
            os.close(fd)
    return found


def graph_edges(graph_info: dict[str, Any]) -> list[tuple[Any, ...]]:
    """x-debug-query-block-graph's edges, by names, sorted."""
    names = {n["id"]: norm(n["name"]) for n in graph_info["nodes"]}
    return sorted(
        (
            names[e["parent"]],
            e["name"],
            names[e["child"]],
            tuple(e["perm"]),
            tuple(e["shared-perm"]),
        )
        for e in graph_info["edges"]
    )


class DriverConformance:
    """Subclass with ``driver_name``, ``options``, ``children`` and ``rejected``."""

    driver_name: ClassVar[str]
    children: ClassVar[tuple[tuple[str, int], ...]] = ()
    rejected: ClassVar[tuple[dict[str, Any], ...]] = ()
    objects: ClassVar[tuple[dict[str, Any], ...]] = ()

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        """blockdev-add options of a tree with top node ``top`` that opens."""
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------

    def graph(self) -> BlockGraph:
        """An empty graph holding the subclass's ``objects``."""
        graph = BlockGraph(name_seed=0)
        with Transaction() as tran:
            for obj in self.objects:
                props = {k: v for k, v in obj.items() if k not in ("qom-type", "id")}
                create_object(
                    tran, tree_for(graph), load_schema(), obj["qom-type"], obj["id"], props
                )
        return graph

    def open(self, tmp_path: pathlib.Path) -> BlockGraph:
        """The graph after opening ``options``."""
        graph = self.graph()
        with Transaction() as tran:
            open_node_tree(graph, self.options(tmp_path), tran)
        return graph

    def variants(self, tmp_path: pathlib.Path) -> list[dict[str, Any]]:
        """``options`` with each ``rejected`` override applied."""
        return [{**self.options(tmp_path), **bad} for bad in self.rejected]

    def fail_cleanly(
        self,
        graph: BlockGraph,
        tmp_path: pathlib.Path,
        opts: dict[str, Any],
        fail_at: int | None = None,
    ) -> BaseException:
        """Open ``opts`` then fail late: the error, after checking nothing is left."""
        before = graph_digest(graph)
        nodes = [n.node_name for n in graph.named_nodes_oldest_first()]
        refs = {name: obj.refcnt for name, obj in tree_for(graph).objects_root().children()}
        fds = _open_fds()
        with (
            pytest.raises((InjectedFault, GenericError)) as caught,
            Transaction(fail_at=fail_at) as tran,
        ):
            open_node_tree(graph, opts, tran)
            raise GenericError("late failure")
        assert graph_digest(graph) == before
        assert [n.node_name for n in graph.named_nodes_oldest_first()] == nodes
        assert {n: o.refcnt for n, o in tree_for(graph).objects_root().children()} == refs
        assert _open_fds() <= fds
        assert _locked_files(tmp_path) == []
        assert check_invariants(graph) == []
        return caught.value

    # -- registry -------------------------------------------------------------

    def test_registered(self) -> None:
        drv = REGISTRY[self.driver_name]
        assert drv.format_name == self.driver_name
        assert not (drv.is_filter and drv.supports_backing)
        if drv.protocol:
            assert drv.is_filter or not drv.children
        assert self.rejected, "a conformance subclass lists at least one rejected option"

    # -- open, children and roles --------------------------------------------

    def test_open_is_sound(self, tmp_path: pathlib.Path) -> None:
        graph = self.open(tmp_path)
        top = graph.lookup("top")
        assert top is not None and top.monitor_owned and top.format_name == self.driver_name
        assert check_invariants(graph) == []

    def test_children_and_roles(self, tmp_path: pathlib.Path) -> None:
        top = self.open(tmp_path).lookup("top")
        assert top is not None
        assert {e.name: Role(e.role) for e in top.children} == {
            name: Role(role) for name, role in self.children
        }
        drv = REGISTRY[self.driver_name]
        allowed = {spec.name for spec in drv.children}
        for edge in top.children:
            assert edge.name in allowed or edge.name.split(".")[0] in allowed

    def test_roles_follow_section_1_7(self, tmp_path: pathlib.Path) -> None:
        graph = self.open(tmp_path)
        for node in graph.named_nodes_oldest_first():
            drv = node.driver
            assert drv is not None
            filtered = [e for e in node.children if e.role & Role.FILTERED]
            if drv.is_filter:
                assert len([e for e in filtered if e.role & Role.PRIMARY]) == 1
                assert not any(e.role & Role.COW for e in node.children)
            assert len([e for e in node.children if e.role & Role.COW]) <= 1
            assert len([e for e in node.children if e.role & Role.PRIMARY]) <= 1
            for e in node.children:
                assert e.role & (Role.DATA | Role.METADATA | Role.FILTERED | Role.COW)

    # -- options --------------------------------------------------------------

    def test_unknown_option_is_refused(self, tmp_path: pathlib.Path) -> None:
        drv = REGISTRY[self.driver_name]
        kind, verb = ("protocol", "doesn't") if drv.protocol else ("format", "does not")
        opts = {**self.options(tmp_path), "x-bogus": 1}
        err = self.fail_cleanly(self.graph(), tmp_path, opts)
        assert isinstance(err, GenericError)
        assert err.desc == f"Block {kind} '{self.driver_name}' {verb} support the option 'x-bogus'"

    def test_rejected_options_fail_cleanly(self, tmp_path: pathlib.Path) -> None:
        graph = self.graph()
        for opts in self.variants(tmp_path):
            err = self.fail_cleanly(graph, tmp_path, opts)
            assert isinstance(err, GenericError) and err.desc != "late failure", opts

    # -- permissions ----------------------------------------------------------

    def test_edges_hold_what_drivers_ask(self, tmp_path: pathlib.Path) -> None:
        graph = self.open(tmp_path)
        for node in graph.named_nodes_oldest_first():
            for edge in node.children:
                assert (edge.perm, edge.shared) == child_perms(node, edge, edge.role, None)

    # -- undo of a failed open ------------------------------------------------

    @pytest.mark.parametrize("fail_at", range(0, 40, 3))
    def test_failed_open_leaves_nothing(self, tmp_path: pathlib.Path, fail_at: int) -> None:
        graph = self.graph()
        opts = self.options(tmp_path)
        self.fail_cleanly(graph, tmp_path, opts, fail_at)
        assert len(graph) == 0

    # -- against QEMU -------------------------------------------------------

    @pytest.mark.qemu
    def test_matches_qemu(self, qsd_path: str, tmp_path: pathlib.Path) -> None:
        """Same replies (rejected variants, then the good tree) and the same edges."""
        cmds: list[dict[str, Any]] = [
            {"execute": "object-add", "arguments": obj} for obj in self.objects
        ]
        for opts in [*self.variants(tmp_path), self.options(tmp_path)]:
            cmds.append({"execute": "blockdev-add", "arguments": opts})
        cmds.append({"execute": "x-debug-query-block-graph"})
        expected = run_qsd(qsd_path, cmds)
        client = Client(seed=0)
        got = [plain(client.run(c["execute"], c.get("arguments"))) for c in cmds]
        assert _summary(got) == _summary(expected)


def _summary(replies: list[dict[str, Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Each reply as "ok" or its error text, and the final graph's edges."""
    results = [
        "ok" if "return" in r else norm(f"{r['error']['class']}: {r['error']['desc']}")
        for r in replies[:-1]
    ]
    return results, graph_edges(replies[-1]["return"])


def run_qsd(qsd: str, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The replies of qemu-storage-daemon to ``cmds`` (after negotiation)."""
    script = [{"execute": "qmp_capabilities"}, *cmds, {"execute": "quit"}]
    proc = subprocess.run(
        [qsd, "--chardev", "stdio,id=m", "--monitor", "m"],
        input="".join(json.dumps(c) + "\n" for c in script),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    replies = [r for r in replies if "return" in r or "error" in r]
    return replies[1 : 1 + len(cmds)]
