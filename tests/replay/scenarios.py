"""Realistic graph reconfigurations, and the recorder of their transaction logs.

Each scenario is a list of (command, arguments) sent through the dispatcher
of a daemon with a transaction log, run in a directory holding the images of
``images.py`` (paths in arguments are relative to it).  The recorded logs live
in ``logs/<scenario>.jsonl``; regenerate them after an intended change of the
engine or of the digest with::

    /tmp/v/bin/python tests/replay/scenarios.py

Not covered yet: swapping a backing node with ``blockdev-reopen`` (the command
is not implemented; add a scenario when it is).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import qmpgraph.commands  # noqa: F401 (registers the command handlers)
from qmpgraph.commands.dispatcher import Dispatcher
from qmpgraph.daemon import Daemon
from qmpgraph.protocol.session import QMPSession

sys.path.insert(0, str(Path(__file__).parent))
from images import make_images

LOGS = Path(__file__).parent / "logs"
NAME_SEED = 7202


def _file(name: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": name, **extra}


def _qcow2(node: str, image: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", {"driver": "qcow2", "node-name": node, "file": _file(image), **extra})


def _del(node: str) -> tuple[str, dict[str, Any]]:
    return ("blockdev-del", {"node-name": node})


SCENARIOS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # Build a chain bottom-up by reference, open one implicitly from headers,
    # try to delete in the wrong order, then tear down top-down.
    "backing-chain": [
        _qcow2("base", "base.qcow2", **{"read-only": True}),
        _qcow2("mid", "mid.qcow2", backing="base", **{"read-only": True}),
        _qcow2("top", "top.qcow2", backing="mid"),
        _del("base"),
        _del("mid"),
        # top.qcow2 is open read-write by "top": a second opener needs locking=off,
        # or its file node would fail with QEMU's 'Failed to get "write" lock'.
        _qcow2("implicit", "top.qcow2", file=_file("top.qcow2", locking="off")),
        _qcow2("nob", "top.qcow2", backing=None, file=_file("top.qcow2", locking="off")),
        _del("top"),
        _del("mid"),
        _del("base"),
        _del("implicit"),
        _del("nob"),
    ],
    # Insert filters over a node (by reference), fail to delete what they use,
    # remove them again; a fleecing set-up and tear-down with cbw.
    "filters": [
        ("blockdev-add", {"driver": "raw", "node-name": "disk", "file": _file("disk.raw")}),
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "disk"}),
        _del("disk"),
        ("blockdev-add", {"driver": "preallocate", "node-name": "pre", "file": "cor"}),
        _del("cor"),
        _del("pre"),
        _del("cor"),
        ("blockdev-add", {"driver": "raw", "node-name": "tmp", "file": _file("scratch.raw")}),
        (
            "blockdev-add",
            {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"},
        ),
        ("blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}),
        _del("tmp"),
        _del("acc"),
        _del("cbw"),
        _del("tmp"),
        _del("disk"),
    ],
    # Commands failing at every stage of an open, between successful ones;
    # each aborted transaction leaves the digest as it was.
    "failures": [
        ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
        ("blockdev-add", {"driver": "null-co"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "9bad"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "missing"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": _file("no-such-file")}),
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "q", "file": _file("disk.raw", **{"node-name": "qf"})},
        ),
        (
            "blockdev-add",
            {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "n0"}},
        ),
        (
            "blockdev-add",
            {"driver": "raw", "node-name": "r", "file": "n0", "offset": 1, "size": 512},
        ),
        _qcow2("q", "other.qcow2", backing="missing"),
        _qcow2("q", "other.qcow2", backing="n0"),
        ("blockdev-add", {"driver": "null-co", "node-name": "n1", "force-share": True}),
        _del("nosuch"),
        _del("n0"),
        _del("q"),
        _del("n0"),
        _del("r"),
        _del("n0"),
        _del("n0"),
    ],
}


def record(name: str, workdir: Path, log: Path) -> None:
    """Run scenario ``name`` in ``workdir`` (images made there), logging to ``log``."""
    make_images(workdir)
    if log.exists():
        log.unlink()
    old = os.getcwd()
    os.chdir(workdir)
    try:
        daemon = Daemon(name_seed=NAME_SEED, transaction_log=log)
        session = QMPSession(daemon.greeting())
        session.accept_capabilities([])
        dispatcher = Dispatcher(daemon)
        for cmd, args in SCENARIOS[name]:
            dispatcher.dispatch(session, {"execute": cmd, "arguments": args})
        daemon.stop()
    finally:
        os.chdir(old)


def main() -> None:
    """Re-record every scenario's log into ``logs/``."""
    LOGS.mkdir(exist_ok=True)
    for name in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            record(name, Path(tmp), LOGS / f"{name}.jsonl")
        print(f"recorded {LOGS / name}.jsonl")


if __name__ == "__main__":
    main()
