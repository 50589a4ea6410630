"""The bytes of a new qcow2 image, as QEMU 7.2's qcow2_co_create leaves it.

qcow2_co_create writes a bare header and a refcount table, opens the image,
refcounts the first three clusters, rewrites the full header (extensions,
feature table) and truncates it to its size, which allocates the L1 table at
cluster 3 (written exactly ``l1_size * 8`` bytes long; refcount blocks
after it when one does not cover it, as with small clusters).
``image_bytes`` builds that end state for any of blockdev-create's layout
options (version, cluster size, refcount width, lazy refcounts, extended
L2, compression type, backing file and format, an external data file by
node name) and ``image_writes`` adds preallocation (metadata, falloc, full,
with plain or extended L2 entries) for images one refcount table cluster
covers; ``validate`` is the option checks in QEMU's order.

Where QEMU's truncate to the size refuses (negative, past BDRV_MAX_LENGTH,
an L1 table past 32 MiB), the image stays at size 0 and the job fails with
QEMU's message.  Encryption is set up last: ``encryption_refusal`` gives
QEMU's refusals (key secret, cipher name), then qmpgraph's own, as qmpgraph
has no encrypted qcow2 (the plain image stays, as after QEMU's refusals).

What does not live here: the job and the command (``create``), the default
``qemu-img create`` writer (``qmpgraph.drivers.qcow2_image``).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.qcow2 import EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE, MAGIC
from qmpgraph.drivers.qcow2_image import FEATURES
from qmpgraph.errors import GenericError
from qmpgraph.io.luks_create import check_cipher, check_key_secret
from qmpgraph.jobs.core import JobFailed
from qmpgraph.objects.qom import ObjectTree

_COPIED = 1 << 63
_HEADER_V3 = 112
_HEADER_V2 = 72
# BDRV_MAX_LENGTH, and QCOW_MAX_L1_SIZE in entries.
MAX_LENGTH = (1 << 63) - (1 << 30)
MAX_L1_ENTRIES = (32 << 20) // 8
_V3_HINT = "compatibility level 1.1 and above (use version=v3 or greater)"


@dataclass(frozen=True, slots=True)
class Qcow2Layout:
    """The validated layout options of one new image."""

    size: int
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    lazy_refcounts: bool = False
    extended_l2: bool = False
    zstd: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    # The data file node's filename, written in the header (incompatible bit 2).
    data_file: str | None = None
    # metadata, falloc, full: every L2 table and data cluster allocated.
    preallocation: str = "off"
    data_file_raw: bool = False
    # Why QEMU's truncate to the size fails (the image then stays at size 0).
    resize_error: str | None = None
    # The ``encrypt`` options (set up after the size and backing file).
    encrypt: dict[str, Any] | None = None

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def cow_size(self) -> int:
        """Bytes copy-on-write works on: the cluster, or the subcluster with
        extended L2 entries."""
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def l1_size(self) -> int:
        """L1 entries for the image size (each L2 table maps its clusters)."""
        entries = self.cluster_size // (16 if self.extended_l2 else 8)
        per_l1 = self.cluster_size * entries
        return -(-self.size // per_l1)


def validate(
    opts: dict[str, Any], data_file_name: Callable[[Any], str] | None = None
) -> Qcow2Layout:
    """qcow2_co_create's option checks, in order (after the file lookup).

    ``data_file_name`` resolves the ``data-file`` reference to the filename
    the header records (raising QEMU's lookup error); without it a
    ``data-file`` is refused.
    """
    size = int(opts["size"])
    if size >= 1 << 63:
        size -= 1 << 64  # QEMU reads the uint64 as the int64 the truncate gets
    if size % 512:
        raise GenericError("Image size must be a multiple of 512 bytes")
    version = 2 if opts.get("version") == "v2" else 3
    cluster_size = int(opts.get("cluster-size", 65536))
    extended_l2 = bool(opts.get("extended-l2", False))
    if extended_l2 and version < 3:
        raise GenericError(f"Extended L2 entries are only supported with {_V3_HINT}")
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size & (cluster_size - 1) or not 9 <= bits <= 21:
        raise GenericError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise GenericError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    prealloc = opts.get("preallocation", "off")
    if "backing-file" in opts and prealloc != "off" and not extended_l2:
        raise GenericError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if "backing-fmt" in opts and "backing-file" not in opts:
        raise GenericError("Backing format cannot be used without backing file")
    lazy = bool(opts.get("lazy-refcounts", False))
    if version < 3 and lazy:
        raise GenericError(f"Lazy refcounts only supported with {_V3_HINT}")
    refcount_bits = int(opts.get("refcount-bits", 16))
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise GenericError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        # "or above" here, where the other messages say "and above".
        raise GenericError(
            "Different refcount widths than 16 bits require compatibility level 1.1 "
            "or above (use version=v3 or greater)"
        )
    data_file_raw = bool(opts.get("data-file-raw", False))
    if data_file_raw and "data-file" not in opts:
        raise GenericError("data-file-raw requires data-file")
    if data_file_raw and "backing-file" in opts:
        raise GenericError("Backing file and data-file-raw cannot be used at the same time")
    if data_file_raw and prealloc == "off":
        # The L2 tables must map the whole data file 1:1 from the start;
        # a preallocation asked for is kept.
        prealloc = "metadata"
    data_file = None
    if "data-file" in opts:
        if version < 3:
            raise GenericError(f"External data files are only supported with {_V3_HINT}")
        if data_file_name is None:
            raise GenericError(
                "qcow2 data-file in blockdev-create is not supported by qmpgraph yet"
            )
        data_file = data_file_name(opts["data-file"])
    zstd = False
    if opts.get("compression-type", "zlib") != "zlib":
        if version < 3:
            raise GenericError(f"Non-zlib compression type is only supported with {_V3_HINT}")
        zstd = True
    resize_error = _resize_error(size, bits, extended_l2)
    return Qcow2Layout(
        size=size,
        version=version,
        cluster_bits=bits,
        refcount_order=refcount_bits.bit_length() - 1,
        lazy_refcounts=lazy,
        extended_l2=extended_l2,
        zstd=zstd,
        backing_file=opts.get("backing-file"),
        backing_fmt=opts.get("backing-fmt"),
        data_file=data_file,
        preallocation=str(prealloc),
        data_file_raw=data_file_raw,
        resize_error=resize_error,
        encrypt=opts.get("encrypt"),
    )


def _resize_error(size: int, cluster_bits: int, extended_l2: bool) -> str | None:
    """What bdrv_co_truncate and qcow2_grow_l1_table refuse, in their order."""
    prefix = "Could not resize image: "
    if size < 0:
        return prefix + "Image size cannot be negative"
    if size > MAX_LENGTH:
        return prefix + f"offset({size}) exceeds maximum({MAX_LENGTH})"
    shift = 2 * cluster_bits - (4 if extended_l2 else 3)
    if -(-size >> shift) > MAX_L1_ENTRIES:
        return prefix + "Failed to grow the L1 table: " + os.strerror(errno.EFBIG)
    return None


def encryption_refusal(encrypt: dict[str, Any], tree: ObjectTree) -> str:
    """qcow2_set_up_encryption, as far as qmpgraph goes: QEMU's refusals
    before the key material is made (key secret, cipher name), then
    qmpgraph's own, as it cannot write (or read) encrypted qcow2 images."""
    try:
        check_key_secret(tree, encrypt, "encrypt.")
        if encrypt.get("format") == "luks":
            check_cipher(encrypt)
    except JobFailed as err:
        return err.message
    return "qcow2 encryption in blockdev-create is not supported by qmpgraph yet"


def _extension(ext_type: int, data: bytes) -> bytes:
    padded = data.ljust((len(data) + 7) & ~7, b"\0")
    return struct.pack(">II", ext_type, len(data)) + padded


def _refblock(lay: Qcow2Layout, used: int) -> bytes:
    """A refcount block with refcount 1 for the first ``used`` clusters."""
    cs = lay.cluster_size
    width = 1 << lay.refcount_order
    if used > cs * 8 // width:
        raise GenericError("qcow2 images needing two refcount blocks are not supported yet")
    if width >= 8:
        fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[width]
        return struct.pack(f">{used}{fmt}", *([1] * used)).ljust(cs, b"\0")
    block = bytearray(cs)
    per_byte = 8 // width
    for i in range(used):
        block[i // per_byte] |= 1 << ((i % per_byte) * width)
    return bytes(block)


@dataclass(frozen=True, slots=True)
class ImageWrites:
    """How to lay the new image down: ``writes`` (offset, bytes), then the
    file's final ``length``, and ``fill`` (offset, length) of data clusters
    to fallocate (``falloc``) or write zeros over (``full``)."""

    writes: list[tuple[int, bytes]]
    length: int
    fill: tuple[int, int] | None = None
    # The job fails with this once ``writes`` are done (nothing else is).
    error: str | None = None


def image_writes(lay: Qcow2Layout) -> ImageWrites:
    """The writes that make the new image, as QEMU's truncate to its size leaves it.

    Without preallocation that is ``image_bytes``.  With ``metadata``,
    QEMU's preallocate_co allocates, L2 table by L2 table, the table and
    then its data clusters right after the L1 table; the data clusters stay
    holes (but the zeros copy-on-write writes after an unaligned end).
    ``falloc`` and ``full`` (``_preallocated_data``) allocate the data
    clusters in one run first.  Every cluster has refcount 1 and the
    COPIED flag.  falloc and full are handled for images whose clusters one
    refcount block covers, metadata for those one refcount table cluster
    covers.
    """
    if lay.resize_error is not None:
        # The image as qcow2_co_create had it before the truncate: size 0.
        empty = Qcow2Layout(**{**_fields(lay), "size": 0, "preallocation": "off"})
        return ImageWrites([(0, image_bytes(empty))], 0, error=lay.resize_error)
    backing_error = _backing_error(lay)
    if backing_error is not None:
        # The image is complete, but for the backing file it could not record.
        plain = Qcow2Layout(**{**_fields(lay), "backing_file": None, "backing_fmt": None})
        return dataclasses.replace(image_writes(plain), error=backing_error)
    if lay.preallocation == "off":
        alloc = _Allocator(lay)
        if len(alloc.refblocks) == 1:
            data = image_bytes(lay)
            return ImageWrites([(0, data)], len(data))
        # The L1 table needs refcount blocks of its own (small clusters).
        head = _head_writes(lay, alloc, bytes(lay.l1_size * 8))
        return ImageWrites(head, alloc.next * lay.cluster_size)
    if lay.preallocation != "metadata" and lay.data_file is None:
        return _preallocated_data(lay)
    # With a data file, falloc and full preallocate the image's metadata
    # only (the data file grows with the mode: ``create``).
    cs = lay.cluster_size
    entries = cs // _entry_size(lay)
    data_clusters = -(-lay.size // cs)
    alloc = _Allocator(lay)
    l1 = bytearray()
    writes: list[tuple[int, bytes]] = []
    last_data = 0
    for i in range(lay.l1_size):
        count = min(entries, data_clusters - i * entries)
        l2 = alloc.run(1)
        l1 += struct.pack(">Q", l2 * cs | _COPIED)
        if lay.data_file is not None:
            # Data clusters live in the data file at their guest offsets.
            writes.append((l2 * cs, _l2_table(lay, i * entries, count)))
            continue
        first = alloc.run(count)
        writes.append((l2 * cs, _l2_table(lay, first, count)))
        last_data = first + count - 1
    tail = lay.size % cs
    # Copy-on-write works on subclusters with extended L2 entries.
    cow = (-tail) % lay.cow_size
    if tail and cow and lay.data_file is None:
        # The last data cluster is allocated for part of its bytes: QEMU's
        # copy-on-write fills the rest of its (sub)cluster with written zeros.
        writes.append((last_data * cs + tail, bytes(cow)))
    writes = _head_writes(lay, alloc, bytes(l1)) + writes
    # preallocate_co extends the file to the image's end in its last cluster.
    data_end = last_data * cs + (tail or cs) if lay.data_file is None else 0
    length = max(data_end, *(offset + len(data) for offset, data in writes))
    return ImageWrites(writes, length)


def _backing_error(lay: Qcow2Layout) -> str | None:
    """qcow2_change_backing_file's refusals: a name past 1023 bytes, or a
    header that no longer fits in its cluster."""
    if lay.backing_file is None:
        return None
    name = lay.backing_file
    if len(name.encode()) > 1023:
        code = errno.EINVAL
    elif len(_header_cluster(lay)) > lay.cluster_size:
        code = errno.ENOSPC
    else:
        return None
    # QEMU prints a missing format with glibc's "(null)".
    fmt = lay.backing_fmt if lay.backing_fmt is not None else "(null)"
    return f"Could not assign backing file '{name}' with format '{fmt}': {os.strerror(code)}"


def _entry_size(lay: Qcow2Layout) -> int:
    """Bytes per L2 entry: an extended entry adds the subcluster bitmap."""
    return 16 if lay.extended_l2 else 8


def _fields(lay: Qcow2Layout) -> dict[str, Any]:
    return {name: getattr(lay, name) for name in Qcow2Layout.__slots__}


def _head_writes(lay: Qcow2Layout, alloc: _Allocator, l1: bytes) -> list[tuple[int, bytes]]:
    """The first clusters (header, refcount table, first refcount block, L1
    table ``l1``) and the refcount blocks ``alloc`` added, every cluster it
    handed out with refcount 1."""
    cs = lay.cluster_size
    total = alloc.next
    head = bytearray(image_bytes(lay, used=min(total, alloc.per_block)))
    head[len(head) - len(l1) :] = l1
    writes: list[tuple[int, bytes]] = []
    for index, cluster in sorted(alloc.refblocks.items()):
        head[cs + index * 8 : cs + index * 8 + 8] = struct.pack(">Q", cluster * cs)
        if index:
            used = min(alloc.per_block, total - index * alloc.per_block)
            writes.append((cluster * cs, _refblock(lay, used)))
    return [(0, bytes(head)), *writes]


class _Allocator:
    """Clusters handed out one after the other, as a fresh image's allocator
    does: a run whose clusters fall where no refcount block is yet gets one
    at the next free cluster (alloc_refcount_block), which may itself need
    one (it describes itself when it lies in its own range).  It starts with
    the L1 table after the three first clusters (qcow2_grow_l1_table)."""

    def __init__(self, lay: Qcow2Layout) -> None:
        self.per_block = lay.cluster_size * 8 >> lay.refcount_order
        self.max_blocks = lay.cluster_size // 8  # one refcount table cluster
        self.next = 3
        self.refblocks = {0: 2}
        l1_clusters = -(-lay.l1_size * 8 // lay.cluster_size)
        if l1_clusters:
            self.run(l1_clusters)

    def run(self, count: int) -> int:
        """Allocate ``count`` clusters; the first one."""
        start = self.next
        self.next += count
        for index in range(start // self.per_block, (start + count - 1) // self.per_block + 1):
            self._refblock(index)
        return start

    def _refblock(self, index: int) -> None:
        if index in self.refblocks:
            return
        if index >= self.max_blocks:
            # QEMU would grow the refcount table: not done here.
            raise GenericError("qcow2 images needing a larger refcount table are not supported yet")
        cluster = self.next
        self.next += 1
        self.refblocks[index] = cluster
        self._refblock(cluster // self.per_block)


def _l2_table(lay: Qcow2Layout, first_data: int, count: int) -> bytes:
    cs = lay.cluster_size
    # Preallocated clusters keep an all-zero subcluster bitmap (as QEMU's).
    fmt = ">QQ" if lay.extended_l2 else ">Q"
    pad = (0,) if lay.extended_l2 else ()
    entries = (struct.pack(fmt, (first_data + j) * cs | _COPIED, *pad) for j in range(count))
    return b"".join(entries).ljust(cs, b"\0")


def _refcount_blocks(clusters: int, lay: Qcow2Layout, generous: bool) -> tuple[int, int]:
    """qcow2_refcount_metadata_size's fixed point: (refcount blocks, table clusters)
    that count ``clusters`` clusters plus themselves."""
    per_block = lay.cluster_size * 8 >> lay.refcount_order
    per_table = lay.cluster_size // 8
    blocks = table = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n, generous = 0, False
        elif n == last:
            return blocks, table


def _preallocated_data(lay: Qcow2Layout) -> ImageWrites:
    """falloc/full (qcow2_co_truncate): the data clusters in one run.

    After the L1 table QEMU lays a refcount area (the refcount blocks the
    new clusters need, then a new refcount table, the old one freed) and the
    data clusters; the L2 tables are allocated afterwards, the first in the
    freed cluster 1, the others after the data.  Where the ways of counting
    the area QEMU might use disagree, or the table would need more than one
    cluster, the image is refused.
    """
    cs = lay.cluster_size
    entries = cs // _entry_size(lay)
    data_clusters = -(-lay.size // cs)
    start = 3 + -(-lay.l1_size * 8 // cs)
    counts = {
        _refcount_blocks(start + data_clusters + extra, lay, generous)
        for extra in (0, lay.l1_size)
        for generous in (False, True)
    }
    if len(counts) != 1 or next(iter(counts))[1] != 1:
        raise GenericError("qcow2 images needing a larger refcount table are not supported yet")
    blocks = next(iter(counts))[0]
    reftable = start + blocks - 1
    first_data = reftable + 1
    l2_clusters = [1] + [first_data + data_clusters + i for i in range(lay.l1_size - 1)]
    total = first_data + data_clusters + lay.l1_size - 1
    per_block = cs * 8 >> lay.refcount_order
    if -(-total // per_block) != blocks:
        raise GenericError("qcow2 images needing a larger refcount table are not supported yet")
    head = bytearray(image_bytes(lay, used=min(total, per_block), reftable_cluster=reftable))
    l1 = b"".join(struct.pack(">Q", c * cs | _COPIED) for c in l2_clusters)
    head[len(head) - len(l1) :] = l1
    writes: list[tuple[int, bytes]] = []
    for i, l2 in enumerate(l2_clusters):
        count = min(entries, data_clusters - i * entries)
        table = _l2_table(lay, first_data + i * entries, count)
        if l2 == 1:
            head[cs : 2 * cs] = table
        else:
            writes.append((l2 * cs, table))
    refblocks = [2] + [start + i for i in range(blocks - 1)]
    area = [(c * cs, _refblock(lay, min(per_block, total - i * per_block)))
            for i, c in enumerate(refblocks) if i]  # fmt: skip
    table = b"".join(struct.pack(">Q", c * cs) for c in refblocks).ljust(cs, b"\0")
    area.append((reftable * cs, table))
    return ImageWrites(
        [(0, bytes(head)), *area, *writes], total * cs, (first_data * cs, data_clusters * cs)
    )


def bare_image(lay: Qcow2Layout) -> bytes:
    """What qcow2_co_create writes before it opens the new image: a header
    of size 0 without extensions (its full 112-byte structure, v2 too), the
    refcount table pointing at an empty refcount block.  An open that then
    fails (the data file's permissions) leaves this."""
    cs = lay.cluster_size
    incompat = (8 if lay.zstd else 0) | (16 if lay.extended_l2 else 0)
    incompat |= 4 if lay.data_file is not None else 0
    header = struct.pack(
        ">IIQIIQIIQQIIQQQQII",
        MAGIC, lay.version, 0, 0, lay.cluster_bits, 0, 0, 0, 0, cs, 1, 0, 0,
        incompat, 1 if lay.lazy_refcounts else 0, 2 if lay.data_file_raw else 0,
        lay.refcount_order, _HEADER_V3,
    ) + bytes([1 if lay.zstd else 0])  # fmt: skip
    reftable = struct.pack(">Q", 2 * cs).ljust(cs, b"\0")
    return header.ljust(cs, b"\0") + reftable + bytes(cs)


def image_bytes(lay: Qcow2Layout, used: int = 0, reftable_cluster: int = 1) -> bytes:
    """Header cluster, refcount table, refcount block and L1 table of the new image.

    ``used``: clusters with refcount 1 (default: these); ``reftable_cluster``:
    where the header says the refcount table is.
    """
    cs = lay.cluster_size
    l1_clusters = -(-lay.l1_size * 8 // cs)
    cluster0 = _header_cluster(lay, reftable_cluster).ljust(cs, b"\0")
    reftable = struct.pack(">Q", 2 * cs).ljust(cs, b"\0")
    refblock = _refblock(lay, used or 3 + l1_clusters)
    return cluster0 + reftable + refblock + bytes(lay.l1_size * 8)


def _header_cluster(lay: Qcow2Layout, reftable_cluster: int = 1) -> bytes:
    """The header, its extensions and the backing file name (unpadded)."""
    cs = lay.cluster_size
    l1_size = lay.l1_size
    l1_offset = 3 * cs if l1_size else 0
    header_len = _HEADER_V3 if lay.version >= 3 else _HEADER_V2
    exts = b""
    if lay.backing_fmt:
        exts += _extension(EXT_BACKING_FORMAT, lay.backing_fmt.encode())
    if lay.data_file is not None:
        exts += _extension(EXT_DATA_FILE, lay.data_file.encode())
    # QEMU leaves the feature name table out of headers of 4 KiB clusters or less.
    if lay.version >= 3 and cs > 4096:
        table = b"".join(
            struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURES
        )
        exts += _extension(EXT_FEATURE_TABLE, table)
    exts += bytes(8)
    name = lay.backing_file.encode() if lay.backing_file else b""
    name_off = header_len + len(exts) if name else 0
    incompat = (8 if lay.zstd else 0) | (16 if lay.extended_l2 else 0)
    incompat |= 4 if lay.data_file is not None else 0
    compat = 1 if lay.lazy_refcounts else 0
    header = struct.pack(
        ">IIQIIQIIQQIIQ",
        MAGIC, lay.version, name_off, len(name), lay.cluster_bits, lay.size, 0,
        l1_size, l1_offset, reftable_cluster * cs, 1, 0, 0,
    )  # fmt: skip
    if lay.version >= 3:
        autoclear = 2 if lay.data_file_raw else 0
        header += struct.pack(">QQQII", incompat, compat, autoclear, lay.refcount_order, header_len)
        header += bytes([1 if lay.zstd else 0])
    return header.ljust(header_len, b"\0") + exts + name
