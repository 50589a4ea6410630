"""The transaction log written by the daemon: one line per graph transaction."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from cmdkit import Client

import qmpgraph.daemon
from qmpgraph.graph.digest import graph_digest


def test_header_then_records(tmp_path: Path) -> None:
    log = tmp_path / "t.jsonl"
    c = Client(log=log, seed=99)
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.run("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.daemon.stop()
    lines = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert lines[0] == {"qmpgraph-transaction-log": 1, "name-seed": 99}
    ok, bad = lines[1], lines[2]
    assert ok["seq"] == 1 and ok["command"] == "blockdev-add" and ok["outcome"] == "committed"
    assert ok["arguments"] == {"driver": "null-co", "node-name": "n0"}
    assert {"action": "add-node"}.items() <= ok["actions"][0].items()
    assert all("undo" in a for a in ok["actions"])
    assert "error" not in ok
    assert bad["outcome"] == "aborted"
    assert bad["error"] == {"class": "GenericError", "desc": "Duplicate nodes with node-name='n0'"}
    assert bad["digest"] == ok["digest"] == graph_digest(c.daemon.graph)


def test_digest_is_the_graph_after(tmp_path: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    d1 = graph_digest(c.daemon.graph)
    c.ok("blockdev-del", {"node-name": "n0"})
    d2 = graph_digest(c.daemon.graph)
    assert [r["digest"] for r in c.records] == [d1, d2]
    assert d1 != d2


def test_schema_errors_and_queries_are_not_logged() -> None:
    c = Client()
    c.run("blockdev-add", {"driver": "nosuch", "node-name": "x"})
    c.run("blockdev-del", {})
    c.ok("query-named-block-nodes")
    c.ok("x-debug-query-block-graph")
    assert c.records == []


def test_failed_del_is_logged_as_aborted() -> None:
    c = Client()
    c.run("blockdev-del", {"node-name": "nosuch"})
    (rec,) = c.records
    assert rec["outcome"] == "aborted" and rec["actions"] == []
    assert rec["error"]["desc"] == "Failed to find node with node-name='nosuch'"


def test_aborted_add_logs_the_undone_actions() -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.run(
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "n0"}},
    )
    rec = c.records[-1]
    assert rec["outcome"] == "aborted"
    assert rec["digest"] == c.records[0]["digest"]


def test_no_digest_without_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a log a command does no whole-graph work (no digest)."""

    def boom(graph: object) -> str:
        raise AssertionError("graph_digest called without a log")

    monkeypatch.setattr(qmpgraph.daemon, "graph_digest", boom)
    d = qmpgraph.daemon.Daemon(name_seed=1)
    assert d.transaction_log is None
    from qmpgraph.commands.dispatcher import Dispatcher
    from qmpgraph.protocol.session import QMPSession

    s = QMPSession(d.greeting())
    s.accept_capabilities([])
    reply = Dispatcher(d).dispatch(
        s, {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}}
    )
    assert reply == {"return": {}}


def test_log_appends_a_new_header(tmp_path: Path) -> None:
    """A second daemon on the same log starts a new section."""
    log = tmp_path / "t.jsonl"
    for seed in (1, 2):
        c = Client(log=log, seed=seed)
        c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        c.daemon.stop()
    heads = [x for x in map(orjson.loads, log.read_bytes().splitlines()) if "name-seed" in x]
    assert [h["name-seed"] for h in heads] == [1, 2]
