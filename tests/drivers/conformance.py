"""The shared driver conformance suite; each driver's test subclasses it in a few lines.

A subclass sets ``driver_name`` and ``options(tmp_path)`` (blockdev-add
options that open successfully); the suite checks the registry entry, the
role rules of section 1.7 on the opened tree, refcounts, invariants, and that
a failed open of the same tree leaves the graph unchanged.
"""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

import pytest

from qmpgraph.drivers import REGISTRY
from qmpgraph.drivers.open import open_node_tree
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.engine import InjectedFault, Transaction


class DriverConformance:
    """Subclass with ``driver_name`` and ``options``."""

    driver_name: ClassVar[str]

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        raise NotImplementedError

    def open(self, tmp_path: pathlib.Path) -> BlockGraph:
        graph = BlockGraph(name_seed=0)
        with Transaction() as tran:
            open_node_tree(graph, self.options(tmp_path), tran)
        return graph

    def test_registered(self) -> None:
        drv = REGISTRY[self.driver_name]
        assert drv.format_name == self.driver_name
        assert not (drv.is_filter and drv.supports_backing)
        if drv.protocol:
            assert not drv.children

    def test_open_is_sound(self, tmp_path: pathlib.Path) -> None:
        graph = self.open(tmp_path)
        top = graph.lookup("top")
        assert top is not None and top.monitor_owned and top.format_name == self.driver_name
        assert check_invariants(graph) == []

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

    @pytest.mark.parametrize("fail_at", range(0, 40, 3))
    def test_failed_open_leaves_nothing(self, tmp_path: pathlib.Path, fail_at: int) -> None:
        graph = BlockGraph(name_seed=0)
        before = graph_digest(graph)
        opts = self.options(tmp_path)
        with pytest.raises((InjectedFault, GenericError)), Transaction(fail_at=fail_at) as tran:
            open_node_tree(graph, opts, tran)
            raise GenericError("late failure")
        assert graph_digest(graph) == before and len(graph) == 0
