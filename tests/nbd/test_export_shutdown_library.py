"""An export deleted in mode hard while clients hold it, called as a library.

A stand-in runtime says which exports have clients, so the bookkeeping runs
without sockets: the export shuts down (id taken, name free, node in use),
``finish_shutdown`` deletes it with its event, once, and nbd-server-stop
deletes exports with clients after the others, newest connection first.
The messages and orders are qsd 7.2's, as test_export_lifecycle_live.py
observes them against the real daemon.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.commands.exports import NBDExport, export_table, finish_shutdown
from qmpgraph.graph.digest import graph_digest


@dataclass
class FakeRuntime:
    """Clients by export id: the connection number of the newest one."""

    clients: dict[str, int] = field(default_factory=dict)
    hung_up: list[str] = field(default_factory=list)

    def has_clients(self, export: NBDExport) -> bool:
        return export.id in self.clients

    def newest_client(self, export: NBDExport) -> int:
        return self.clients.get(export.id, 0)

    def disconnect(self, export: NBDExport) -> None:
        self.hung_up.append(export.id)

    def stop(self) -> None:
        self.clients.clear()


def _start(tmp_path: Path) -> tuple[Client, FakeRuntime, list[dict[str, object]]]:
    img = tmp_path / "img.raw"
    img.write_bytes(bytes(1 << 20))
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(img), "node-name": "f0"})
    c.ok("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r0"})
    c.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "s")}}})
    server = export_table(c.daemon).server
    assert server is not None
    runtime = FakeRuntime()
    server.runtime = runtime
    events: list[dict[str, object]] = []
    c.daemon.subscribe(events.append)
    return c, runtime, events


def _deleted(events: list[dict[str, object]]) -> list[object]:
    return [e["data"] for e in events if e["event"] == "BLOCK_EXPORT_DELETED"]


def test_hard_delete_with_clients_shuts_down_until_they_leave(tmp_path: Path) -> None:
    c, runtime, events = _start(tmp_path)
    c.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "r0", "name": "disk"})
    runtime.clients["e0"] = 1
    in_use = "export 'e0' still in use"
    assert c.run("block-export-del", {"id": "e0"})["error"]["desc"] == in_use
    assert c.run("nbd-server-remove", {"name": "e0", "mode": "safe"})["error"]["desc"] == in_use
    c.ok("block-export-del", {"id": "e0", "mode": "hard"})
    assert runtime.hung_up == ["e0"]
    assert _deleted(events) == []
    shutting = {"id": "e0", "type": "nbd", "node-name": "r0", "shutting-down": True}
    assert c.ok("query-block-exports") == [shutting]
    again = "Export 'e0' is already shutting down"
    assert c.run("block-export-del", {"id": "e0", "mode": "hard"})["error"]["desc"] == again
    assert c.run("nbd-server-remove", {"name": "e0"})["error"]["desc"] == again
    args = {"type": "nbd", "id": "e0", "node-name": "r0", "name": "other"}
    taken = "Block export id 'e0' is already in use"
    assert c.run("block-export-add", args)["error"]["desc"] == taken
    # The name is free already: a new export may take it.
    c.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r0", "name": "disk"})
    assert c.run("blockdev-del", {"node-name": "r0"})["error"]["desc"] == "Node r0 is in use"
    exp = export_table(c.daemon).by_id("e0")
    assert exp is not None
    del runtime.clients["e0"]
    before = graph_digest(c.daemon.graph)
    finish_shutdown(c.daemon, exp)
    assert _deleted(events) == [{"id": "e0"}]
    assert graph_digest(c.daemon.graph) != before
    finish_shutdown(c.daemon, exp)  # a second call finds nothing to do
    assert _deleted(events) == [{"id": "e0"}]
    assert [e["id"] for e in c.ok("query-block-exports")] == ["e1"]
    c.ok("nbd-server-stop")


def test_server_stop_deletes_exports_with_clients_last(tmp_path: Path) -> None:
    c, runtime, events = _start(tmp_path)
    # Each export on a node of its own (qsd 7.2 orders exports sharing a
    # node with a client's export otherwise: its drain polls in between).
    for i in range(4):
        c.ok("blockdev-add", {"driver": "null-co", "node-name": f"n{i}"})
        c.ok("block-export-add", {"type": "nbd", "id": f"e{i}", "node-name": f"n{i}"})
    # e0 and e2 have clients, e2's the newer connection.
    runtime.clients.update({"e0": 1, "e2": 2})
    c.ok("nbd-server-stop")
    assert _deleted(events) == [{"id": "e1"}, {"id": "e3"}, {"id": "e2"}, {"id": "e0"}]
    assert c.ok("query-block-exports") == []
