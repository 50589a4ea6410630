"""User objects in the graph digest: failures leave it, successes and reference moves change it.

The objects live beside the graph (``qmpgraph.objects.tree_for``) and join
``graph_digest`` through ``register_state_source``; replay therefore checks
them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from cmdkit import Client

from qmpgraph.graph.digest import graph_digest, graph_state, state_digest
from qmpgraph.replay import replay


def _digest(c: Client) -> str:
    return graph_digest(c.daemon.graph)


def _objects(c: Client) -> Any:
    return graph_state(c.daemon.graph)["objects"]


def test_graph_without_objects_has_no_objects_part() -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert "objects" not in graph_state(c.daemon.graph)


def test_object_add_and_del_change_the_digest_and_back() -> None:
    c = Client()
    empty = _digest(c)
    c.ok("object-add", {"qom-type": "throttle-group", "id": "tg0"})
    added = _digest(c)
    assert added != empty
    c.ok("object-del", {"id": "tg0"})
    assert _digest(c) == empty


def test_failed_object_commands_leave_the_digest() -> None:
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": "tg0"})
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0",
                          "throttle-group": "tg0"})  # fmt: skip
    c.fails(
        "object-add",
        {"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": -1}},
        "bps/iops/max values must be within [0, 1000000000000000]",
    )
    c.fails(
        "object-add",
        {"qom-type": "throttle-group", "id": "tg0"},
        "attempt to add duplicate property 'tg0' to object (type 'container')",
    )
    c.fails("object-del", {"id": "tg0"}, "object 'tg0' is in use, can not be deleted")
    c.fails("object-del", {"id": "nope"}, "object 'nope' not found")


def test_qom_set_changes_the_digest() -> None:
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": "tg0"})
    before = _digest(c)
    c.ok("qom-set", {"path": "/objects/tg0", "property": "limits",
                     "value": {"iops-total": 10}})  # fmt: skip
    assert _digest(c) != before


def _throttled(c: Client) -> None:
    for obj_id in ("tg0", "tg1"):
        c.ok("object-add", {"qom-type": "throttle-group", "id": obj_id})
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.ok("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0",
                          "throttle-group": "tg0"})  # fmt: skip


def _reopen(group: str) -> dict[str, object]:
    return {"driver": "throttle", "node-name": "t0", "file": "n0", "throttle-group": group}


def test_throttle_reopen_moves_the_reference() -> None:
    c = Client()
    _throttled(c)
    c.fails("blockdev-reopen", {"options": [_reopen("nope")]},
            "Throttle group 'nope' does not exist")  # fmt: skip
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n1"})
    c.fails(
        "blockdev-reopen",
        {"options": [_reopen("tg1"), {"driver": "null-co", "node-name": "n1", "size": 1}]},
        "Cannot change the option 'size'",
    )
    before = _objects(c)
    c.ok("blockdev-reopen", {"options": [_reopen("tg0")]})
    assert _objects(c) == before  # the same group: nothing moves
    c.ok("blockdev-reopen", {"options": [_reopen("tg1")]})
    assert [(o[0], o[2]) for o in _objects(c)] == [("tg0", 1), ("tg1", 2)]
    c.fails("object-del", {"id": "tg1"}, "object 'tg1' is in use, can not be deleted")
    c.ok("object-del", {"id": "tg0"})
    c.ok("blockdev-del", {"node-name": "t0"})
    c.ok("object-del", {"id": "tg1"})


def test_log_with_objects_replays(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    c = Client(log=log)
    _throttled(c)
    c.ok("blockdev-reopen", {"options": [_reopen("tg1")]})
    c.run("object-del", {"id": "tg1"})
    c.ok("qom-set", {"path": "/objects/tg0", "property": "limits",
                     "value": {"bps-total": 5}})  # fmt: skip
    c.daemon.stop()
    matched, divergence = replay(log)
    assert divergence is None
    assert matched == 7


def test_replay_notices_a_missing_reference_move(tmp_path: Path) -> None:
    """A log whose reopen did not move the group reference diverges in the digest."""
    log = tmp_path / "log.jsonl"
    c = Client(log=log)
    _throttled(c)
    c.ok("blockdev-reopen", {"options": [_reopen("tg1")]})
    c.daemon.stop()
    lines = log.read_bytes().splitlines()
    good = Client()
    _throttled(good)
    # The objects as they were before the reopen: the node's reference still on tg0.
    stale = dict(graph_state(c.daemon.graph), objects=_objects(good))
    rec = orjson.loads(lines[-1])
    rec["digest"] = state_digest(stale)
    lines[-1] = orjson.dumps(rec)
    log.write_bytes(b"\n".join(lines) + b"\n")
    _, divergence = replay(log)
    assert divergence is not None and divergence.what == "digest"
