"""Graph model: names, the named-node list, helpers, and source-level rules."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import qmpgraph
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, topological_sort
from qmpgraph.graph.model import BlockBackend, Job, Node
from qmpgraph.graph.names import NameGenerator, check_node_name
from qmpgraph.graph.perms import Perm, perm_message_names, perm_qapi_names

PKG = pathlib.Path(qmpgraph.__file__).parent


def check(name: str, existing: set[str] = frozenset(), bbs: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    try:
        check_node_name(name, is_node_name=existing.__contains__, is_backend_name=bbs.__contains__)
    except GenericError as err:
        return err.desc
    return "ok"


def test_node_name_messages_in_qemu_order() -> None:
    # Messages verified on 7.2 (reference 1.4).
    assert check("0abc") == "Invalid node-name: '0abc'"
    assert check("") == "Invalid node-name: ''"
    assert check("a b") == "Invalid node-name: 'a b'"
    assert check("a" * 31) == "ok"
    assert check("a" * 32) == "Node name too long"
    assert check("dup", {"dup"}) == "Duplicate nodes with node-name='dup'"
    # Duplicate is checked before length, BB clash before duplicate.
    assert check("a" * 32, {"a" * 32}) == f"Duplicate nodes with node-name='{'a' * 32}'"
    assert check("x", {"x"}, {"x"}) == "node-name=x is conflicting with a device id"


def test_generated_names_count_and_take_two_random_digits() -> None:
    gen = NameGenerator(seed=7)
    names = [gen.generate() for _ in range(12)]
    for i, name in enumerate(names):
        assert name.startswith(f"#block{i}") and len(name) == len(f"#block{i}") + 2
    assert [NameGenerator(seed=7).generate() for _ in range(1)] == names[:1]


def test_named_nodes_newest_first_and_o1_removal() -> None:
    graph = BlockGraph()
    nodes = [Node(f"n{i}", None) for i in range(5)]
    for n in nodes:
        graph._link(n)
    assert [n.node_name for n in graph.named_nodes_newest_first()] == [
        "n4", "n3", "n2", "n1", "n0"
    ]  # fmt: skip
    # Remove in one order, restore in reverse: the original order comes back.
    links = [graph._unlink(nodes[i]) for i in (2, 3, 0)]
    assert [n.node_name for n in graph.named_nodes_oldest_first()] == ["n1", "n4"]
    for link in reversed(links):
        graph._relink(link)
    assert [n.node_name for n in graph.named_nodes_oldest_first()] == [f"n{i}" for i in range(5)]
    assert graph.lookup("n3") is nodes[3] and "n9" not in graph


def test_perm_names() -> None:
    both = Perm.WRITE | Perm.RESIZE
    assert perm_message_names(both) == "write, resize"
    assert perm_qapi_names(0xF) == ["resize", "write-unchanged", "write", "consistent-read"]


def test_parent_descriptions() -> None:
    assert BlockBackend().description() == "an unnamed block device"
    assert BlockBackend("drive0").description() == "block device 'drive0'"
    assert Job("stream", "st").description() == "stream job 'st'"
    assert Node("q", None).description() == "node 'q'"


def test_topological_sort_is_empty_safe() -> None:
    assert topological_sort([]) == []


def _assignments(tree: ast.AST, *, allow_none_init: bool = False) -> list[str]:
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        value = getattr(node, "value", None)
        if allow_none_init and isinstance(value, ast.Constant) and value.value is None:
            continue  # Node.__init__ starts both slots empty
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and sub.attr in {
                    "file", "backing", "_file", "_backing"
                }:  # fmt: skip
                    found.append(sub.attr)
    return found


def test_only_attach_module_assigns_file_and_backing() -> None:
    offenders = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        hits = _assignments(ast.parse(path.read_text()), allow_none_init=rel == "graph/model.py")
        if hits and rel != "graph/attach.py":
            offenders[rel] = hits
    assert offenders == {}
    assert _assignments(ast.parse((PKG / "graph/attach.py").read_text()))


@pytest.mark.parametrize("pkg", ["graph", "transactions", "drivers"])
def test_engine_imports_no_trio(pkg: str) -> None:
    code = (
        f"import sys, importlib, pkgutil, qmpgraph.{pkg} as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
