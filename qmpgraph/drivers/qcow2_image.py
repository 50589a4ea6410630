"""Writing qcow2 images: create one as QEMU 7.2 does, and rewrite a header's backing file.

``create_image`` is what ``qemu-img create -f qcow2 [-b FILE -F FMT] PATH SIZE``
writes with default options (version 3, 64 KiB clusters, 16-bit refcounts,
zlib, no lazy refcounts), byte for byte, so that ``qemu-img info``,
``qemu-img check`` and qmpgraph's qcow2 driver read it like QEMU's own:

* cluster 0: the 112-byte header, the header extensions (backing format if
  any, then the feature name table), the end marker and the backing file
  name, the rest of the cluster zero;
* cluster 1: the refcount table (one entry, pointing at cluster 2);
* cluster 2: the refcount block (refcount 1 for every used cluster);
* cluster 3 on: the L1 table, all zero, exactly ``l1_size * 8`` bytes long
  (QEMU grows it on truncate to the image size, so the file ends there).

The file itself is created as file-posix's ``raw_co_create`` does: opened
with ``O_CREAT``, the image-locking check for WRITE and RESIZE (so an image
another node or process uses is refused with QEMU's lock message), then
truncated and written.  Everything is written as QEMU writes it (whole
clusters, not sparse), so the allocated size matches too.

``rewrite_backing`` is qcow2_update_header after a backing-file change: the
header cluster is rebuilt in place (extensions in QEMU's order, unknown ones
kept) and written with one ``pwrite``, as QEMU writes it.

What does not live here: reading and validating headers (``qcow2.py``), the
graph side of snapshots (``qmpgraph.commands.snapshot``).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from qmpgraph.drivers.filelock import ImageLock, ofd_supported
from qmpgraph.drivers.qcow2 import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    MAGIC,
    Qcow2Header,
    parse_backing_name,
    parse_extensions,
)
from qmpgraph.errors import GenericError
from qmpgraph.graph.perms import PERM_ALL, Perm

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
_HEADER_V3 = 112  # sizeof(QCowHeader), already a multiple of 8
_HEADER_V2 = 72
_MAX_BACKING_NAME = 1023
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
# The feature name table QEMU 7.2 writes into every v3 header: (type, bit, name).
FEATURES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
# qcow2_update_header's order for the extensions it owns; others follow as read.
_OWN_ORDER = (EXT_CRYPTO, EXT_DATA_FILE, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where ``create_image`` puts things, for a given virtual size."""

    size: int
    l1_size: int

    @property
    def l1_clusters(self) -> int:
        """Clusters the L1 table occupies."""
        return -(-self.l1_size * 8 // CLUSTER_SIZE)

    @property
    def l1_offset(self) -> int:
        """Offset of the L1 table (0 for an empty table, as QEMU leaves it)."""
        return 3 * CLUSTER_SIZE if self.l1_size else 0

    @property
    def file_length(self) -> int:
        """Length of the created file."""
        return 3 * CLUSTER_SIZE + self.l1_size * 8


def layout(size: int) -> Layout:
    """The layout of a new image of ``size`` bytes (each L2 table maps 512 MiB)."""
    per_l1 = CLUSTER_SIZE * (CLUSTER_SIZE // 8)
    return Layout(size, -(-size // per_l1))


def _feature_table() -> bytes:
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURES)


def _extension(ext_type: int, data: bytes) -> bytes:
    padded = data.ljust((len(data) + 7) & ~7, b"\0")
    return struct.pack(">II", ext_type, len(data)) + padded


def _tail(
    version: int,
    header_len: int,
    backing_file: str | None,
    backing_format: str | None,
    kept: list[tuple[int, bytes]],
) -> tuple[bytes, int, int]:
    """Extensions, end marker and backing name: (bytes, name offset, name length)."""
    own: dict[int, bytes] = {t: d for t, d in kept if t in _OWN_ORDER}
    if backing_format:
        own[EXT_BACKING_FORMAT] = backing_format.encode()
    else:
        own.pop(EXT_BACKING_FORMAT, None)
    if version >= 3:
        own[EXT_FEATURE_TABLE] = _feature_table()
    else:
        own.pop(EXT_FEATURE_TABLE, None)
    out = b"".join(_extension(t, own[t]) for t in _OWN_ORDER if t in own)
    out += b"".join(_extension(t, d) for t, d in kept if t not in _OWN_ORDER)
    out += bytes(8)  # end of extensions
    if backing_file is None:
        return out, 0, 0
    name = backing_file.encode()
    return out + name, header_len + len(out), len(name)


def _header(lay: Layout, backing: tuple[int, int]) -> bytes:
    return struct.pack(
        ">IIQIIQIIQQIIQQQQII",
        MAGIC, 3, backing[0], backing[1], CLUSTER_BITS, lay.size, 0,
        lay.l1_size, lay.l1_offset, CLUSTER_SIZE, 1, 0, 0,
        0, 0, 0, 4, _HEADER_V3,
    ).ljust(_HEADER_V3, b"\0")  # fmt: skip


def image_bytes(size: int, backing_file: str | None, backing_format: str | None) -> bytes:
    """The whole image ``create_image`` writes (tests compare it with qemu-img's)."""
    lay = layout(size)
    tail, name_off, name_len = _tail(3, _HEADER_V3, backing_file, backing_format, [])
    cluster0 = (_header(lay, (name_off, name_len)) + tail).ljust(CLUSTER_SIZE, b"\0")
    reftable = struct.pack(">Q", 2 * CLUSTER_SIZE).ljust(CLUSTER_SIZE, b"\0")
    used = 3 + lay.l1_clusters
    refblock = struct.pack(f">{used}H", *([1] * used)).ljust(CLUSTER_SIZE, b"\0")
    return cluster0 + reftable + refblock + bytes(lay.l1_size * 8)


def _create_file(path: str) -> int:
    """raw_co_create: open with O_CREAT, check the image locks, then empty the file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise GenericError(f"Could not create '{path}': {os.strerror(err.errno or 0)}") from err
    lock = ImageLock(fd, path, use_lock=ofd_supported())
    try:
        # The creator wants WRITE and RESIZE and shares everything but RESIZE.
        lock.prepare(Perm.WRITE | Perm.RESIZE, PERM_ALL & ~Perm.RESIZE)
        os.ftruncate(fd, 0)
    except OSError as err:
        lock.close()
        raise GenericError(f"Could not resize file: {os.strerror(err.errno or 0)}") from err
    except GenericError:
        lock.close()
        raise
    # Hand the descriptor over: duplicating it keeps the OFD locks on the description.
    fd2 = os.dup(fd)
    lock.close()
    return fd2


def create_image(
    path: str,
    size: int,
    backing_file: str | None = None,
    backing_format: str | None = None,
    *,
    opened: Callable[[], object] = lambda: None,
) -> None:
    """Create the qcow2 image at ``path`` (replacing a file there), QEMU's errors on failure.

    ``opened`` is called wherever QEMU's qcow2_co_create opens a node (the
    protocol node, then the image twice), because each of those takes an
    automatic node name from the daemon's counter.  As in QEMU, a backing
    name that cannot be stored fails only after the image was written
    (without it).
    """
    fd = _create_file(path)
    try:
        opened()  # bdrv_open of the new file
        opened()  # blk_new_open of the image to complete its header
        _write_all(fd, image_bytes(size, None, None))
        if backing_file is not None and len(backing_file.encode()) > _MAX_BACKING_NAME:
            raise GenericError(
                f"Could not assign backing file '{backing_file}' with format "
                f"'{backing_format or ''}': Invalid argument"
            )
        if backing_file is not None:
            _write_all(fd, image_bytes(size, backing_file, backing_format)[:CLUSTER_SIZE])
        opened()  # blk_new_open again, to flush
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    written = 0
    try:
        while written < len(view):
            written += os.pwrite(fd, view[written:], written)
    except OSError as err:
        raise GenericError(f"Could not write qcow2 header: {os.strerror(err.errno or 0)}") from err


def _all_extensions(raw: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = start
    while pos + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", raw, pos)
        pos += 8
        if ext_type == 0 or ext_len > end - pos:
            break
        out.append((ext_type, raw[pos : pos + ext_len]))
        pos += (ext_len + 7) & ~7
    return out


def rewrite_backing(
    path: str, header: Qcow2Header, backing_file: str | None, backing_format: str | None
) -> Qcow2Header:
    """Write a new backing file name and format into the image header, in place.

    ``header`` is the parsed header of the open image; returns it updated.
    Raises ``OSError`` with QEMU's errno (EINVAL for a name past 1023 bytes,
    ENOSPC when the header no longer fits in its cluster).
    """
    if backing_file is not None and len(backing_file.encode()) > _MAX_BACKING_NAME:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    cluster = header.cluster_size
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, cluster, 0).ljust(cluster, b"\0")
        bf_off = struct.unpack_from(">Q", raw, 8)[0]
        ext_end = bf_off or cluster
        kept = _all_extensions(raw, header.header_length, ext_end)
        fixed_len = _HEADER_V2 if header.version < 3 else header.header_length
        fixed = bytearray(raw[:fixed_len])
        tail, name_off, name_len = _tail(
            header.version, fixed_len, backing_file, backing_format, kept
        )
        struct.pack_into(">QI", fixed, 8, name_off, name_len)
        if header.version >= 3:
            struct.pack_into(">I", fixed, 100, fixed_len)
        new = bytes(fixed) + tail
        if len(new) > cluster:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.pwrite(fd, new.ljust(cluster, b"\0"), 0)
    finally:
        os.close(fd)
    padded = new.ljust(cluster, b"\0")
    cleared = replace(header, backing_file=None, backing_format=None, data_file=None)
    return parse_backing_name(padded, parse_extensions(padded, cleared))
