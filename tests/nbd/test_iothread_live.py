"""x-blockdev-set-iothread and export iothreads: qmpgraph against qemu-storage-daemon.

Seeded random sequences of context moves (any node, any iothread or the
main loop, with or without ``force``) and of NBD exports added with
``iothread``/``fixed-iothread`` or deleted go to both daemons; every reply
must be equal, and so must ``query-block-exports`` at the end.  The
sequences keep to what QEMU 7.2 survives: no ``blockdev-add`` over nodes in
an iothread, no ``object-del`` of an iothread in use, no jobs.  Every
process has a timeout (``livekit.TIMEOUT``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_qemu
from livekit import LiveDaemon, run

pytestmark = pytest.mark.qemu

KINDS = ("qsd", "qmpgraph")
NODES = ["af", "top", "bf", "raw", "nul", "nosuch"]
THREADS: list[str | None] = ["io0", "io1", None, "nosuch"]


def _daemon(kind: str, qsd: str, work: Path) -> LiveDaemon:
    work.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "1M")
    run("qemu-img", "create", "-q", "-f", "raw", str(work / "b.raw"), "1M")
    daemon = LiveDaemon(
        kind,
        qsd,
        work,
        [
            f"driver=file,filename={work}/a.qcow2,node-name=af",
            "driver=qcow2,file=af,node-name=top",
            f"driver=file,filename={work}/b.raw,node-name=bf",
            "driver=raw,file=bf,node-name=raw",
            "driver=null-co,node-name=nul",
        ],
    )
    for name in ("io0", "io1"):
        daemon.ok("object-add", qom_type="iothread", id=name)
    daemon.start_nbd()
    return daemon


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, LiveDaemon]]:
    """Both daemons with the same nodes, two iothreads and an NBD server."""
    qsd = require_qemu()
    started: dict[str, LiveDaemon] = {}
    try:
        for kind in KINDS:
            started[kind] = _daemon(kind, qsd, tmp_path / kind)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def _step(rng: random.Random, exports: list[str], serial: list[int]) -> tuple[str, dict[str, Any]]:
    roll = rng.random()
    if roll < 0.55:
        args: dict[str, Any] = {"node-name": rng.choice(NODES), "iothread": rng.choice(THREADS)}
        if rng.random() < 0.5:
            args["force"] = rng.random() < 0.7
        return "x-blockdev-set-iothread", args
    if roll < 0.85 or not exports:
        serial[0] += 1
        export_id = f"e{serial[0]}"
        args = {"type": "nbd", "id": export_id, "node-name": rng.choice(NODES[:5])}
        args["name"] = export_id
        thread = rng.choice(THREADS)
        if thread is not None:
            args["iothread"] = thread
        if rng.random() < 0.5:
            args["fixed-iothread"] = rng.random() < 0.6
        return "block-export-add", args
    return "block-export-del", {"id": rng.choice(exports)}


def _reply(daemon: LiveDaemon, command: str, args: dict[str, Any]) -> Any:
    reply = daemon.qmp(command, **{k.replace("-", "_"): v for k, v in args.items()})
    return reply.get("error", reply.get("return"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_moves_and_exports(daemons: dict[str, LiveDaemon], seed: int) -> None:
    """Every reply of both daemons is equal along one seeded sequence."""
    rng = random.Random(seed)
    exports: list[str] = []
    serial = [0]
    for _ in range(60):
        command, args = _step(rng, exports, serial)
        ref, got = (_reply(daemons[k], command, args) for k in KINDS)
        assert got == ref, (command, args)
        if command == "block-export-add" and ref == {}:
            exports.append(args["id"])
        elif command == "block-export-del" and ref == {}:
            exports.remove(args["id"])
    ref, got = (daemons[k].ok("query-block-exports") for k in KINDS)
    assert got == ref
