"""Bad input never crashes qmpgraph: every schema-valid request gets an answer.

QEMU 7.2 aborts on some arguments its schema accepts (an out-of-range size
for null-co, an empty list for blockdev-reopen, ...). qmpgraph answers each
with a GenericError and leaves the graph as it was. Here:

* a hypothesis test sends short sequences of schema-valid random requests
  (``argstrategies``) for every implemented command, except those in
  ``EXCLUDED``, to a daemon whose graph holds a null-co node, a file node
  over a real qcow2 image, a qcow2 node on it and a raw node over a second
  null-co. Each request must get a reply dict with exactly one of
  ``return``/``error``; the graph invariants must hold after it; an error
  must leave the graph digest unchanged. The dispatcher runs with
  ``strict=True``, so an internal exception fails the test with its
  traceback instead of turning into a GenericError reply;
* the known QEMU crashers are asserted to be clear GenericErrors.

The working directory is a temp dir, so every filename a request names
lands there; after each example its images are restored and any file a
command created is removed, so examples stay independent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argstrategies import NODE_NAMES, requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmpgraph.commands
from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.invariants import check_invariants
from qmpgraph.protocol.session import QMPSession

#: Commands not fuzzed, and why.
EXCLUDED = {
    "quit": "stops the daemon",
    "nbd-server-start": "binds a listening socket",
    "block-export-add": "exports bind sockets or mount FUSE",
    "chardev-add": "opens sockets, files and ptys",
    "chardev-change": "opens sockets, files and ptys",
}
COMMANDS = sorted(c for c in qmpgraph.commands.REGISTRY if c not in EXCLUDED)


def _image(directory: Path) -> bool:
    """Create the qcow2 image (1 MiB) and a raw file; False without qemu-img."""
    (directory / "raw.img").write_bytes(bytes(65536))
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return False
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", str(directory / "image.qcow2"), "1M"],
        check=True,
    )
    return True


class Workdir:
    """The fuzzed daemon's working directory: its images, restored after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.have_qcow2 = _image(path)
        self._pristine = {p.name: p.read_bytes() for p in path.iterdir()}

    def restore(self) -> None:
        """Put the images back as made and remove every other file (commands such
        as blockdev-snapshot-sync create some), so examples stay independent."""
        for p in self.path.iterdir():
            if p.name not in self._pristine:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        for name, data in self._pristine.items():
            (self.path / name).write_bytes(data)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Workdir]:
    """A temp dir with the images, made the working directory for the module."""
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="qmpgraph-fuzz-") as tmp:
        os.chdir(tmp)
        try:
            yield Workdir(Path(tmp))
        finally:
            os.chdir(old)


class Fuzzed:
    """A daemon with a small graph and a negotiated, strict session."""

    def __init__(self, workdir: Workdir) -> None:
        self.workdir = workdir
        self.daemon = Daemon(name_seed=1)
        self.session = QMPSession(self.daemon.greeting())
        self.session.accept_capabilities([])
        self.dispatcher = Dispatcher(self.daemon, strict=True)
        self.ok("blockdev-add", {"driver": "null-co", "node-name": "null0"})
        self.ok("blockdev-add", {"driver": "null-co", "node-name": "null1", "size": 1 << 20})
        self.ok("blockdev-add", {"driver": "raw", "node-name": "raw0", "file": "null1"})
        if workdir.have_qcow2:
            file = {"driver": "file", "node-name": "file0", "filename": "image.qcow2"}
            self.ok("blockdev-add", file)
            self.ok("blockdev-add", {"driver": "qcow2", "node-name": "qcow0", "file": "file0"})

    def ok(self, command: str, args: dict[str, Any]) -> None:
        """Run a set-up command that must succeed."""
        reply = self.send(command, args)
        assert "return" in reply, reply

    def send(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Dispatch one request; check the reply's shape and the invariants."""
        before = graph_digest(self.daemon.graph)
        reply = self.dispatcher.dispatch(
            self.session, {"execute": command, "arguments": args, "id": 7}
        )
        assert isinstance(reply, dict), reply
        assert reply.get("id") == 7
        assert ("return" in reply) != ("error" in reply), reply
        assert check_invariants(self.daemon.graph) == []
        if "error" in reply:
            err = reply["error"]
            assert isinstance(err.get("class"), str) and isinstance(err.get("desc"), str)
            assert err["desc"], reply
            assert graph_digest(self.daemon.graph) == before, reply
        return reply

    def close(self) -> None:
        """Delete every monitor-owned node (closing image files and their locks),
        then restore the working directory."""
        progress = True
        while progress:
            progress = False
            for node in list(self.daemon.graph.named_nodes_newest_first()):
                reply = self.dispatcher.dispatch(
                    self.session,
                    {"execute": "blockdev-del", "arguments": {"node-name": node.node_name}},
                )
                progress = progress or (reply is not None and "return" in reply)
        self.workdir.restore()


FUZZ = settings(
    max_examples=int(os.environ.get("QMPGRAPH_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(st.lists(requests(COMMANDS), min_size=1, max_size=3))
def test_every_valid_request_gets_an_answer(
    workdir: Workdir, sequence: list[tuple[str, dict[str, Any]]]
) -> None:
    daemon = Fuzzed(workdir)
    try:
        for command, args in sequence:
            daemon.send(command, args)
    finally:
        daemon.close()


def _generic_error(daemon: Fuzzed, command: str, args: dict[str, Any]) -> str:
    """Send a request that must fail with a GenericError, graph unchanged."""
    if command not in qmpgraph.commands.REGISTRY:
        pytest.skip(f"{command} is not implemented yet")
    before = graph_digest(daemon.daemon.graph)
    reply = daemon.send(command, args)
    assert reply.get("error", {}).get("class") == "GenericError", reply
    assert graph_digest(daemon.daemon.graph) == before
    desc = reply["error"]["desc"]
    assert isinstance(desc, str)
    return desc


# Each of these makes qemu-storage-daemon 7.2 abort (checked live, exit
# status -6): negative null sizes reach QEMU's size parser with error_abort,
# and an empty reopen list trips an assertion.
@pytest.mark.parametrize("driver", ["null-co", "null-aio"])
@pytest.mark.parametrize("size", [-1, -512, -(2**63)])
def test_negative_null_size_is_a_generic_error(workdir: Workdir, driver: str, size: int) -> None:
    daemon = Fuzzed(workdir)
    try:
        args = {"driver": driver, "node-name": "neg", "size": size}
        desc = _generic_error(daemon, "blockdev-add", args)
        assert desc == "Parameter 'size' expects a non-negative number below 2^64"
    finally:
        daemon.close()


def test_empty_reopen_list_is_a_generic_error(workdir: Workdir) -> None:
    daemon = Fuzzed(workdir)
    try:
        _generic_error(daemon, "blockdev-reopen", {"options": []})
    finally:
        daemon.close()


def test_names_in_the_strategy_exist(workdir: Workdir) -> None:
    daemon = Fuzzed(workdir)
    try:
        names = {n.node_name for n in daemon.daemon.graph.named_nodes_newest_first()}
        expected = set(NODE_NAMES) if workdir.have_qcow2 else {"null0", "raw0"}
        assert expected <= names
    finally:
        daemon.close()


def test_internal_errors_become_generic_errors_unless_strict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Daemon) -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Daemon, "version_info", broken)
    daemon = Daemon(name_seed=1)
    session = QMPSession({"QMP": {"version": {}, "capabilities": ["oob"]}})
    session.accept_capabilities([])
    request = {"execute": "query-version", "id": "x"}
    reply = Dispatcher(daemon).dispatch(session, request)
    assert reply == {
        "error": {
            "class": "GenericError",
            "desc": "qmpgraph internal error in 'query-version': RuntimeError",
        },
        "id": "x",
    }
    with pytest.raises(RuntimeError, match="a bug"):
        Dispatcher(daemon, strict=True).dispatch(session, request)
