"""The luks data path, live against qemu-storage-daemon.

One LUKS image per daemon (made by ``qemu-img``, prefilled through
``qemu-io``), opened with its secret and exported writable over NBD; the
same ``qemu-io`` requests go to both exports (sector-aligned and not, zeroes,
a discard, reads of what came before). Both daemons must answer every
request alike, report the same map, and leave images whose decrypted
contents ``qemu-img compare`` finds equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

SECRET = "secret,id=s,data=pw"

REQUESTS = [
    "read -P 0x11 0 64k",
    "write -P 0x22 1000 3000",  # partial sectors at both ends
    "read -P 0x22 1000 3000",
    "read -P 0x11 0 1000",
    "read -P 0x11 4000 96",
    "write -P 0x33 1M 64k",
    "write -z 2M 8k",
    "read -P 0 2M 8k",
    "write -z 3000000 700",
    "discard 3M 64k",
    "read -P 0x11 3M 64k",  # luks has no discard of its own: the data stays
    "write -P 0x44 4190000 4304",  # up to the end
    "read -v 4194000 304",
    "flush",
]


def _image(d: Path, cipher: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = d / "disk.luks"
    opts = ",".join(["key-secret=s", "iter-time=10", *cipher])
    create = ["qemu-img", "create", "-q", "-f", "luks", "--object", SECRET, "-o", opts, str(img)]
    for _ in range(10):
        # Under load qemu-img's PBKDF benchmark can fail ("Unable to get
        # accurate CPU usage"); that says nothing about either daemon.
        res = subprocess.run(
            [*create, "4M"], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        if res.returncode == 0 or "CPU usage" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr
    run(
        "qemu-io", "--object", SECRET, "--image-opts",
        f"driver=luks,key-secret=s,file.filename={img}", "-c", "write -P 0x11 0 4M",
    )  # fmt: skip
    return img


def _session(kind: str, qsd: str, d: Path, cipher: list[str]) -> tuple[list[str], str, Path]:
    img = _image(d, cipher)
    daemon = LiveDaemon(kind, qsd, d / "run", [])
    try:
        daemon.ok("object-add", qom_type="secret", id="s", data="pw")
        daemon.ok(
            "blockdev-add",
            driver="luks",
            node_name="disk",
            key_secret="s",
            file={"driver": "file", "filename": str(img)},
        )
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", node_name="disk", writable=True)
        outs = []
        for cmd in REQUESTS:
            res = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", cmd, daemon.uri("disk")],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            text = res.stdout + res.stderr
            # Timing lines (and qemu-io's CPU-usage warning under load) say nothing.
            lines = [ln for ln in text.splitlines() if " ops; " not in ln and "CPU" not in ln]
            outs.append(f"{cmd}: {res.returncode} {lines}")
        mapped = run("nbdinfo", "--map", daemon.uri("disk"))
    finally:
        daemon.stop()
    return outs, mapped, img


@pytest.mark.parametrize(
    "cipher",
    [[], ["cipher-alg=aes-128", "ivgen-alg=plain"], ["cipher-mode=cbc", "ivgen-alg=plain64"]],
    ids=["aes-256-xts-plain64", "aes-128-xts-plain", "aes-256-cbc-plain64"],
)
def test_luks_export_reads_and_writes_as_qsd(tmp_path: Path, cipher: list[str]) -> None:
    qsd = require_qemu()
    ours = _session("qmpgraph", qsd, tmp_path / "qmpgraph", cipher)
    theirs = _session("qsd", qsd, tmp_path / "qsd", cipher)
    assert ours[0] == theirs[0]
    assert all(": 0 " in line for line in ours[0]), ours[0]
    assert ours[1] == theirs[1]
    run(
        "qemu-img", "compare", "--object", SECRET, "--image-opts",
        f"driver=luks,key-secret=s,file.filename={ours[2]}",
        f"driver=luks,key-secret=s,file.filename={theirs[2]}",
    )  # fmt: skip
