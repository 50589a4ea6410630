"""Tiny image files for replay tests, written without QEMU.

A qcow2 image here is a valid empty version-3 image (with the backing-format
extension and the backing file name when it has a backing file) that
``qemu-img check`` accepts.  ``make_images(dir)``
writes the fixed set the recorded logs in ``logs/`` refer to, by paths
relative to ``dir`` (replay runs with ``--base-dir dir``).
"""

from __future__ import annotations

import struct
from pathlib import Path

_MAGIC = 0x514649FB
_CLUSTER_BITS = 16
_HEADER_LEN = 112
_EXT_BACKING_FORMAT = 0xE2792ACA


def qcow2_header(size: int, backing: str | None = None, backing_fmt: str = "qcow2") -> bytes:
    """A valid, empty qcow2 v3 image of ``size`` bytes, optionally with a backing file.

    Layout (one 64 KiB cluster each): header, refcount table, refcount block,
    L1 table; the four clusters have refcount 1, as ``qemu-img check`` expects.
    """
    cluster = 1 << _CLUSTER_BITS
    ext = b""
    if backing is not None:
        fmt = backing_fmt.encode()
        ext += struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(
            (len(fmt) + 7) & ~7, b"\0"
        )
    ext += struct.pack(">II", 0, 0)
    name = backing.encode() if backing is not None else b""
    name_off = _HEADER_LEN + len(ext) if backing is not None else 0
    # One L1 entry maps 2^(2 * cluster_bits - 3) bytes of guest data.
    l1_size = max(1, -(-size // (1 << (2 * _CLUSTER_BITS - 3))))
    head = struct.pack(
        ">IIQIIQIIQQIIQ",
        _MAGIC,
        3,
        name_off,
        len(name),
        _CLUSTER_BITS,
        size,
        0,  # crypt method
        l1_size,
        3 * cluster,  # l1 table offset
        1 * cluster,  # refcount table offset
        1,  # refcount table clusters
        0,  # snapshots
        0,  # snapshots offset
    )
    # incompatible, compatible, autoclear features; refcount order; header length.
    head += struct.pack(">QQQII", 0, 0, 0, 4, _HEADER_LEN)
    head += bytes([0]) + bytes(7)  # compression type zlib, padding
    assert len(head) == _HEADER_LEN
    header = (head + ext + name).ljust(cluster, b"\0")
    refcount_table = struct.pack(">Q", 2 * cluster).ljust(cluster, b"\0")
    refcount_block = struct.pack(">4H", 1, 1, 1, 1).ljust(cluster, b"\0")
    l1_table = bytes(cluster)
    return header + refcount_table + refcount_block + l1_table


IMAGES: dict[str, tuple[int, str | None]] = {
    "base.qcow2": (1 << 20, None),
    "mid.qcow2": (1 << 20, "base.qcow2"),
    "top.qcow2": (1 << 20, "mid.qcow2"),
    "other.qcow2": (1 << 20, None),
    "overlay.qcow2": (1 << 20, None),
}
RAW_IMAGES = {"disk.raw": 1 << 20, "scratch.raw": 1 << 20}


def make_images(directory: Path) -> None:
    """Write every image the recorded logs use into ``directory``."""
    for name, (size, backing) in IMAGES.items():
        (directory / name).write_bytes(qcow2_header(size, backing))
    for name, size in RAW_IMAGES.items():
        with open(directory / name, "wb") as f:
            f.truncate(size)
