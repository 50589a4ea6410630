"""I/O through the graph: file, raw windows, null, pass-through filters, permissions.

Graphs are built with real blockdev-add commands; a BlockBackend is attached
the way an export attaches one.  The bytes are checked in the image file.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.graph.model import BlockBackend
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io import hooks
from qmpgraph.io.backend import BackendIO
from qmpgraph.io.request import ALLOCATED, DATA, ZERO, BlockIOError
from qmpgraph.transactions.actions import add_root_parent
from qmpgraph.transactions.composite import root_attach
from qmpgraph.transactions.engine import Transaction

MiB = 1 << 20


def attach(client: Client, node_name: str, *, writable: bool) -> BackendIO:
    graph = client.daemon.graph
    node = graph.lookup(node_name)
    assert node is not None
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else 0)
    tran = Transaction()
    bb = BlockBackend()
    add_root_parent(tran, graph, bb)
    root_attach(
        tran,
        graph,
        bb,
        node,
        "root",
        role=Role.FILTERED | Role.PRIMARY,
        perm=int(perm),
        shared=PERM_ALL,
    )
    tran.commit()
    return BackendIO(bb)


def contents(path: Path) -> bytes:
    """The file's bytes (a sync helper: tiny files, read after the I/O is done)."""
    return path.read_bytes()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.raw"
    path.write_bytes(b"\xaa" * 4096 + bytes(MiB - 4096))
    return path


async def test_file_raw_read_write_flush(image: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(image), "node-name": "f0"})
    c.ok("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r0"})
    with trio.fail_after(10):
        io = attach(c, "r0", writable=True)
        assert io.size() == MiB
        assert await io.read(4090, 10) == b"\xaa" * 6 + bytes(4)
        await io.write(8192, b"hello", fua=True)
        await io.write_zeroes(0, 512)
        await io.flush()
    data = contents(image)
    assert data[8192:8197] == b"hello" and data[:512] == bytes(512) and data[512:513] == b"\xaa"


async def test_raw_window(image: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(image), "node-name": "f0"})
    args = {"driver": "raw", "file": "f0", "node-name": "r0", "offset": 4096 - 2, "size": 8192}
    c.ok("blockdev-add", args)
    with trio.fail_after(10):
        io = attach(c, "r0", writable=True)
        assert io.size() == 8192
        assert await io.read(0, 4) == b"\xaa\xaa\0\0"
        await io.write(2, b"xy")
        with pytest.raises(BlockIOError) as exc:
            await io.read(8190, 4)
        assert exc.value.errno == errno.EIO
    assert contents(image)[4096:4098] == b"xy"


async def test_read_only_edge_and_node_refuse_writes(image: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(image), "node-name": "f0"})
    ro = {"driver": "file", "filename": str(image), "node-name": "f1", "read-only": True}
    c.ok("blockdev-add", ro)
    with trio.fail_after(10):
        io = attach(c, "f0", writable=False)
        for op in (io.write(0, b"x"), io.write_zeroes(0, 1), io.discard(0, 512)):
            with pytest.raises(BlockIOError) as exc:
                await op
            assert exc.value.errno == errno.EPERM
        assert await io.read(0, 1) == b"\xaa"
    assert contents(image)[0:1] == b"\xaa"


async def test_block_status_holes_and_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(MiB)
        f.seek(65536)
        f.write(b"x" * 4096)
    c = Client()
    c.ok("blockdev-add", {"driver": "file", "filename": str(path), "node-name": "f0"})
    c.ok("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r0"})
    with trio.fail_after(10):
        io = attach(c, "r0", writable=False)
        flags, pnum = await io.block_status(0, MiB)
        assert flags & ZERO and not flags & DATA and pnum == 65536
        flags, pnum = await io.block_status(65536, MiB - 65536)
        assert flags & DATA and flags & ALLOCATED and pnum == 4096


async def test_null_and_filters(image: Path) -> None:
    c = Client()
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": MiB, "read-zeroes": True})
    c.ok("blockdev-add", {"driver": "copy-on-read", "file": "n0", "node-name": "cor"})
    with trio.fail_after(10):
        io = attach(c, "cor", writable=True)
        await io.write(0, b"gone")
        assert await io.read(0, 4) == bytes(4)
        flags, pnum = await io.block_status(0, MiB)
        assert flags & ZERO and pnum == MiB


async def test_discard_unmaps_only_with_discard_unmap(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(b"z" * MiB)
    c = Client()
    args = {"driver": "file", "filename": str(path), "node-name": "f0", "discard": "unmap"}
    c.ok("blockdev-add", args)
    with trio.fail_after(10):
        io = attach(c, "f0", writable=True)
        await io.discard(0, 65536)
        assert await io.read(0, 8) == bytes(8)
        flags, _ = await io.block_status(0, 65536)
        assert flags & ZERO


def test_hooks_registry_is_read_only() -> None:
    assert set(hooks.IO_HOOKS) >= {"file", "raw", "null-co", "null-aio", "throttle"}
    with pytest.raises(TypeError):
        hooks.IO_HOOKS["x"] = hooks.IOHook()  # type: ignore[index]
