"""Random operation sequences through the engine, with a fault injected anywhere.

Every step runs in a transaction that may get ``fail_at=n``; after a failure
(injected or a real QEMU error) the digest must be unchanged, after a commit the
invariants must hold.
"""

from __future__ import annotations

from collections.abc import Callable

import graphkit
from graphkit import delete, export, filter_on, fmt_on
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph, filter_or_cow_child
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.model import Node
from qmpgraph.transactions import composite
from qmpgraph.transactions.engine import InjectedFault, Transaction
from qmpgraph.transactions.reopen import ReopenRequest, reopen_multiple

NAMES = [f"n{i}" for i in range(8)]
FAULT = st.one_of(st.none(), st.integers(min_value=0, max_value=15))


class GraphMachine(RuleBasedStateMachine):
    """Drives the composites; checks rollback and invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.graph = BlockGraph(name_seed=0)

    def node(self, name: str) -> Node | None:
        return self.graph.lookup(name)

    def run(self, fail_at: int | None, body: Callable[[Transaction], object]) -> None:
        before = graph_digest(self.graph)
        tran = Transaction(fail_at=fail_at)
        try:
            body(tran)
        except (GenericError, InjectedFault):
            tran.abort()
            assert graph_digest(self.graph) == before
            return
        tran.commit()

    @rule(name=st.sampled_from(NAMES), rw=st.booleans(), fault=FAULT)
    def add_protocol(self, name: str, rw: bool, fault: int | None) -> None:
        if self.node(name) is None:
            self.run(fault, lambda t: graphkit.new_node(t, self.graph, name, graphkit.NULL, rw=rw))

    @rule(name=st.sampled_from(NAMES), file=st.sampled_from(NAMES), rw=st.booleans(), fault=FAULT)
    def add_format(self, name: str, file: str, rw: bool, fault: int | None) -> None:
        f = self.node(file)
        if self.node(name) is None and f is not None:
            self.run(fault, lambda t: fmt_on(t, self.graph, name, f, rw=rw))

    @rule(name=st.sampled_from(NAMES), file=st.sampled_from(NAMES), fault=FAULT)
    def insert_filter(self, name: str, file: str, fault: int | None) -> None:
        f = self.node(file)
        if self.node(name) is not None or f is None:
            return

        def body(t: Transaction) -> None:
            flt = filter_on(t, self.graph, name, f)
            composite.replace_node(t, self.graph, f, flt)

        self.run(fault, body)

    @rule(name=st.sampled_from(NAMES), fault=FAULT)
    def drop_filter(self, name: str, fault: int | None) -> None:
        node = self.node(name)
        if node is None or node.driver is not graphkit.FILTER or filter_or_cow_child(node) is None:
            return
        self.run(fault, lambda t: composite.drop_filter(t, self.graph, node))

    @rule(
        top=st.sampled_from(NAMES), base=st.one_of(st.none(), st.sampled_from(NAMES)), fault=FAULT
    )
    def set_backing(self, top: str, base: str | None, fault: int | None) -> None:
        t_node = self.node(top)
        b_node = self.node(base) if base is not None else None
        if t_node is None or t_node.driver is not graphkit.FMT or (base and b_node is None):
            return
        self.run(fault, lambda t: composite.set_backing(t, self.graph, t_node, b_node))

    @rule(new=st.sampled_from(NAMES), top=st.sampled_from(NAMES), fault=FAULT)
    def append(self, new: str, top: str, fault: int | None) -> None:
        n, t_node = self.node(new), self.node(top)
        if n is None or t_node is None or n.driver is not graphkit.FMT or n.backing is not None:
            return
        self.run(fault, lambda t: composite.append(t, self.graph, n, t_node))

    @rule(name=st.sampled_from(NAMES), writable=st.booleans(), fault=FAULT)
    def add_export(self, name: str, writable: bool, fault: int | None) -> None:
        node = self.node(name)
        if node is not None:
            self.run(fault, lambda t: export(t, self.graph, node, writable=writable))

    @rule(data=st.data(), fault=FAULT)
    def remove_export(self, data: st.DataObject, fault: int | None) -> None:
        bbs = [bb for bb in self.graph.backends if bb.root is not None]
        if not bbs:
            return
        bb = data.draw(st.sampled_from(bbs))
        assert bb.root is not None
        edge = bb.root
        self.run(fault, lambda t: composite.detach_child(t, self.graph, edge))

    @rule(name=st.sampled_from(NAMES), rw=st.booleans(), fault=FAULT)
    def reopen(self, name: str, rw: bool, fault: int | None) -> None:
        node = self.node(name)
        if node is None:
            return
        flags = int(graphkit.RW) if rw else 0
        self.run(fault, lambda t: reopen_multiple(t, self.graph, [ReopenRequest(node, flags)]))

    @rule(name=st.sampled_from(NAMES), fault=FAULT)
    def blockdev_del(self, name: str, fault: int | None) -> None:
        node = self.node(name)
        if node is None or not node.monitor_owned or node.refcnt > 1:
            return
        self.run(fault, lambda t: delete(t, self.graph, node))

    @invariant()
    def sound(self) -> None:
        assert check_invariants(self.graph) == []


GraphMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGraphMachine = GraphMachine.TestCase
