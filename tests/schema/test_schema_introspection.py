"""The introspection reply and the command list, restricted to what is implemented.

Byte-exactness with QEMU for the full command set is checked live in
``test_schema_live.py``; these tests check the restriction rules.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.commands.registry import REGISTRY
from qmpgraph.daemon import Daemon
from qmpgraph.protocol import qjson
from qmpgraph.protocol.session import QMPSession
from qmpgraph.schema import load
from qmpgraph.schema.introspect import restrict

SCHEMA = load()


def _names(entities: list[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in entities]


def test_restricted_reply_keeps_commands_events_and_reachable_types() -> None:
    implemented = {"qmp_capabilities", "query-version"}
    kept = restrict(SCHEMA.entities, implemented)
    by_name = {e["name"]: e for e in kept}
    assert {e["name"] for e in kept if e["meta-type"] == "command"} == implemented
    events = [e["name"] for e in SCHEMA.entities if e["meta-type"] == "event"]
    assert [e["name"] for e in kept if e["meta-type"] == "event"] == events
    # Closed: every type referenced is present.
    for e in kept:
        refs = [e.get("arg-type"), e.get("ret-type"), e.get("element-type")]
        refs += [m.get("type") for m in e.get("members", [])]
        refs += [v["type"] for v in e.get("variants", [])]
        for r in refs:
            assert r is None or r in by_name, (e["name"], r)
    # QEMU's order, QEMU's (masked) names.
    full = _names(SCHEMA.entities)
    positions = [full.index(n) for n in _names(kept)]
    assert positions == sorted(positions)
    # qmp_capabilities' argument type (enable: [QMPCapability]) is reachable.
    cap = by_name["qmp_capabilities"]
    assert by_name[cap["arg-type"]]["members"][0]["name"] == "enable"


def test_introspection_is_serialized_once() -> None:
    first = SCHEMA.introspection(REGISTRY)
    assert SCHEMA.introspection(REGISTRY) is first
    text = qjson.dumps(first)
    assert text.startswith('[{"name": ')
    assert first.text(False, 0) is first.text(False, 0)


def test_query_commands_and_introspection_list_the_same_commands() -> None:
    daemon = Daemon(SCHEMA)
    session = QMPSession(daemon.greeting())
    session.accept_capabilities([])
    dispatcher = Dispatcher(daemon)
    listed = dispatcher.dispatch(session, {"execute": "query-commands"})
    assert listed is not None
    names = [c["name"] for c in listed["return"]]
    reply = dispatcher.dispatch(session, {"execute": "query-qmp-schema"})
    assert reply is not None
    introspected = [e["name"] for e in reply["return"].value if e["meta-type"] == "command"]
    assert sorted(names) == sorted(introspected)
    assert set(names) == set(REGISTRY) & set(SCHEMA.command_names)
    # QEMU lists commands in reverse registration (= schema definition) order.
    assert names == [n for n in reversed(SCHEMA.command_names) if n in set(names)]


def test_unimplemented_qemu_command_is_not_found() -> None:
    # Vacuous once qmpgraph implements every command qemu-storage-daemon has.
    missing = [n for n in SCHEMA.command_names if n not in REGISTRY]
    daemon = Daemon(SCHEMA)
    session = QMPSession(daemon.greeting())
    session.accept_capabilities([])
    for name in missing:
        # Arguments that would fail validation: lookup comes first.
        reply = Dispatcher(daemon).dispatch(session, {"execute": name, "arguments": {"bogus": 1}})
        assert reply == {
            "error": {
                "class": "CommandNotFound",
                "desc": f"The command {name} has not been found",
            }
        }


def test_schema_error_happens_before_the_handler() -> None:
    daemon = Daemon(SCHEMA)
    session = QMPSession(daemon.greeting())
    reply = Dispatcher(daemon).dispatch(
        session, {"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}
    )
    assert reply == {
        "error": {
            "class": "GenericError",
            "desc": "Parameter 'null' does not accept value 'foo'",
        }
    }
    assert session.mode.value == "negotiation"
