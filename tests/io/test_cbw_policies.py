"""copy-before-write's error policies, live against qemu-storage-daemon.

A copy-before-write node over a 1 MiB raw file (pattern 0x11) is exported
writable (the guest's view) and a snapshot-access node over it read-only
(the fleecing export).  The copy to the target is made to fail: a blkdebug
target injecting EIO on writes, or a throttled target slower than
``cbw-timeout``.  The same qemu-io and nbdinfo session runs against both
daemons and must print the same thing: whether the guest write fails
(``on-cbw-error=break-guest-write``: EIO, or EINVAL over NBD for a timeout)
or goes through and breaks the snapshot (``break-snapshot``: every later
snapshot read and block status fails, EACCES seen as EINVAL over NBD), and
what the guest and snapshot readers read.

A read-only target is refused at blockdev-add with QEMU's error.  Not
covered: a target smaller than the source (qemu-storage-daemon 7.2 aborts
on an assertion when the copy writes past the target's end).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from livekit import LiveDaemon  # tests/nbd helpers, put on sys.path above
from test_clients import start_pair, tool

pytestmark = pytest.mark.qemu

SETUP = (
    "truncate -s 1M src.raw; qemu-io -f raw -c 'write -P 0x11 0 1M' src.raw; truncate -s 1M tgt.raw"
)


def _blkdebug_target(once: bool) -> dict[str, Any]:
    """A target failing writes with EIO once its first write started."""
    rule: dict[str, Any] = {"event": "pwritev", "iotype": "write", "errno": 5}
    if once:
        rule["once"] = True
    return {
        "driver": "blkdebug",
        "node-name": "tgt",
        "image": {"driver": "file", "filename": "tgt.raw"},
        "inject-error": [rule],
    }


def _throttled_target(daemon: LiveDaemon) -> dict[str, Any]:
    """A target whose second 64 KiB write waits about 2 s (32 KiB/s)."""
    daemon.ok("object-add", qom_type="throttle-group", id="tg", limits={"bps-write": 32768})
    return {
        "driver": "throttle",
        "node-name": "tgt",
        "throttle-group": "tg",
        "file": {"driver": "file", "filename": "tgt.raw"},
    }


def _setup(daemon: LiveDaemon, target: dict[str, Any], **cbw: Any) -> None:
    daemon.ok("blockdev-add", driver="file", node_name="src", filename="src.raw")
    daemon.ok(
        "blockdev-add",
        driver="copy-before-write",
        node_name="cbw",
        file="src",
        target=target,
        **cbw,
    )
    daemon.ok("blockdev-add", driver="snapshot-access", node_name="sa", file="cbw")
    daemon.start_nbd()
    daemon.ok("block-export-add", type="nbd", id="g", node_name="cbw", name="guest", writable=True)
    daemon.ok("block-export-add", type="nbd", id="s", node_name="sa", name="snap")


def _io(daemon: LiveDaemon, export: str, *cmds: str) -> list[Any]:
    """qemu-io on an export: exit status and output, timing lines left out."""
    args = ["qemu-io", *(["-r"] if export == "snap" else []), "-f", "raw"]
    for cmd in cmds:
        args += ["-c", cmd]
    rc, out = tool(daemon, *args, daemon.uri(export))
    return [export, list(cmds), rc, [ln for ln in out.splitlines() if " sec (" not in ln]]


def _session(daemon: LiveDaemon, guest_writes: list[str]) -> list[Any]:
    """Snapshot reads, the guest writes that trigger copies, then both views again."""
    steps = [_io(daemon, "snap", "read -q -P 0x11 0 64k")]
    steps.append(_io(daemon, "guest", *guest_writes))
    steps.append(_io(daemon, "guest", "read -v 0 16", "read -v 256k 16", "read -v 512k 16"))
    steps.append(_io(daemon, "snap", "read -v 0 16", "read -v 256k 16", "read -v 512k 16"))
    steps.append(["map", *tool(daemon, "nbdinfo", "--map", daemon.uri("snap"))])
    steps.append(_io(daemon, "guest", "write -q -P 0x44 512k 4k"))
    steps.append(_io(daemon, "snap", "read -v 512k 16"))
    steps.append(["events", [e["event"] for e in daemon.events]])
    return steps


def _both(tmp_path: Path, make_target: Any, guest_writes: list[str], **cbw: Any) -> list[Any]:
    """Run the session on qsd and qmpgraph; qsd's transcript once they agree."""
    qsd, ours = start_pair(tmp_path, SETUP, [])
    try:
        transcripts = []
        for daemon in (qsd, ours):
            _setup(daemon, make_target(daemon), **cbw)
            transcripts.append(_session(daemon, guest_writes))
    finally:
        qsd.stop()
        ours.stop()
    assert transcripts[1] == transcripts[0]
    return transcripts[0]


WRITES = ["write -q -P 0x22 0 64k", "write -q -P 0x33 256k 4k"]


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
@pytest.mark.parametrize("once", [False, True])
def test_target_write_error(tmp_path: Path, policy: str, once: bool) -> None:
    got = _both(tmp_path, lambda d: _blkdebug_target(once), WRITES, on_cbw_error=policy)
    guest_write, snap_after = got[1], got[3]
    # QEMU's answers, as recorded by this very run against qsd:
    if policy == "break-guest-write":
        assert guest_write[2] == 1 and "Input/output error" in guest_write[3][0]
        assert snap_after[2] == 0
    else:
        assert guest_write[2] == 0
        assert snap_after[2] == 1 and "Invalid argument" in snap_after[3][0]


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout_on_throttled_target(tmp_path: Path, policy: str) -> None:
    # The first copy fills the throttle bucket; the second waits about 2 s,
    # longer than cbw-timeout (1 s), and both writes go in one qemu-io run.
    got = _both(tmp_path, _throttled_target, WRITES, on_cbw_error=policy, cbw_timeout=1)
    guest_write = got[1]
    if policy == "break-guest-write":
        assert guest_write[2] == 1 and guest_write[3] == ["write failed: Invalid argument"]
    else:
        assert guest_write[2] == 0


def test_read_only_target_refused_as_qsd(tmp_path: Path) -> None:
    qsd, ours = start_pair(tmp_path, SETUP, [])
    replies = []
    try:
        for daemon in (qsd, ours):
            daemon.ok("blockdev-add", driver="file", node_name="src", filename="src.raw")
            target = {"driver": "file", "filename": "tgt.raw", "node-name": "ro", "read-only": True}
            replies.append(
                daemon.qmp(
                    "blockdev-add",
                    driver="copy-before-write",
                    node_name="c",
                    file="src",
                    target=target,
                )
            )
    finally:
        qsd.stop()
        ours.stop()
    assert replies[1] == replies[0]
    assert replies[0]["error"]["desc"] == "Block node is read-only"
