"""block_resize and block-set-write-threshold at library level.

Messages were recorded from qemu-storage-daemon 7.2 (the resize-*.qmp and
write-threshold-*.qmp differential scripts run the same cases against it).
The qemu-marked tests check the images qmpgraph rewrites with ``qemu-img
check``/``info`` and compare them byte for byte with the images the real daemon
produces for the same commands.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cmdkit import Client

import qmpgraph.commands.resize as resize_mod
from qmpgraph.errors import GenericError
from qmpgraph.graph.digest import graph_digest

_MiB = 1 << 20


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def _add_file(client: Client, name: str, path: Path) -> None:
    client.ok("blockdev-add", {"driver": "file", "node-name": name, "filename": str(path)})


def test_lookup_and_size_errors(tmp_path: Path) -> None:
    client = Client()
    client.fails("block_resize", {"size": 512}, "Cannot find device='' nor node-name=''")
    client.fails("block_resize", {"device": "x", "node-name": "y", "size": 1},
                 "Cannot find device='x' nor node-name='y'")  # fmt: skip
    (tmp_path / "a.img").write_bytes(bytes(4096))
    _add_file(client, "f", tmp_path / "a.img")
    client.fails("block_resize", {"node-name": "f", "size": -1},
                 "Parameter 'size' expects a >0 size")  # fmt: skip
    client.fails("block_resize", {"device": "f", "size": 1},
                 "Cannot find device='f' nor node-name=''")  # fmt: skip
    client.ok("blockdev-add", {"driver": "null-co", "node-name": "n"})
    client.fails("block_resize", {"node-name": "n", "size": 4096},
                 "Image format driver does not support resize")  # fmt: skip


def test_file_and_raw_resize(tmp_path: Path) -> None:
    client = Client()
    path = tmp_path / "a.img"
    path.write_bytes(b"x" * 8192)
    _add_file(client, "f", path)
    client.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    client.ok("block_resize", {"node-name": "r", "size": 1000})
    assert path.stat().st_size == 1000
    client.ok("block_resize", {"node-name": "f", "size": 65536})
    sizes = {
        n["node-name"]: n["image"]["virtual-size"] for n in client.ok("query-named-block-nodes")
    }
    assert sizes == {"r": 65536, "f": 65536}
    # The temporary BlockBackend is gone again.
    assert list(client.daemon.graph.backends) == []
    client.ok("blockdev-add", {"driver": "raw", "node-name": "w", "size": 512,
                               "file": {"driver": "null-co"}})  # fmt: skip
    client.fails("block_resize", {"node-name": "w", "size": 4096},
                 "Cannot resize fixed-size raw disks")  # fmt: skip


def test_read_only_and_permission_conflict(tmp_path: Path) -> None:
    client = Client()
    (tmp_path / "ro.img").write_bytes(bytes(4096))
    (tmp_path / "rw.img").write_bytes(bytes(4096))
    ro_file = {"driver": "file", "filename": str(tmp_path / "ro.img")}
    client.ok(
        "blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True, "file": ro_file}
    )
    client.fails("block_resize", {"node-name": "ro", "size": 8192}, "Image is read-only")
    client.ok("blockdev-add", {"driver": "raw", "node-name": "r", "offset": 512, "size": 1024,
                               "file": {"driver": "file", "node-name": "f",
                                        "filename": str(tmp_path / "rw.img")}})  # fmt: skip
    client.fails("block_resize", {"node-name": "f", "size": 8192},
                 "Permission conflict on node 'f': permissions 'resize' are both required by an "
                 "unnamed block device (uses node 'f' as 'root' child) and unshared by node 'r' "
                 "(uses node 'f' as 'file' child).")  # fmt: skip
    assert (tmp_path / "rw.img").stat().st_size == 4096


@pytest.mark.qemu
def test_failed_qcow2_resize_restores_the_image(
    tmp_path: Path, qsd_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    del qsd_path
    path = tmp_path / "a.qcow2"
    assert _qemu_img("create", "-q", "-f", "qcow2", str(path), "1M").returncode == 0
    before = path.read_bytes()
    client = Client()
    client.ok("blockdev-add", {"driver": "qcow2", "node-name": "q",
                               "file": {"driver": "file", "filename": str(path)}})  # fmt: skip
    digest = graph_digest(client.daemon.graph)

    def boom(*args: Any) -> None:
        raise GenericError("injected")

    # Fails after the L1 table was grown and the header rewritten.
    monkeypatch.setattr(resize_mod, "_set_table", boom)
    reply = client.run("block_resize", {"node-name": "q", "size": 1 << 40})
    assert reply["error"]["desc"] == "injected"
    assert path.read_bytes() == before
    assert graph_digest(client.daemon.graph) == digest


class _Qsd:
    """A bare synchronous QMP client of a real qemu-storage-daemon (bounded by timeouts)."""

    def __init__(self, qsd: str, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [qsd, "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m"]
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        # A shrink from 1 TiB makes QEMU rewrite its tables: slow on a loaded machine.
        self.sock.settimeout(90)
        self.sock.connect(str(sock))
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


_SEQUENCES = {
    "grow": [4 * _MiB, 1 << 40, 2 << 40],
    "shrink": [512 * 1024, 256 * 1024, 3 * _MiB],
    "grow-shrink": [1 << 40, 65536, 4 * _MiB, 512],
}


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(_SEQUENCES))
def test_qcow2_resize_matches_qemu(tmp_path: Path, qsd_path: str, name: str) -> None:
    sizes = _SEQUENCES[name]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        assert _qemu_img("create", "-q", "-f", "qcow2", str(path), "1M").returncode == 0
        script = "write -P 0x5a 0 128k"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", script, str(path)],
                       capture_output=True, timeout=60, check=True)  # fmt: skip
    client = Client()
    qsd = _Qsd(qsd_path, tmp_path / "q.sock")
    try:
        for path, run in ((ours, client.ok), (theirs, qsd.cmd)):
            run("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                 "file": {"driver": "file", "filename": str(path)}})  # fmt: skip
            for size in sizes:
                run("block_resize", {"node-name": "q", "size": size})
            run("blockdev-del", {"node-name": "q"})
    finally:
        qsd.close()
    check = _qemu_img("check", str(ours))
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(_qemu_img("info", "--output=json", str(ours)).stdout)
    assert info["virtual-size"] == sizes[-1]
    assert ours.read_bytes() == theirs.read_bytes()


def test_write_threshold() -> None:
    client = Client()
    client.fails("block-set-write-threshold", {"node-name": "n", "write-threshold": 1},
                 "Device 'n' not found")  # fmt: skip
    client.ok("blockdev-add", {"driver": "null-co", "node-name": "n"})
    client.ok("block-set-write-threshold", {"node-name": "n", "write-threshold": 65536})
    assert client.ok("query-named-block-nodes")[0]["write_threshold"] == 65536
    client.ok("block-set-write-threshold", {"node-name": "n", "write-threshold": (1 << 64) - 1})
    assert client.ok("query-named-block-nodes")[0]["write_threshold"] == -1
    # The threshold belongs to the node: a new node of the same name starts at 0.
    client.ok("blockdev-del", {"node-name": "n"})
    client.ok("blockdev-add", {"driver": "null-co", "node-name": "n"})
    assert client.ok("query-named-block-nodes")[0]["write_threshold"] == 0
