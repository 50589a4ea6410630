"""x-blockdev-amend of LUKS key slots (driver luks), against qemu-storage-daemon.

The same sequence of amend jobs runs on a fresh LUKS image in qsd and in
qmpgraph; every job's final status and error must agree, and afterwards
``qemu-img info`` must show the same active key slots and QEMU's tools must
open the image with exactly the same secrets (the one stored by qmpgraph's
new slots included, the erased ones no longer).  Salts, iterations and key
material are random or timed in QEMU too, so they are not compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from conftest import require_qemu  # tests/ and tests/nbd put on sys.path above
from livekit import TIMEOUT, LiveDaemon, run

pytestmark = pytest.mark.qemu

SECRETS = {"s0": "zero", "s1": "one", "s2": "two", "sx": "nothing"}
QUICK = {"iter-time": 10}

# (options beyond driver, force): one amend job each, in order.
SEQUENCE: list[tuple[dict[str, Any], bool]] = [
    ({"state": "active", "new-secret": "s1", **QUICK}, False),
    ({"state": "active", "new-secret": "s2", "keyslot": 1, **QUICK}, False),
    ({"state": "active", "new-secret": "s2", "keyslot": 9, **QUICK}, False),
    ({"state": "active", "new-secret": "s2", "keyslot": -1, **QUICK}, False),
    ({"state": "active", **QUICK}, False),
    ({"state": "active", "new-secret": "s2", "old-secret": "s0"}, False),
    ({"state": "active", "new-secret": "s2", "secret": "sx", **QUICK}, False),
    ({"state": "active", "new-secret": "s2", "secret": "nosuch", **QUICK}, False),
    ({"state": "active", "new-secret": "nosuch", **QUICK}, False),
    ({"state": "inactive", "new-secret": "s1"}, False),
    ({"state": "inactive", "iter-time": 10}, False),
    ({"state": "inactive", "secret": "s0"}, False),
    ({"state": "inactive"}, False),
    ({"state": "inactive", "keyslot": 5}, False),
    ({"state": "inactive", "keyslot": 9}, False),
    ({"state": "inactive", "keyslot": -2}, False),
    ({"state": "inactive", "keyslot": 1, "old-secret": "s0"}, False),
    ({"state": "inactive", "old-secret": "sx"}, False),
    ({"state": "inactive", "old-secret": "nosuch"}, False),
    ({"state": "inactive", "old-secret": "s0"}, False),
    ({"state": "inactive", "keyslot": 1}, False),
    ({"state": "inactive", "old-secret": "s1"}, False),
    ({"state": "active", "new-secret": "s2", "secret": "s1", "keyslot": 3, **QUICK}, False),
    ({"state": "active", "new-secret": "s0", "secret": "s2", "keyslot": 3, **QUICK}, True),
    ({"state": "inactive", "keyslot": 1}, False),
    ({"state": "inactive", "keyslot": 6}, True),
]


# QEMU's PBKDF2 rate probe fails now and then on a coarse thread clock
# (qcrypto_pbkdf2_count_iters sees 0 ms, before anything is written): such
# a qemu-img run or amend job of QEMU is repeated.
FLAKE = "Unable to get accurate CPU usage"


# The key slots filled one by one, then erased by password; aes-128
# cbc-plain64 (small key material: qmpgraph's AES is pure Python).
FILL: list[tuple[dict[str, Any], bool]] = [
    *[({"state": "active", "new-secret": "s1", **QUICK}, False)] * 8,
    ({"state": "inactive", "old-secret": "s1"}, False),
    ({"state": "active", "new-secret": "s2", "keyslot": 7, **QUICK}, False),
]
CBC = ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain64"


def _luks_image(path: Path, extra: str) -> None:
    for _ in range(10):
        res = subprocess.run(
            [
                "qemu-img", "create", "-q", "-f", "luks",
                "--object", "secret,id=s0,data=zero",
                "-o", "key-secret=s0,iter-time=10" + extra, str(path), "1M",
            ],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if res.returncode == 0:
            return
        assert FLAKE in res.stderr, res.stderr
    raise AssertionError("qemu-img could not create a LUKS image")


def _wait_concluded(daemon: LiveDaemon, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        for job in daemon.ok("query-jobs"):
            if job["id"] == job_id and job["status"] == "concluded":
                return dict(job)
        assert time.monotonic() < deadline, daemon.ok("query-jobs")
        time.sleep(0.02)


def _amend(daemon: LiveDaemon, args: dict[str, Any]) -> tuple[str, Any]:
    """One amend: the command's error, or the concluded job's (QEMU's flake retried)."""
    for _ in range(10):
        reply = daemon.qmp("x-blockdev-amend", **args)
        if "error" in reply:
            return ("refused", reply["error"])
        job = _wait_concluded(daemon, args["job-id"])
        daemon.ok("job-dismiss", id=args["job-id"])
        if job.get("error") != FLAKE:
            return ("job", job.get("error"))
    raise AssertionError("QEMU's PBKDF2 probe kept failing")


def _run_sequence(
    kind: str, workdir: Path, sequence: list[tuple[dict[str, Any], bool]], extra: str = ""
) -> list[Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "a.luks"
    _luks_image(image, extra)
    daemon = LiveDaemon(kind, require_qemu(), workdir / "d", [])
    outcome: list[Any] = []
    try:
        for sid, data in SECRETS.items():
            daemon.ok("object-add", **{"qom-type": "secret", "id": sid, "data": data})
        daemon.ok(
            "blockdev-add",
            driver="luks",
            **{"node-name": "l", "key-secret": "s0"},
            file={"driver": "file", "filename": str(image)},
        )
        for i, (opts, force) in enumerate(sequence):
            args: dict[str, Any] = {
                "job-id": f"j{i}",
                "node-name": "l",
                "options": {"driver": "luks", **opts},
            }
            if force:
                args["force"] = True
            outcome.append(_amend(daemon, args))
        daemon.ok("blockdev-del", **{"node-name": "l"})
    finally:
        daemon.stop()
    info = json.loads(run("qemu-img", "info", "--output=json", str(image)))
    slots = info["format-specific"]["data"]["slots"]
    outcome.append([(s["active"], s["key-offset"]) for s in slots])
    opens = {}
    for sid, data in SECRETS.items():
        res = subprocess.run(
            [
                "qemu-io", "--object", f"secret,id=k,data={data}", "--image-opts",
                f"driver=luks,key-secret=k,file.filename={image}", "-c", "read 0 512",
            ],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        opens[sid] = res.returncode == 0 and "Invalid password" not in res.stderr
    outcome.append(opens)
    return outcome


@pytest.mark.parametrize(
    ("sequence", "extra"), [(SEQUENCE, ""), (FILL, CBC)], ids=["refusals-xts", "fill-cbc"]
)
def test_luks_keyslot_amend_matches_qsd(
    tmp_path: Path, sequence: list[tuple[dict[str, Any], bool]], extra: str
) -> None:
    """Each job's result, the slot states and which secrets open the image."""
    expected = _run_sequence("qsd", tmp_path / "qsd", sequence, extra)
    got = _run_sequence("qmpgraph", tmp_path / "qg", sequence, extra)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, (i, sequence[i] if i < len(sequence) else None)
