"""qom-list-types and qom-list-properties against qemu-storage-daemon 7.2.

The recorded table (``qmpgraph/schema/data/qom-types.json``) must still be
what ``tools/record_qom_types.py`` records from the installed daemon, and
every query qmpgraph answers from it must equal the live daemon's answer:
each type as ``implements`` (with and without abstract types) and each
type's property list or error.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from cmdkit import Client
from conftest import require_qemu

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from qsd_oracle import QSD
from record_qom_types import record

# The one query qmpgraph answers differently: QEMU 7.2 aborts on it.
ABORTS = "qio-net-listener"


def _table() -> dict[str, Any]:
    text = resources.files("qmpgraph.schema").joinpath("data", "qom-types.json").read_text()
    table: dict[str, Any] = json.loads(text)
    return table


@pytest.mark.qemu
def test_recorded_table_is_current() -> None:
    """Recording again from the installed daemon gives the stored table."""
    stored = _table()
    stored.pop("qemu")
    assert record(require_qemu()) == stored


def _answer(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        return {"error": reply["error"]}
    return reply["return"]


@pytest.mark.qemu
def test_every_query_matches_the_daemon() -> None:
    """All ``implements`` and ``typename`` values qemu-storage-daemon knows,
    plus unknown ones, answered by both."""
    names = [t["name"] for t in _table()["types"]] + ["nosuch", "", "IOTHREAD"]
    client = Client()
    with QSD(require_qemu()) as qsd:
        for name in names:
            for abstract in (False, True):
                args = {"implements": name, "abstract": abstract}
                want = _answer(qsd.execute("qom-list-types", args))
                assert _answer(client.run("qom-list-types", args)) == want, args
            if name == ABORTS:
                continue
            args = {"typename": name}
            want = _answer(qsd.execute("qom-list-properties", args))
            assert _answer(client.run("qom-list-properties", args)) == want, args
        for args in ({}, {"abstract": True}, {"abstract": False}):
            want = _answer(qsd.execute("qom-list-types", args))
            assert _answer(client.run("qom-list-types", args)) == want, args


def test_aborting_query_is_an_error() -> None:
    """Where QEMU 7.2 dies, qmpgraph answers an error and keeps serving."""
    client = Client()
    reply = client.run("qom-list-properties", {"typename": ABORTS})
    assert reply["error"]["class"] == "GenericError"
    assert client.run("qom-list-types", {"implements": ABORTS}) == {
        "return": [{"name": ABORTS, "parent": "object"}]
    }
