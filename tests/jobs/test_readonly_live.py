"""Jobs into read-only backing images, against qemu-storage-daemon: the files they leave.

The chain base <- mid <- top is opened with its backing images read-only,
inline (``read-only`` on the format node, inherited by its file) or as
libvirt does (protocol nodes on their own with ``auto-read-only``, format
nodes read-only referencing them).  The same job runs on qsd and on
qmpgraph, each in its own directory of identical images; then the events,
every node's ``ro`` flag, and each image (``qemu-img compare``, the header's
backing file, ``qemu-img check``) must be the same.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import qmpgraph.commands  # noqa: F401 (registers the command handlers)
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.filelock import holders

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from cmdkit import Client  # tests/commands helper, put on sys.path above
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above
from test_jobs_live import STREAM_SETUP, both, compare_images, wait_concluded

pytestmark = pytest.mark.qemu


def add_chain(d: LiveDaemon, work: Path, style: str) -> None:
    """base <- mid <- top with base and mid read-only, in the given ``style``."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        read_only = name != "top"
        filename = str(work / f"{name}.qcow2")
        if style == "inline":
            d.ok(
                "blockdev-add", driver="qcow2", node_name=name, read_only=read_only,
                backing=backing, file={"driver": "file", "filename": filename},
            )  # fmt: skip
        else:
            d.ok(
                "blockdev-add", driver="file", node_name=f"{name}-file", filename=filename,
                auto_read_only=True, discard="unmap",
            )  # fmt: skip
            d.ok(
                "blockdev-add", driver="qcow2", node_name=name, read_only=read_only,
                file=f"{name}-file", backing=backing,
            )  # fmt: skip


def ro_flags(d: LiveDaemon) -> dict[str, bool]:
    """Every named node's ``ro`` flag (implicit nodes left out)."""
    nodes = d.ok("query-named-block-nodes", flat=True)
    return {n["node-name"]: n["ro"] for n in nodes if not n["node-name"].startswith("#")}


def wait_ready(d: LiveDaemon, job_id: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while {j["id"]: j["status"] for j in d.ok("query-jobs")}.get(job_id) != "ready":
        assert time.monotonic() < deadline, f"{d.kind}: {job_id} not ready"
        time.sleep(0.02)


def run_job(d: LiveDaemon, job: str) -> None:
    if job == "commit-intermediate":
        d.ok("block-commit", job_id="j", device="top", top_node="mid")
    elif job == "commit-active":
        d.ok("block-commit", job_id="j", device="top")
        wait_ready(d, "j")
        d.ok("job-complete", id="j")
    elif job == "stream-intermediate":
        d.ok("block-stream", job_id="j", device="mid")
    else:
        d.ok("block-stream", job_id="j", device="top", base_node="base")
    assert wait_concluded(d, "j") == {}


JOBS = ["commit-intermediate", "commit-active", "stream-intermediate", "stream-top"]


@pytest.mark.parametrize("style", ["inline", "libvirt"])
@pytest.mark.parametrize("job", JOBS)
def test_job_into_read_only_image_matches_qsd(
    tmp_path: Path, qsd_path: str, job: str, style: str
) -> None:
    daemons = both(tmp_path, qsd_path, STREAM_SETUP)
    flags: list[dict[str, bool]] = []
    events: list[list[Any]] = []
    try:
        for d, work in daemons:
            add_chain(d, work, style)
            run_job(d, job)
            flags.append(ro_flags(d))
            events.append([e["event"] for e in d.events])
    finally:
        for d, _ in daemons:
            d.stop()
    assert flags[0] == flags[1]
    assert events[0] == events[1]
    compare_images(daemons, ["base", "mid", "top"])


def _held(path: Path) -> tuple[int, int]:
    """(perm, unshared) bits the daemon holds on ``path``, seen from a probe descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return holders(fd)
    finally:
        os.close(fd)


def test_blockdev_reopen_read_write_really_writes(tmp_path: Path, qsd_path: str) -> None:
    """A raw node opened read-only, reopened read-write (its file inherits): the
    lock bytes in each state, a failing reopen that changes nothing, and a write
    through a writable NBD export landing in the file, as in qsd."""
    setup = "qemu-img create -q -f raw a.raw 1M && qemu-img create -q -f raw b.raw 1M"
    daemons = both(tmp_path, qsd_path, setup)
    seen: list[list[Any]] = []
    try:
        for d, work in daemons:
            img = work / "a.raw"
            out: list[Any] = []
            d.ok(
                "blockdev-add", driver="raw", node_name="r", read_only=True,
                file={"driver": "file", "node-name": "rf", "filename": str(img)},
            )  # fmt: skip
            out.append((_held(img), ro_flags(d)))
            bad = d.qmp("blockdev-reopen", options=[
                {"driver": "raw", "node-name": "r", "read-only": False, "file": "rf"},
                {"driver": "file", "node-name": "rf", "filename": str(work / "b.raw")},
            ])  # fmt: skip
            out.append((bad, _held(img), ro_flags(d)))
            d.ok(
                "blockdev-reopen",
                options=[{"driver": "raw", "node-name": "r", "read-only": False, "file": "rf"}],
            )
            out.append((_held(img), ro_flags(d)))
            d.start_nbd()
            d.ok("block-export-add", type="nbd", id="e", node_name="r", writable=True)
            out.append(_held(img))
            run("qemu-io", "-f", "raw", "-c", "write -P 7 4k 8k", d.uri("r"))
            d.ok("block-export-del", id="e")
            deadline = time.monotonic() + TIMEOUT
            while d.ok("query-block-exports"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            d.ok(
                "blockdev-reopen",
                options=[{"driver": "raw", "node-name": "r", "read-only": True, "file": "rf"}],
            )
            out.append((_held(img), ro_flags(d)))
            seen.append(out)
    finally:
        for d, _ in daemons:
            d.stop()
    assert seen[0] == seen[1]
    images = [(work / "a.raw").read_bytes() for _, work in daemons]
    assert images[0] == images[1]
    assert images[1][4096:12288] == b"\x07" * 8192


def test_locks_while_committing_into_read_only_base(tmp_path: Path, qsd_path: str) -> None:
    """The lock bytes on the base and its overlay while a commit into the
    read-only base runs, after its cancel and after a completed commit."""
    daemons = both(tmp_path, qsd_path, STREAM_SETUP)
    seen: list[list[Any]] = []
    try:
        for d, work in daemons:
            add_chain(d, work, "inline")
            images = [work / "base.qcow2", work / "mid.qcow2"]
            out: list[Any] = [[_held(i) for i in images]]
            d.ok("block-commit", job_id="j", device="top", top_node="mid", speed=1)
            out.append([_held(i) for i in images])
            d.ok("job-cancel", id="j")
            assert wait_concluded(d, "j") == {}
            out.append([_held(i) for i in images])
            run_job(d, "commit-intermediate")
            out.append([_held(i) for i in images])
            seen.append(out)
    finally:
        for d, _ in daemons:
            d.stop()
    assert seen[0] == seen[1]


def test_failed_stream_start_keeps_the_read_only_descriptor(tmp_path: Path) -> None:
    """A block-stream that fails after reopening its read-only top: the file
    node keeps (or gets back) a read-only descriptor holding the same lock bytes,
    and no descriptor is left open."""
    subprocess.run(STREAM_SETUP, shell=True, cwd=tmp_path, check=True, timeout=TIMEOUT)
    c = Client()
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        c.ok("blockdev-add", {
            "driver": "qcow2", "node-name": name, "read-only": name != "top",
            "backing": backing, "file": {"driver": "file", "node-name": f"{name}-file",
                                         "filename": str(tmp_path / f"{name}.qcow2")},
        })  # fmt: skip
    node = c.daemon.graph.lookup("mid-file")
    assert node is not None and isinstance(node.state, FileState)
    state = node.state
    held = _held(tmp_path / "mid.qcow2")
    fds = len(os.listdir("/proc/self/fd"))
    reply = c.run("block-stream", {"job-id": "s", "device": "mid", "filter-node-name": "top"})
    assert reply["error"]["desc"] == "Could not create node: Duplicate nodes with node-name='top'"
    assert node.state is state and not state.lock.closed and not state.writable
    assert fcntl.fcntl(state.lock.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert _held(tmp_path / "mid.qcow2") == held
    assert len(os.listdir("/proc/self/fd")) == fds
    # A successful reopen switches the descriptor for good.
    c.ok("blockdev-reopen", {"options": [{
        "driver": "qcow2", "node-name": "mid", "read-only": False, "backing": "base",
        "file": "mid-file"}]})  # fmt: skip
    assert isinstance(node.state, FileState) and node.state.writable
    assert state.lock.closed
    assert fcntl.fcntl(node.state.lock.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert len(os.listdir("/proc/self/fd")) == fds
