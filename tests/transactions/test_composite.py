"""Composite operations: messages (QEMU 7.2 wording, verified live per the reference),
permissions after each operation, and rollback to an identical digest."""

from __future__ import annotations

import graphkit
import pytest
from graphkit import delete, export, filter_on, fmt_on, protocol

from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.graph.model import Job
from qmpgraph.graph.perms import PERM_ALL, Perm, Role, perm_qapi_names
from qmpgraph.transactions import composite
from qmpgraph.transactions.actions import add_root_parent, set_frozen
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.reopen import ReopenRequest, reopen_multiple


def names(perm: int) -> list[str]:
    return perm_qapi_names(perm)


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(name_seed=0)


def test_format_file_perms_match_qemu(graph: BlockGraph) -> None:
    f = protocol(graph, "f")
    with Transaction() as tran:
        q = fmt_on(tran, graph, "q", f)
    assert q.file is not None and q.backing is None
    assert names(q.file.perm) == ["resize", "write", "consistent-read"]
    assert names(q.file.shared) == ["write-unchanged", "consistent-read"]
    assert check_invariants(graph) == []


def test_second_format_on_same_file_conflicts_exactly(graph: BlockGraph) -> None:
    f0 = protocol(graph, "f0")
    with Transaction() as tran:
        fmt_on(tran, graph, "q0", f0)
    before = graph_digest(graph)
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        fmt_on(tran, graph, "q1", f0)
    assert exc.value.desc == (
        "Permission conflict on node 'f0': permissions 'write, resize' are both required "
        "by node 'q0' (uses node 'f0' as 'file' child) and unshared by node 'q1' "
        "(uses node 'f0' as 'file' child)."
    )
    assert graph_digest(graph) == before
    assert graph.lookup("q1") is None


def test_export_conflict_names_an_unnamed_block_device(graph: BlockGraph) -> None:
    qf = protocol(graph, "qf")
    with Transaction() as tran:
        export(tran, graph, qf, writable=False)  # NBD exports default to read-only
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        fmt_on(tran, graph, "qq", qf)
    assert exc.value.desc == (
        "Permission conflict on node 'qf': permissions 'resize' are both required by "
        "node 'qq' (uses node 'qf' as 'file' child) and unshared by an unnamed block "
        "device (uses node 'qf' as 'root' child)."
    )


def test_job_edge_description(graph: BlockGraph) -> None:
    mid = protocol(graph, "mid")
    job = Job("stream", "st")
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    with Transaction() as tran:
        add_root_parent(tran, graph, job)
        composite.root_attach(
            tran, graph, job, mid, "intermediate node", role=0, perm=0, shared=shared
        )
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        export(tran, graph, mid)
    assert exc.value.desc == (
        "Permission conflict on node 'mid': permissions 'write' are both required by an "
        "unnamed block device (uses node 'mid' as 'root' child) and unshared by stream job "
        "'st' (uses node 'mid' as 'intermediate node' child)."
    )


def test_backing_perms_and_cycle_message(graph: BlockGraph) -> None:
    with Transaction() as tran:
        base = fmt_on(tran, graph, "base", protocol(graph, "bf"), rw=False)
        top = fmt_on(tran, graph, "top", protocol(graph, "tf"))
        composite.set_backing(tran, graph, top, base)
    assert top.backing is not None and top.backing.child is base
    assert top.backing.role == Role.COW
    assert names(top.backing.perm) == []
    assert names(top.backing.shared) == ["resize", "write-unchanged", "write", "consistent-read"]
    assert base.op_blockers["drive-del"] == ["node is used as backing hd of 'top'"]
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        composite.set_backing(tran, graph, base, top)
    assert exc.value.desc == "Making 'top' a backing child of 'base' would create a cycle"
    with Transaction() as tran:
        export(tran, graph, top)
    assert names(top.backing.perm) == ["consistent-read"]
    assert check_invariants(graph) == []


def test_failed_append_leaves_graph_identical(graph: BlockGraph) -> None:
    with Transaction() as tran:
        top = fmt_on(tran, graph, "top", protocol(graph, "tf"))
        export(tran, graph, top)
        overlay = fmt_on(tran, graph, "ov", protocol(graph, "of", rw=False), rw=False)
    before = graph_digest(graph)
    with pytest.raises(GenericError, match=r"^Block node is read-only$"), Transaction() as tran:
        composite.append(tran, graph, overlay, top)
    assert graph_digest(graph) == before
    assert overlay.backing is None and not top.op_blockers


def test_append_moves_parents_and_keeps_the_new_backing(graph: BlockGraph) -> None:
    with Transaction() as tran:
        top = fmt_on(tran, graph, "top", protocol(graph, "tf"))
        bb = export(tran, graph, top)
        overlay = fmt_on(tran, graph, "ov", protocol(graph, "of"))
        composite.append(tran, graph, overlay, top)
    assert bb.root is not None and bb.root.child is overlay
    assert overlay.backing is not None and overlay.backing.child is top
    assert names(overlay.backing.perm) == ["consistent-read"]
    assert check_invariants(graph) == []


def test_frozen_backing_cannot_change(graph: BlockGraph) -> None:
    with Transaction() as tran:
        mid = fmt_on(tran, graph, "mid", protocol(graph, "mf"))
        top = fmt_on(tran, graph, "top", protocol(graph, "tf"))
        composite.set_backing(tran, graph, top, mid)
        assert top.backing is not None
        set_frozen(tran, top.backing, True)
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        composite.set_backing(tran, graph, top, None)
    assert exc.value.desc == "Cannot change frozen 'backing' link from 'top' to 'mid'"


def test_filter_insert_and_drop(graph: BlockGraph) -> None:
    with Transaction() as tran:
        base = protocol(graph, "base")
        bb = export(tran, graph, base)
    with Transaction() as tran:
        flt = filter_on(tran, graph, "flt", base)
        composite.insert_node(tran, graph, base, flt)
    assert bb.root is not None and bb.root.child is flt
    assert flt.file is not None and flt.file.child is base
    assert names(flt.file.perm) == ["write", "consistent-read"]
    with Transaction() as tran:
        composite.drop_filter(tran, graph, flt)
        delete(tran, graph, flt)
    assert bb.root.child is base and graph.lookup("flt") is None
    assert check_invariants(graph) == []


def test_replace_node_skips_job_edges(graph: BlockGraph) -> None:
    a, b = protocol(graph, "a"), protocol(graph, "b")
    job = Job("backup", "j")
    with Transaction() as tran:
        add_root_parent(tran, graph, job)
        composite.root_attach(tran, graph, job, a, "main node", role=0, perm=0, shared=PERM_ALL)
        bb = export(tran, graph, a)
        composite.replace_node(tran, graph, a, b)
    assert bb.root is not None and bb.root.child is b
    assert job.edges[0].child is a


def test_delete_cascades_to_inline_children_and_abort_restores(graph: BlockGraph) -> None:
    with Transaction() as tran:
        f = graphkit.new_node(tran, graph, "f", graphkit.NULL)
        q = fmt_on(tran, graph, "q", f)
        # Make ``f`` an inline child: only the edge owns it.
        delete(tran, graph, f)
    assert f.refcnt == 1 and not f.monitor_owned
    before = graph_digest(graph)
    with pytest.raises(RuntimeError), Transaction() as tran:
        delete(tran, graph, q)
        assert graph.lookup("f") is None and graph.lookup("q") is None
        raise RuntimeError
    assert graph_digest(graph) == before
    assert [n.node_name for n in graph.named_nodes_newest_first()] == ["q", "f"]


def test_reopen_read_only_uses_future_flags(graph: BlockGraph) -> None:
    with Transaction() as tran:
        f = protocol(graph, "f")
        q = fmt_on(tran, graph, "q", f)
        export(tran, graph, q)
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        reopen_multiple(tran, graph, [ReopenRequest(q, 0)])
    assert exc.value.desc == "Read-only block node 'q' cannot support read-write users"
    with Transaction() as tran:
        q2 = fmt_on(tran, graph, "q2", protocol(graph, "f2"))
    with Transaction() as tran:
        reopen_multiple(tran, graph, [ReopenRequest(q2, 0)])
    assert q2.read_only and q2.file is not None
    assert names(q2.file.perm) == ["consistent-read"]


def test_reopen_switches_backing_and_reports_cycles(graph: BlockGraph) -> None:
    with Transaction() as tran:
        base = fmt_on(tran, graph, "base", protocol(graph, "bf"))
        mid = fmt_on(tran, graph, "mid", protocol(graph, "mf"))
        top = fmt_on(tran, graph, "top", protocol(graph, "tf"))
        composite.set_backing(tran, graph, top, mid)
    rw = int(graphkit.RW)
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        reopen_multiple(tran, graph, [ReopenRequest(mid, rw, backing="top")])
    assert exc.value.desc == "Making 'top' a backing child of 'mid' would create a cycle"
    with pytest.raises(GenericError) as exc, Transaction() as tran:
        reopen_multiple(
            tran,
            graph,
            [ReopenRequest(top, rw, backing="base"), ReopenRequest(mid, rw, backing="nope")],
        )
    assert exc.value.desc == "Cannot find device='' nor node-name='nope'"
    assert top.backing is not None and top.backing.child is mid
    with Transaction() as tran:
        reopen_multiple(tran, graph, [ReopenRequest(top, rw, backing="base")])
    assert top.backing is not None and top.backing.child is base
    assert check_invariants(graph) == []


def test_detach_loosens_permissions(graph: BlockGraph) -> None:
    f = protocol(graph, "f")
    with Transaction() as tran:
        q = fmt_on(tran, graph, "q", f)
    assert q.file is not None
    with Transaction() as tran:
        composite.detach_child(tran, graph, q.file)
    assert q.file is None and f.parents == []
    assert f.refcnt == 1
