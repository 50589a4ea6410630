"""Image locking of the ``file`` driver: the lock bytes, the transaction hooks,
and interplay with real QEMU processes (qemu-io, qemu-img, qemu-storage-daemon).

Expected values for QEMU behaviour come from QEMU: each live case runs the same
probe once against qemu-storage-daemon and once against qmpgraph and compares.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu

import qmpgraph.commands  # noqa: F401 (registers the command handlers)
from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.filelock import (
    PERM_LOCK_BASE,
    SHARED_LOCK_BASE,
    ImageLock,
    ImageLockError,
    holders,
    lock_byte,
    ofd_supported,
)
from qmpgraph.drivers.open import open_node_tree
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.perms import PERM_ALL, Perm
from qmpgraph.protocol.session import QMPSession
from qmpgraph.transactions.engine import InjectedFault, Transaction

pytestmark = pytest.mark.skipif(not ofd_supported(), reason="no OFD locks on this host")

CR, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE
# What a read-write qcow2 takes on its file node, and what it shares (section 3.3).
QCOW2_RW = (CR | W | RS, CR | WU)


# -- helpers ------------------------------------------------------------------------


def _observer(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def held(path: Path) -> tuple[int, int]:
    """(perm, unshared) bits that anyone holds on ``path``, seen from a fresh descriptor."""
    fd = _observer(path)
    try:
        return holders(fd)
    finally:
        os.close(fd)


def open_fds() -> int:
    """Descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A plain file to lock."""
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    return path


@contextlib.contextmanager
def image_lock(path: Path) -> Iterator[ImageLock]:
    """An ImageLock on its own descriptor, closed afterwards."""
    lock = ImageLock(_observer(path), str(path), use_lock=True)
    try:
        yield lock
    finally:
        lock.close()


class Client:
    """qmpgraph's command path, in process: ``run`` returns ``None`` or the error desc."""

    def __init__(self) -> None:
        self.daemon = Daemon(name_seed=1)
        self.session = QMPSession(self.daemon.greeting())
        self.session.accept_capabilities([])
        self.dispatcher = Dispatcher(self.daemon)

    def run(self, command: str, arguments: dict[str, Any]) -> str | None:
        reply = self.dispatcher.dispatch(self.session, {"execute": command, "arguments": arguments})
        assert reply is not None
        return None if "return" in reply else str(reply["error"]["desc"])

    def close(self) -> None:
        """Delete every monitor-owned node (which closes every descriptor)."""
        for node in list(self.daemon.graph.named_nodes_newest_first()):
            if node.monitor_owned:
                assert self.run("blockdev-del", {"node-name": node.node_name}) is None


def qcow2_args(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(path)}
    file.update(extra.pop("file_opts", {}))
    return {"driver": "qcow2", "node-name": name, "file": file, **extra}


# -- the lock bytes ---------------------------------------------------------------


def test_commit_holds_perm_bytes_and_unshared_bytes(image: Path) -> None:
    """Perm bit i locks byte 100+i; an unshared bit i locks byte 200+i."""
    with image_lock(image) as lock:
        lock.prepare(*QCOW2_RW)
        lock.commit(*QCOW2_RW)
        assert held(image) == (CR | W | RS, W | RS)
        lock.prepare(CR, PERM_ALL)
        lock.commit(CR, PERM_ALL)
        assert held(image) == (CR, 0)
    assert held(image) == (0, 0)


def test_prepare_locks_old_and_new_until_commit(image: Path) -> None:
    """Between check and set, the union is locked so nothing slips in."""
    with image_lock(image) as lock:
        lock.prepare(CR, PERM_ALL & ~RS)
        lock.commit(CR, PERM_ALL & ~RS)
        lock.prepare(W, PERM_ALL)
        assert held(image) == (CR | W, RS)
        lock.abort()
        assert held(image) == (CR, RS)
        assert (lock.perm, lock.shared) == (CR, PERM_ALL & ~RS)


def test_loosening_prepare_leaves_the_file_alone(image: Path) -> None:
    """Fewer perms and more sharing cannot fail: the bytes wait for commit."""
    with image_lock(image) as lock:
        lock.prepare(*QCOW2_RW)
        lock.commit(*QCOW2_RW)
        lock.prepare(0, PERM_ALL)
        assert held(image) == (CR | W | RS, W | RS)
        lock.commit(0, PERM_ALL)
        assert held(image) == (0, 0)


@pytest.mark.parametrize(
    ("first", "second", "desc"),
    [
        (QCOW2_RW, QCOW2_RW, 'Failed to get "write" lock'),
        (QCOW2_RW, (CR, CR | WU), 'Failed to get shared "write" lock'),
        ((CR, CR | WU), QCOW2_RW, 'Failed to get "write" lock'),
        ((CR | RS, PERM_ALL), (CR, CR | W | WU), 'Failed to get shared "resize" lock'),
        ((0, PERM_ALL & ~CR), (CR, PERM_ALL), 'Failed to get "consistent read" lock'),
    ],
)
def test_conflict_messages_and_rollback(
    image: Path, first: tuple[int, int], second: tuple[int, int], desc: str
) -> None:
    """Wanted bits are tested first, then unshared ones; a failure restores the bytes."""
    with image_lock(image) as a, image_lock(image) as b:
        a.prepare(*first)
        a.commit(*first)
        before = held(image)
        with pytest.raises(ImageLockError) as info:
            b.prepare(*second)
        assert info.value.desc == desc
        assert info.value.hint == f"Is another process using the image [{image}]?"
        assert held(image) == before
        assert (b.locked_perm, b.locked_unshared) == (0, 0)


def test_force_shared_reader_does_not_block_a_writer(image: Path) -> None:
    """Sharing everything locks only the perm bytes."""
    with image_lock(image) as a, image_lock(image) as b:
        a.prepare(CR, PERM_ALL)
        a.commit(CR, PERM_ALL)
        b.prepare(*QCOW2_RW)
        b.commit(*QCOW2_RW)
        with pytest.raises(ImageLockError, match="shared"):
            a.prepare(CR, CR | WU)


def test_locking_off_and_closed_locks_do_nothing(image: Path) -> None:
    """use_lock=False never touches the file; close releases every byte."""
    off = ImageLock(_observer(image), str(image), use_lock=False)
    off.prepare(*QCOW2_RW)
    off.commit(*QCOW2_RW)
    assert held(image) == (0, 0)
    off.close()
    with image_lock(image) as lock:
        lock.prepare(*QCOW2_RW)
        lock.commit(*QCOW2_RW)
        lock.close()
        assert lock.closed
        assert held(image) == (0, 0)
        lock.prepare(W, 0)  # a closed lock is inert


def test_apply_failure_keeps_strerror(image: Path) -> None:
    """A lock byte that cannot be taken for another reason than a holder says why."""
    fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)  # F_RDLCK needs read access
    lock = ImageLock(fd, str(image), use_lock=True)
    try:
        with pytest.raises(GenericError) as info:
            lock.prepare(CR, PERM_ALL)
        assert info.value.desc == f"Failed to lock byte {PERM_LOCK_BASE}: Bad file descriptor"
        assert not isinstance(info.value, ImageLockError)
    finally:
        lock.close()


def test_lock_bytes_are_qemus() -> None:
    """The layout file-posix uses (libvirt owns byte 0)."""
    assert (PERM_LOCK_BASE, SHARED_LOCK_BASE) == (100, 200)


# -- the driver inside transactions ----------------------------------------------------


needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def make_qcow2(path: Path, *extra: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "1M"],
        check=True,
        timeout=30,
    )
    return path


@needs_qemu_img
def test_blockdev_add_and_del_take_and_release(tmp_path: Path) -> None:
    """A read-write qcow2 locks its image; blockdev-del unlocks and closes it."""
    img = make_qcow2(tmp_path / "a.qcow2")
    c = Client()
    fds = open_fds()
    assert c.run("blockdev-add", qcow2_args("q0", img)) is None
    assert held(img) == (CR | W | RS, W | RS)
    assert open_fds() == fds + 1
    assert c.run("blockdev-del", {"node-name": "q0"}) is None
    assert held(img) == (0, 0)
    assert open_fds() == fds


@needs_qemu_img
def test_detach_loosens_a_remaining_file_node(tmp_path: Path) -> None:
    """Deleting the qcow2 leaves its named file node with nothing locked."""
    img = make_qcow2(tmp_path / "a.qcow2")
    c = Client()
    f0 = {"driver": "file", "node-name": "f0", "filename": str(img)}
    assert c.run("blockdev-add", f0) is None
    assert c.run("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"}) is None
    assert held(img) == (CR | W | RS, W | RS)
    assert c.run("blockdev-del", {"node-name": "q0"}) is None
    assert held(img) == (0, 0)
    node = c.daemon.graph.lookup("f0")
    assert node is not None and isinstance(node.state, FileState)
    assert not node.state.lock.closed
    c.close()


@needs_qemu_img
def test_failed_add_releases_everything(tmp_path: Path) -> None:
    """Locks taken before the failure are dropped and the descriptors closed."""
    img = make_qcow2(tmp_path / "a.qcow2")
    c = Client()
    fds = open_fds()
    digest = graph_digest(c.daemon.graph)
    desc = c.run("blockdev-add", qcow2_args("q0", img, backing="nosuch"))
    assert desc == "Could not open backing file: Cannot find device='nosuch' nor node-name='nosuch'"
    assert held(img) == (0, 0)
    assert open_fds() == fds
    assert graph_digest(c.daemon.graph) == digest


@needs_qemu_img
def test_lock_conflict_between_file_nodes_of_one_daemon(tmp_path: Path) -> None:
    """Separate file nodes on one path meet in the lock bytes, not the perm system."""
    img = make_qcow2(tmp_path / "a.qcow2")
    c = Client()
    fds = open_fds()
    assert c.run("blockdev-add", qcow2_args("q0", img)) is None
    assert c.run("blockdev-add", qcow2_args("q1", img)) == 'Failed to get "write" lock'
    ro = qcow2_args("q1", img, **{"read-only": True})
    assert c.run("blockdev-add", ro) == 'Failed to get shared "write" lock'
    fs = qcow2_args("q1", img, **{"read-only": True, "force-share": True})
    assert c.run("blockdev-add", fs) is None
    off = qcow2_args("q2", img, file_opts={"locking": "off"})
    assert c.run("blockdev-add", off) is None
    assert open_fds() == fds + 3
    c.close()
    assert held(img) == (0, 0)
    assert open_fds() == fds


@needs_qemu_img
def test_every_abort_point_leaves_no_lock_and_no_descriptor(tmp_path: Path) -> None:
    """Fault injection after each action of a qcow2-with-backing open."""
    base = make_qcow2(tmp_path / "base.qcow2")
    top = make_qcow2(tmp_path / "top.qcow2", "-b", str(base), "-F", "qcow2")
    options = qcow2_args("top", top)
    with Transaction() as tran:
        total = BlockGraph()
        open_node_tree(total, options, tran)
        count = tran.added
    for node in list(total.named_nodes_newest_first()):
        if isinstance(node.state, FileState):
            node.state.lock.close()
    fds = open_fds()
    for n in range(count):
        graph = BlockGraph()
        with pytest.raises(InjectedFault), Transaction(fail_at=n) as tran:
            open_node_tree(graph, options, tran)
        assert (held(top), held(base)) == ((0, 0), (0, 0)), n
        assert open_fds() == fds, n


def test_inactive_nodes_take_no_locks(image: Path) -> None:
    """An inactive image (incoming migration) is not locked, as in QEMU."""
    from qmpgraph.graph.perms import OpenFlag

    c = Client()
    f = {"driver": "file", "node-name": "f", "filename": str(image)}
    assert c.run("blockdev-add", f) is None
    node = c.daemon.graph.lookup("f")
    assert node is not None and node.driver is not None
    node.open_flags |= OpenFlag.INACTIVE
    node.driver.check_perm(node, *QCOW2_RW)
    node.driver.set_perm(node, *QCOW2_RW)
    assert held(image) == (0, 0)
    node.open_flags &= ~OpenFlag.INACTIVE
    c.close()


def test_foreign_exclusive_lock_is_reported_with_its_byte(image: Path) -> None:
    """A byte another tool holds exclusively cannot be locked: 'Failed to lock byte'."""
    import fcntl

    from qmpgraph.drivers.filelock import F_OFD_SETLK, _flock

    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_WRLCK, PERM_LOCK_BASE + 1))
        c = Client()
        desc = c.run("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(image)})
        assert desc is None
        node = c.daemon.graph.lookup("f")
        assert node is not None and node.driver is not None
        with pytest.raises(GenericError) as info:
            node.driver.check_perm(node, W, PERM_ALL)
        assert info.value.desc == "Failed to lock byte 101"
        node.driver.abort_perm_update(node)
        assert lock_byte(fd, 0) == 0
        c.close()
    finally:
        os.close(fd)


# -- against real QEMU processes ------------------------------------------------------


def _qsd_keyval(path: Path, extra: str) -> str:
    return f"driver=qcow2,node-name=q,file.driver=file,file.filename={path}{extra}"


@contextlib.contextmanager
def qsd_holding(path: Path, extra: str) -> Iterator[None]:
    """qemu-storage-daemon with a qcow2 node on ``path``, ready once its pidfile exists."""
    qsd = require_qemu()
    pidfile = path.parent / "qsd.pid"
    proc = subprocess.Popen(
        [qsd, "--blockdev", _qsd_keyval(path, extra), "--pidfile", str(pidfile)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.01)
        yield
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        pidfile.unlink(missing_ok=True)


@contextlib.contextmanager
def qmpgraph_holding(path: Path, extra: dict[str, Any]) -> Iterator[None]:
    """qmpgraph (in this process) with the same qcow2 node on ``path``."""
    c = Client()
    assert c.run("blockdev-add", qcow2_args("q", path, **extra)) is None
    try:
        yield
    finally:
        c.close()


@contextlib.contextmanager
def qemu_io_holding(path: Path, *flags: str) -> Iterator[None]:
    """An interactive qemu-io with ``path`` open, ready once its lock bytes appear."""
    proc = subprocess.Popen(
        ["qemu-io", *flags, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not held(path)[0] & CR:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.01)
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def probe(argv: list[str], path: Path) -> tuple[int, str]:
    """Exit status and stderr (path replaced by IMG) of a qemu-img/qemu-io run."""
    proc = subprocess.run(
        [a.replace("IMG", str(path)) for a in argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode, proc.stderr.replace(str(path), "IMG")


HOLDS: dict[str, tuple[str, dict[str, Any]]] = {
    "rw": ("", {}),
    "ro": (",read-only=on", {"read-only": True}),
    "ro-force-share": (",read-only=on,force-share=on", {"read-only": True, "force-share": True}),
    "locking-off": (",file.locking=off", {"file_opts": {"locking": "off"}}),
}
PROBES = {
    "img-info": ["qemu-img", "info", "IMG"],
    "img-info-U": ["qemu-img", "info", "-U", "IMG"],
    "io-write": ["qemu-io", "-c", "write 0 512", "IMG"],
    "io-read": ["qemu-io", "-r", "-c", "read 0 512", "IMG"],
    "io-read-U": ["qemu-io", "-r", "-U", "-c", "read 0 512", "IMG"],
}


@pytest.mark.qemu
@pytest.mark.parametrize("hold", sorted(HOLDS))
@pytest.mark.parametrize("tool", sorted(PROBES))
def test_qemu_tools_see_qmpgraphs_locks_as_qsds(tmp_path: Path, hold: str, tool: str) -> None:
    """qemu-img/qemu-io against an image held by qsd, then by qmpgraph: same outcome."""
    img = make_qcow2(tmp_path / "a.qcow2")
    keyval, args = HOLDS[hold]
    with qsd_holding(img, keyval):
        expected = probe(PROBES[tool], img)
    with qmpgraph_holding(img, dict(args)):
        got = probe(PROBES[tool], img)
    assert got == expected
    assert held(img) == (0, 0)


QEMU_IO_HOLDS = {"rw": (), "ro": ("-r",), "ro-U": ("-r", "-U")}
ADDS: dict[str, dict[str, Any]] = {
    "qcow2-rw": {},
    "qcow2-ro": {"read-only": True},
    "qcow2-ro-force-share": {"read-only": True, "force-share": True},
    "qcow2-locking-off": {"file_opts": {"locking": "off"}},
    "qcow2-locking-on": {"file_opts": {"locking": "on"}},
}


@pytest.mark.qemu
@pytest.mark.parametrize("holder", sorted(QEMU_IO_HOLDS))
def test_blockdev_add_while_qemu_io_holds_the_image(tmp_path: Path, holder: str) -> None:
    """qemu-io holds the image: each blockdev-add answers as qsd's does."""
    from test_open_vs_qemu import run_qsd

    qsd = require_qemu()
    img = make_qcow2(tmp_path / "a.qcow2")
    adds = {k: qcow2_args("q", img, **dict(v)) for k, v in ADDS.items()}
    with qemu_io_holding(img, *QEMU_IO_HOLDS[holder]):
        for name, args in adds.items():
            c = Client()
            got = c.run("blockdev-add", args) or "ok"
            c.close()
            expected = run_qsd(qsd, [args])[0][0]
            assert (name, got) == (name, expected)
    assert held(img) == (0, 0)


@pytest.mark.qemu
def test_implicit_backing_held_read_write_by_qemu_io(tmp_path: Path) -> None:
    """The header's backing file open read-write elsewhere: qsd's error, nothing left locked."""
    from test_open_vs_qemu import run_qsd

    qsd = require_qemu()
    base = make_qcow2(tmp_path / "base.qcow2")
    top = make_qcow2(tmp_path / "top.qcow2", "-b", str(base), "-F", "qcow2")
    args = qcow2_args("top", top)
    with qemu_io_holding(base):
        expected = run_qsd(qsd, [args])[0][0]
        c = Client()
        got = c.run("blockdev-add", args)
        assert got == expected
        assert got == 'Could not open backing file: Failed to get shared "write" lock'
        assert held(top) == (0, 0)
    assert held(base) == (0, 0)


@pytest.mark.qemu
def test_qemu_io_writes_after_delete_and_after_failed_add(tmp_path: Path) -> None:
    """Nothing stays locked after blockdev-del or an aborted blockdev-add."""
    require_qemu()
    img = make_qcow2(tmp_path / "a.qcow2")
    write = ["qemu-io", "-c", "write 0 512", "IMG"]
    c = Client()
    assert c.run("blockdev-add", qcow2_args("q", img)) is None
    assert probe(write, img)[0] == 1
    assert c.run("blockdev-del", {"node-name": "q"}) is None
    assert probe(write, img) == (0, "")
    assert c.run("blockdev-add", qcow2_args("q", img, backing="nosuch")) is not None
    assert probe(write, img) == (0, "")
    with qemu_io_holding(img, "-r"):
        assert c.run("blockdev-add", qcow2_args("q", img)) == 'Failed to get "write" lock'
    assert probe(write, img) == (0, "")
