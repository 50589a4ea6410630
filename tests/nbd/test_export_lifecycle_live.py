"""Export deletion while NBD clients are connected, live, against both daemons.

The differential harness cannot connect NBD clients, so these scenarios run
the same QMP steps and raw NBD clients (``nbdwire.RawClient``) against
qemu-storage-daemon and qmpgraph and compare what each step saw: the reply,
and the events that came before it.  What QEMU 7.2 does, and these tests
pin down:

* a client that chose an export (NBD_OPT_GO) holds it: ``block-export-del``
  and ``nbd-server-remove`` in mode safe refuse ("export '...' still in
  use"), and the node stays in use; a client still negotiating holds nothing;
* in mode hard the reply comes first and BLOCK_EXPORT_DELETED only once the
  hung-up client has gone, which is when its requests in flight have ended
  (reads held by a throttle group here); meanwhile the export is shutting
  down (its id is taken, its name is free, its node in use, a second delete
  says "already shutting down");
* ``nbd-server-stop`` waits for the clients: the events come before its reply;
* a client that leaves by itself (NBD_CMD_DISC) releases the export;
* a fleecing graph's exports (snapshot-access, the cbw as the guest's
  export, the temporary image, a legacy export) look the same to nbdinfo:
  flags, description, contexts, maps, and which block-status requests fail.

Deadlines bound every wait (the livekit's socket timeouts); nothing here
asserts how long anything takes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run
from nbdwire import RawClient, name_payload, request

pytestmark = pytest.mark.qemu

OPT_GO = 7
CMD_READ = 0
CMD_DISC = 2
REP_ACK = 1

Step = tuple[str, list[str], dict[str, Any]]


class Session:
    """A daemon plus the transcript of what each step saw."""

    def __init__(self, daemon: LiveDaemon) -> None:
        self.daemon = daemon
        self.log: list[Any] = []

    def step(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Run a command; log its reply with the events that came before it."""
        reply = self.daemon.qmp(command, **arguments)
        self.log.append((command, self._events(), reply))
        return reply

    def _events(self) -> list[str]:
        out = [e["event"] + json.dumps(e.get("data"), sort_keys=True) for e in self.daemon.events]
        self.daemon.events.clear()
        return out

    def wait_event(self, name: str) -> None:
        """Poll (query-version) until event ``name`` has come; log the events seen."""
        deadline = time.monotonic() + TIMEOUT
        seen: list[str] = []
        while not any(e.startswith(name) for e in seen):
            assert time.monotonic() < deadline, (self.daemon.kind, name, seen)
            self.daemon.qmp("query-version")
            seen += self._events()
        self.log.append(("wait " + name, seen))

    def until(self, what: str, check: Callable[[], bool]) -> None:
        """Poll ``check`` until true (a client's leaving is noticed asynchronously)."""
        deadline = time.monotonic() + TIMEOUT
        while not check():
            assert time.monotonic() < deadline, (self.daemon.kind, what)
            time.sleep(0.01)
        self.log.append(("until " + what, self._events()))

    def note(self, *what: Any) -> None:
        """Log an observation of a client."""
        self.log.append(what)


def go(path: str, name: str) -> RawClient:
    """A client that negotiated export ``name`` (NBD_OPT_GO acknowledged)."""
    client = RawClient(path, timeout=TIMEOUT)
    client.handshake()
    replies = client.opt(OPT_GO, name_payload(name.encode()))
    assert replies[-1].type == REP_ACK, replies
    return client


def hung_up(client: RawClient) -> bool:
    """Whether the server closed the connection (EOF, or a reset)."""
    try:
        return client.sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _start(kind: str, tmp_path: Path, extra: list[str] | None = None) -> Session:
    d = tmp_path / kind
    d.mkdir(parents=True)
    run("qemu-img", "create", "-q", "-f", "raw", str(d / "a.raw"), "1M")
    blockdevs = [f"file,filename={d / 'a.raw'},node-name=f0", "raw,file=f0,node-name=r0"]
    daemon = LiveDaemon(kind, require_qemu(), d / "run", blockdevs + (extra or []))
    daemon.start_nbd()
    return Session(daemon)


def _both(tmp_path: Path, scenario: Callable[[Session], None]) -> list[Any]:
    """Run ``scenario`` on qsd and on qmpgraph; the two transcripts must match."""
    logs: dict[str, list[Any]] = {}
    for kind in ("qsd", "qmpgraph"):
        session = _start(kind, tmp_path)
        try:
            scenario(session)
        finally:
            session.daemon.stop()
        # File names differ by the daemon's directory only.
        text = json.dumps(session.log).replace(str(tmp_path / kind), "$D")
        logs[kind] = json.loads(text)
    assert logs["qmpgraph"] == logs["qsd"]
    return logs["qsd"]


def _safe_then_hard(s: Session) -> None:
    s.step("block-export-add", type="nbd", id="e0", node_name="r0", name="disk")
    s.step("block-export-add", type="nbd", id="e1", node_name="f0", name="other")
    negotiating = RawClient(s.daemon.nbd_path, timeout=TIMEOUT)
    negotiating.handshake()
    # A client still negotiating holds no export.
    s.step("block-export-del", id="e1")
    client = go(s.daemon.nbd_path, "disk")
    s.step("block-export-del", id="e0")
    s.step("block-export-del", id="e0", mode="safe")
    s.step("nbd-server-remove", name="e0")
    s.step("query-block-exports")
    s.step("blockdev-del", node_name="r0")
    s.step("block-export-del", id="e0", mode="hard")
    s.wait_event("BLOCK_EXPORT_DELETED")
    s.note("client hung up", hung_up(client))
    s.step("query-block-exports")
    s.step("block-export-del", id="e0", mode="hard")
    s.step("block-export-add", type="nbd", id="e0", node_name="r0", name="disk")
    s.step("query-block-exports")
    client.close()
    negotiating.close()


def test_export_del_safe_refuses_hard_deletes_after_reply(tmp_path: Path) -> None:
    log = _both(tmp_path, _safe_then_hard)
    in_use = {"class": "GenericError", "desc": "export 'e0' still in use"}
    assert log[3] == ["block-export-del", [], {"error": in_use}]
    # Mode hard with a client: no event before the reply, the event after it.
    assert log[8] == ["block-export-del", [], {"return": {}}]
    assert log[9] == ["wait BLOCK_EXPORT_DELETED", ['BLOCK_EXPORT_DELETED{"id": "e0"}']]


def _shutting_down(s: Session) -> None:
    # Reads queued behind a throttle keep the hung-up client, and so the
    # export, alive for a while after the reply: the export is shutting down.
    s.step("object-add", qom_type="throttle-group", id="tg", limits={"bps-read": 65536})
    s.step("blockdev-add", driver="throttle", node_name="thr", file="f0", throttle_group="tg")
    s.step("block-export-add", type="nbd", id="e0", node_name="thr", name="disk")
    client = go(s.daemon.nbd_path, "disk")
    client.send(
        request(CMD_READ, 0, 65536, cookie=1)
        + request(CMD_READ, 0, 131072, cookie=2)
        + request(CMD_READ, 0, 131072, cookie=3)
    )
    # Once the first reply is here, the next reads are in flight (throttled).
    first = client.reply(65536)
    s.note("first read", first.type, first.cookie, len(first.payload))
    s.step("block-export-del", id="e0", mode="hard")
    s.step("query-block-exports")
    s.step("block-export-del", id="e0", mode="hard")
    s.step("nbd-server-remove", name="e0")
    s.step("block-export-add", type="nbd", id="e0", node_name="thr", name="again")
    s.step("block-export-add", type="nbd", id="e1", node_name="thr", name="disk")
    s.step("blockdev-del", node_name="thr")
    s.wait_event("BLOCK_EXPORT_DELETED")
    s.note("client hung up", hung_up(client))
    s.step("query-block-exports")
    s.step("block-export-del", id="e1")
    s.step("blockdev-del", node_name="thr")
    client.close()


def test_export_shutting_down_while_requests_run(tmp_path: Path) -> None:
    log = _both(tmp_path, _shutting_down)
    assert log[4] == ["block-export-del", [], {"return": {}}]
    shutting = {"id": "e0", "node-name": "thr", "shutting-down": True, "type": "nbd"}
    assert log[5] == ["query-block-exports", [], {"return": [shutting]}]


def _client_leaves(s: Session) -> None:
    s.step("block-export-add", type="nbd", id="e0", node_name="r0", name="disk")
    client = go(s.daemon.nbd_path, "disk")
    client.send(request(CMD_READ, 0, 4096, cookie=7))
    chunk = client.reply(4096)
    s.note("read", chunk.type, chunk.cookie, len(chunk.payload))
    s.step("block-export-del", id="e0")
    client.send(request(CMD_DISC, 0, 0))
    s.until("client gone", lambda: "return" in s.daemon.qmp("block-export-del", id="e0"))
    s.note("client hung up", hung_up(client))
    s.step("query-block-exports")
    s.step("x-debug-query-block-graph")
    client.close()


def test_client_that_disconnects_releases_export(tmp_path: Path) -> None:
    log = _both(tmp_path, _client_leaves)
    assert log[-4] == ["until client gone", ['BLOCK_EXPORT_DELETED{"id": "e0"}']]


def _server_stop(s: Session) -> None:
    s.step("block-export-add", type="nbd", id="e0", node_name="r0", name="disk")
    s.step("nbd-server-add", device="f0", name="legacy")
    first = go(s.daemon.nbd_path, "disk")
    second = go(s.daemon.nbd_path, "legacy")
    s.step("nbd-server-remove", name="legacy", mode="safe")
    # Stopping the server waits for its clients: events, then the reply.
    s.step("nbd-server-stop")
    s.note("clients hung up", hung_up(first), hung_up(second))
    s.step("query-block-exports")
    s.step("blockdev-del", node_name="r0")
    first.close()
    second.close()


def test_server_stop_with_clients(tmp_path: Path) -> None:
    log = _both(tmp_path, _server_stop)
    assert log[3][0] == "nbd-server-stop" and len(log[3][1]) == 2


def _server_stop_order(s: Session) -> None:
    # Exports on nodes of their own, clients on two of them.
    for i in range(4):
        s.step("blockdev-add", driver="null-co", node_name=f"n{i}")
        s.step("block-export-add", type="nbd", id=f"e{i}", node_name=f"n{i}")
    clients = [go(s.daemon.nbd_path, name) for name in ("n2", "n0")]
    s.step("nbd-server-stop")
    for client in clients:
        client.close()


def test_server_stop_deletes_exports_with_clients_last(tmp_path: Path) -> None:
    log = _both(tmp_path, _server_stop_order)
    deleted = [f'BLOCK_EXPORT_DELETED{{"id": "e{i}"}}' for i in "1302"]
    assert log[-1] == ["nbd-server-stop", deleted, {"return": {}}]


def _fleecing_teardown(s: Session) -> None:
    d = Path(s.daemon.qmp_path).parent
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "src.qcow2"), "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(d / "tmp.qcow2"), "1M")
    src = {"driver": "file", "node-name": "source-file", "filename": str(d / "src.qcow2")}
    s.step("blockdev-add", driver="qcow2", node_name="source", file=src)
    s.step("block-dirty-bitmap-add", node="source", name="b0")
    tmp = {"driver": "file", "node-name": "tmp-file", "filename": str(d / "tmp.qcow2")}
    s.step("blockdev-add", driver="qcow2", node_name="fl-tmp", file=tmp, backing="source")
    bitmap = {"node": "source", "name": "b0"}
    s.step(
        "blockdev-add",
        driver="copy-before-write",
        node_name="fl-cbw",
        file="source",
        target="fl-tmp",
        bitmap=bitmap,
    )
    s.step("blockdev-add", driver="snapshot-access", node_name="fl", file="fl-cbw")
    s.step("block-export-add", type="nbd", id="fleece", node_name="fl", name="fleece")
    reader = go(s.daemon.nbd_path, "fleece")
    reader.send(request(CMD_READ, 0, 65536, cookie=1))
    chunk = reader.reply(65536)
    s.note("read", chunk.type, chunk.flags, len(chunk.payload))
    # A backup tool tearing down too early, then in order.
    s.step("blockdev-del", node_name="fl")
    s.step("blockdev-del", node_name="fl-cbw")
    s.step("block-export-del", id="fleece")
    s.step("block-export-del", id="fleece", mode="hard")
    s.wait_event("BLOCK_EXPORT_DELETED")
    s.step("blockdev-del", node_name="fl")
    s.step("blockdev-del", node_name="fl-cbw")
    s.step("blockdev-del", node_name="fl-tmp")
    s.step("query-named-block-nodes", flat=True)
    reader.close()


def test_fleecing_teardown_with_reader(tmp_path: Path) -> None:
    log = _both(tmp_path, _fleecing_teardown)
    assert all("error" not in entry[2] for entry in log[-4:-1]), log[-4:-1]


def _nbdinfo(*args: str) -> list[Any]:
    """nbdinfo's exit status, output and error (failures are data here)."""
    res = subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    return [res.returncode, res.stdout, res.stderr]


def _fleecing_exports(kind: str, d: Path) -> str:
    """A fleecing graph's exports as nbdinfo sees them (flags, contexts, maps)."""
    d.mkdir(parents=True)
    src, tmp = d / "src.qcow2", d / "tmp.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(src))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "1M")
    daemon = LiveDaemon(kind, require_qemu(), d / "run", [])
    out: dict[str, Any] = {}
    try:
        addr = {"type": "unix", "data": {"path": daemon.nbd_path}}
        daemon.ok("nbd-server-start", addr=addr, max_connections=1)
        daemon.ok("blockdev-add", driver="qcow2", node_name="source", file=_file(src))
        daemon.ok(
            "blockdev-add", driver="qcow2", node_name="tmp", file=_file(tmp), backing="source"
        )
        daemon.ok("block-dirty-bitmap-add", node="source", name="b0", disabled=True)
        bitmap = {"node": "source", "name": "b0"}
        daemon.ok(
            "blockdev-add",
            driver="copy-before-write",
            node_name="cbw",
            file="source",
            target="tmp",
            bitmap=bitmap,
        )
        daemon.ok("blockdev-add", driver="snapshot-access", node_name="fl", file="cbw")
        exports: dict[str, dict[str, Any]] = {
            "fleece": {"node_name": "fl", "description": "point in time"},
            "guest": {"node_name": "cbw", "writable": True, "bitmaps": ["b0"]},
            "tmp": {"node_name": "tmp"},
        }
        for name, opts in exports.items():
            daemon.ok(
                "block-export-add", type="nbd", id=name, name=name, allocation_depth=True, **opts
            )
        daemon.ok("nbd-server-add", device="source", name="src")
        for name in (*exports, "src"):
            uri = daemon.uri(name)
            out[name] = _nbdinfo("--json", uri)
            out[name + " map"] = _nbdinfo("--map", uri)
            out[name + " depth"] = _nbdinfo("--map=qemu:allocation-depth", uri)
        out["list"] = _nbdinfo("--list", "--json", f"nbd+unix://?socket={daemon.nbd_path}")
    finally:
        daemon.stop()
    return json.dumps(out, sort_keys=True).replace(str(d), "$D")


def _file(path: Path) -> dict[str, str]:
    return {"driver": "file", "filename": str(path)}


def test_fleecing_exports_as_nbdinfo_sees_them(tmp_path: Path) -> None:
    if shutil.which("nbdinfo") is None:
        pytest.fail("nbdinfo is required (libnbd-bin)")
    qsd = _fleecing_exports("qsd", tmp_path / "qsd")
    assert '\\"description\\": \\"point in time\\"' in qsd
    assert _fleecing_exports("qmpgraph", tmp_path / "qmpgraph") == qsd
