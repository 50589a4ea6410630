"""qcow2 over other protocol stacks, qsd and qmpgraph side by side over NBD.

The qcow2 node's ``file`` child is not a ``file`` node: a raw window at an
offset into a bigger file, a throttle filter, a blkdebug node (without
rules, with once rules on the ``read_aio``/``write_aio`` events qcow2 fires
for guest data, and with a rule on the host sector of one data cluster).
The same image is made for each daemon by ``qemu-img``/``qemu-io``, the same
``qemu-io`` requests go to each daemon's writable export one by one, and
each answer (success, or the error qemu-io prints), the ``nbdinfo --map``
of the export, then ``qemu-img check`` and ``qemu-img compare`` of the
images written must be alike.  Expected values are qsd's, never
qmpgraph's.  Every process and tool has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

MiB = 1 << 20
# The raw window's start in its file (the qcow2 image lies behind junk).
OFFSET = MiB

REQUESTS = [
    "read -P 0x11 0 64k",
    "read -P 0x11 512k 4k",
    "write -P 0x22 64k 4k",  # in place, in a data cluster
    "write -P 0x33 2M 100k",  # allocating, partial clusters
    "read -P 0x22 64k 4k",
    "read -P 0x11 512k 4k",
    "write -z 1536k 64k",
    "discard 128k 64k",
    "write -P 0x44 3M 64k",
    "read -P 0x33 2M 100k",
    "read -P 0 1536k 64k",
    "read -P 0x44 3M 64k",
    "flush",
]


def _make(work: Path, kind: str) -> Path:
    """The image the node reads: ``a.qcow2`` (or ``a.img`` with it at OFFSET)."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(image))
    if kind.startswith("raw-"):
        (work / "a.img").write_bytes(b"\xa5" * OFFSET + image.read_bytes() + b"\x5a" * MiB)
        image.unlink()
        return work / "a.img"
    return image


def _host_sector(image: Path, guest: int) -> int:
    """The 512-byte host sector holding guest offset ``guest`` (qemu-img map)."""
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(image)))
    for ext in out:
        if ext["start"] <= guest < ext["start"] + ext["length"] and ext.get("offset") is not None:
            return int(ext["offset"] + guest - ext["start"]) // 512
    raise AssertionError(f"guest offset {guest} is not allocated: {out}")


def _file(kind: str, image: Path) -> dict[str, Any]:
    """The qcow2 node's ``file`` child for stack ``kind``."""
    base = {"driver": "file", "filename": image.name}
    if kind == "raw-offset":
        return {"driver": "raw", "offset": OFFSET, "file": base}
    if kind == "raw-window":
        # The window ends where the image does: allocations fail with ENOSPC.
        size = image.stat().st_size - OFFSET - MiB
        return {"driver": "raw", "offset": OFFSET, "size": size, "file": base}
    if kind == "throttle":
        return {"driver": "throttle", "throttle-group": "tg", "file": base}
    rules: list[dict[str, Any]] = []
    if kind == "blkdebug-once":
        rules = [
            {"event": "read_aio", "errno": 5, "once": True},
            {"event": "write_aio", "errno": 28, "once": True},
        ]
    elif kind == "blkdebug-writes":
        # Every write after the first guest data write fails (metadata too).
        rules = [{"event": "write_aio", "errno": 5}]
    elif kind == "blkdebug-alloc":
        # ENOSPC once on the first cluster allocated past the image's end.
        sector = image.stat().st_size // 512
        rules = [{"event": "write_aio", "errno": 28, "once": True, "sector": sector}]
    elif kind == "blkdebug-sector":
        sector = _host_sector(image, 512 * 1024)
        rules = [{"event": "read_aio", "errno": 5, "sector": sector}]
    blkdebug: dict[str, Any] = {"driver": "blkdebug", "image": base}
    if rules:  # an empty list is refused ("doesn't support the option")
        blkdebug["inject-error"] = rules
    return blkdebug


def _qemu_io(uri: str, cmd: str) -> tuple[int, str]:
    """One request: qemu-io's exit code and its answer (timings left out)."""
    res = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", cmd, uri],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    lines = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if "ops/sec" not in line and "CPU usage" not in line
    ]
    return res.returncode, "\n".join(lines)


def _session(kind: str, daemon_kind: str, qsd: str, work: Path) -> dict[str, Any]:
    """Run REQUESTS on one daemon's export; what the client saw and the map."""
    image = _make(work, kind)
    daemon = LiveDaemon(daemon_kind, qsd, work, [])
    try:
        daemon.start_nbd()
        if kind == "throttle":
            daemon.ok(
                "object-add", qom_type="throttle-group", id="tg", limits={"iops-total": 10000}
            )
        daemon.ok(
            "blockdev-add",
            driver="qcow2",
            node_name="q0",
            discard="unmap",
            file=_file(kind, image),
        )
        daemon.ok("block-export-add", type="nbd", id="e0", node_name="q0", name="rw", writable=True)
        requests = REQUESTS
        if kind == "blkdebug-writes":
            # qsd's discard only changes its cached L2 table (written back at
            # a flush, which fails): it succeeds and the map shows the hole;
            # qmpgraph's metadata is write-through, so its discard fails.
            requests = [cmd for cmd in REQUESTS if not cmd.startswith("discard")]
        answers = [(cmd, *_qemu_io(daemon.uri("rw"), cmd)) for cmd in requests]
        mapping = run("nbdinfo", "--map", daemon.uri("rw"))
    finally:
        daemon.stop()
    if kind.startswith("raw-"):
        # qemu-img checks and compares the qcow2 image behind the junk (a
        # growing image writes over the junk after it).
        qcow2 = work / "a.qcow2"
        whole = image.read_bytes()
        qcow2.write_bytes(whole[OFFSET:])
        image = qcow2
        if kind == "raw-window":  # nothing written past the window
            assert whole.endswith(b"\x5a" * MiB)
    return {"answers": answers, "map": mapping, "image": image}


def _check(image: Path) -> tuple[int, str]:
    res = subprocess.run(
        ["qemu-img", "check", "--output=json", "-f", "qcow2", str(image)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    report = json.loads(res.stdout)
    keys = ("check-errors", "corruptions", "leaks", "image-end-offset", "allocated-clusters")
    return res.returncode, json.dumps({k: report.get(k) for k in keys})


@pytest.mark.parametrize(
    "kind",
    [
        "raw-offset",
        "raw-window",
        "throttle",
        "blkdebug",
        "blkdebug-once",
        "blkdebug-writes",
        "blkdebug-alloc",
        "blkdebug-sector",
    ],
)
def test_qcow2_stack_like_qsd(kind: str, tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _session(kind, "qsd", qsd, tmp_path / "q")
    got = _session(kind, "qmpgraph", qsd, tmp_path / "g")
    assert got["answers"] == want["answers"]
    assert got["map"] == want["map"]
    if kind == "blkdebug-once":
        # The rules did fail a read (EIO) and a write (ENOSPC) on qsd.
        errors = [a for _, rc, a in want["answers"] if rc]
        assert any("Input/output error" in a for a in errors), want["answers"]
        assert any("No space left on device" in a for a in errors), want["answers"]
    if kind == "blkdebug-sector":
        assert any(rc for _, rc, _ in want["answers"]), want["answers"]
    check_want, check_got = _check(want["image"]), _check(got["image"])
    assert check_got == check_want
    assert check_want[0] == 0, check_want
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(got["image"]), str(want["image"]))
