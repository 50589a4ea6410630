"""The ``qcow2`` format driver: header parsing and children (control plane only).

Parses the header of images made by ``qemu-img create -f qcow2`` through the
``file`` child, with qcow2_do_open's checks in its order and its messages:
magic, version, cluster size, header length, feature bits, compression type,
refcount order, the reference count, snapshot and L1 tables, the runtime
options (cache sizes, lazy refcounts, overlap checks, encryption format), the
header extensions (backing format, external data file, feature names) and the
backing file name.  Children: ``file`` (IMAGE, or METADATA|PRIMARY with an
external data file), ``data-file`` (DATA) and ``backing`` (COW; opened by the
generic open path, from the header when the user gave no ``backing`` key).

What does not live here: the data path, image repair, encryption.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag, Role
from qmpgraph.protocol.qjson import qdict_order
from qmpgraph.transactions.actions import set_edge_role

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph
    from qmpgraph.transactions.engine import Transaction

MAGIC = 0x514649FB
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = 0x1F
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
COMPAT_LAZY_REFCOUNTS = 1 << 0
_V2_HEADER_LEN = 72
_V3_HEADER_LEN = 104
_HEADER_READ = 4096
_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21
_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
_UINT_MAX = (1 << 32) - 1
_MAX_REFTABLE = 8 << 20
_MAX_L1 = 32 << 20
_SNAPSHOT_HEADER = 40
_MAX_SNAPSHOTS = 65536
_BACKING_FORMAT_MAX = 16  # sizeof(bs->backing_format)
_DEFAULT_L2_CACHE_MAX = 32 << 20
_MIN_REFCOUNT_CACHE = 4  # clusters
_COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}
_SIZE_OPTIONS = ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size")


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The header fields the control plane needs."""

    version: int
    size: int
    cluster_bits: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    incompatible_features: int
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = _V2_HEADER_LEN
    compression_type: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits

    @property
    def has_data_file(self) -> bool:
        """Whether guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries carry subcluster bitmaps (16-byte entries)."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def compression(self) -> str:
        """The compression type's QAPI name."""
        return _COMPRESSION_NAMES.get(self.compression_type, "zlib")

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in an L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)


def _be32(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from(">I", raw, offset)[0])


def _be64(raw: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", raw, offset)[0])


def header_read_length(head: bytes) -> int:
    """How many bytes ``parse_header`` needs, given the first 104 (zero-padded)."""
    head = head.ljust(_V3_HEADER_LEN, b"\0")
    cluster_bits = min(max(_be32(head, 20), _MIN_CLUSTER_BITS), _MAX_CLUSTER_BITS)
    return max(_HEADER_READ, min(1 << cluster_bits, 1 << 16))


def _check_table(name: str, table: tuple[int, int], entry_len: int, max_bytes: int,
                 cluster_size: int) -> None:  # fmt: skip
    """qcow2_validate_table: a table's (offset, entries) against its limits."""
    offset, entries = table
    if entries > max_bytes // entry_len:
        raise GenericError(f"{name} too large")
    if _INT64_MAX - entries * entry_len < offset or offset % cluster_size:
        raise GenericError(f"{name} offset invalid")


def _unsupported_features(raw: bytes, start: int, end: int, mask: int) -> str:
    """report_unsupported_feature's list: names from the feature table, then the rest."""
    names: list[str] = []
    for ext_type, data in _extensions(raw, start, end):
        if ext_type != EXT_FEATURE_TABLE:
            continue
        for pos in range(0, len(data) - 47, 48):
            kind, bit = data[pos], data[pos + 1]
            name = data[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
            if kind == 0 and bit < 64 and mask & (1 << bit):
                names.append(name)
                mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def _extensions(raw: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """Header extensions between ``start`` and ``end`` (bytes past the data read as 0)."""
    out: list[tuple[int, bytes]] = []
    pos = start
    while pos < end:
        head = raw[pos : pos + 8].ljust(8, b"\0")
        ext_type, ext_len = struct.unpack(">II", head)
        pos += 8
        if pos > end or ext_len > end - pos:
            raise GenericError("Header extension too large")
        if ext_type == EXT_END:
            break
        out.append((ext_type, raw[pos : pos + ext_len].ljust(ext_len, b"\0")))
        pos += (ext_len + 7) & ~7
    return out


def _c_string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_header(
    raw: bytes, *, writable: bool = False, options: dict[str, Any] | None = None
) -> Qcow2Header:
    """Parse and validate a qcow2 header as qcow2_do_open does (QEMU's messages).

    ``raw`` holds the start of the image (bytes past its end read as zeros);
    ``writable`` is whether the node opens read-write (corrupt images refuse);
    ``options`` are the node's qcow2 runtime options, checked after the
    header fields and before the header extensions, as QEMU does.  (QEMU
    opens an explicit ``data-file`` before it reads the backing file name;
    here the name is read first, which only matters if both are broken.)
    """
    header = _parse_fields(raw, writable)
    _check_options(header, options or {})
    return parse_backing_name(raw, parse_extensions(raw, header))


def _parse_fields(raw: bytes, writable: bool) -> Qcow2Header:
    head = raw[:_V3_HEADER_LEN].ljust(_V3_HEADER_LEN, b"\0")
    magic, version = struct.unpack_from(">II", head, 0)
    bf_off, _, cluster_bits, size = struct.unpack_from(">QIIQ", head, 8)
    crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off = struct.unpack_from(
        ">IIQQIIQ", head, 32
    )
    if magic != MAGIC:
        raise GenericError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise GenericError(f"Unsupported qcow2 version {version}")
    if cluster_bits < _MIN_CLUSTER_BITS or cluster_bits > _MAX_CLUSTER_BITS:
        raise GenericError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompat = compat = autoclear = 0
    refcount_order, header_length = 4, _V2_HEADER_LEN
    if version == 3:
        incompat, compat, autoclear = struct.unpack_from(">QQQ", head, 72)
        refcount_order, header_length = struct.unpack_from(">II", head, 96)
        if header_length < _V3_HEADER_LEN:
            raise GenericError("qcow2 header too short")
    if header_length > cluster_size:
        raise GenericError("qcow2 header exceeds cluster size")
    if bf_off > cluster_size:
        raise GenericError("Invalid backing file offset")
    ext_end = bf_off if bf_off else cluster_size
    compression = 0
    if header_length > _V3_HEADER_LEN and len(raw) > _V3_HEADER_LEN:
        compression = raw[_V3_HEADER_LEN]
    if compression not in _COMPRESSION_NAMES:
        raise GenericError(f"qcow2: unknown compression type: {compression}")
    if compression == 0 and incompat & INCOMPAT_COMPRESSION:
        raise GenericError("qcow2: Compression type incompatible feature bit must not be set")
    if compression != 0 and not incompat & INCOMPAT_COMPRESSION:
        raise GenericError("qcow2: Compression type incompatible feature bit must be set")
    if incompat & ~_INCOMPAT_KNOWN:
        features = _unsupported_features(raw, header_length, ext_end, incompat & ~_INCOMPAT_KNOWN)
        raise GenericError(f"Unsupported qcow2 feature(s): {features}")
    if incompat & INCOMPAT_CORRUPT and writable:
        raise GenericError("qcow2: Image is corrupt; cannot be opened read/write")
    subcluster = cluster_size // (32 if incompat & INCOMPAT_EXTL2 else 1)
    if subcluster < 1 << _MIN_CLUSTER_BITS:
        raise GenericError(f"Unsupported subcluster size: {subcluster}")
    if refcount_order > 6:
        raise GenericError("Reference count entry width too large; may not exceed 64 bits")
    if rt_clusters == 0:
        raise GenericError("Image does not contain a reference count table")
    _check_table("Reference count table", (rt_off, rt_clusters), cluster_size, _MAX_REFTABLE,
                 cluster_size)  # fmt: skip
    _check_table("Snapshot table", (snap_off, nb_snap), _SNAPSHOT_HEADER,
                 _SNAPSHOT_HEADER * _MAX_SNAPSHOTS, cluster_size)  # fmt: skip
    _check_table("Active L1 table", (l1_off, l1_size), 8, _MAX_L1, cluster_size)
    header = Qcow2Header(
        version, size, cluster_bits, None, None, None, incompat, compat, autoclear,
        refcount_order, header_length, compression, crypt, l1_size, l1_off, nb_snap, snap_off,
    )  # fmt: skip
    shift = cluster_bits + header.l2_bits
    l1_needed = (size + (1 << shift) - 1) >> shift
    if l1_needed > _INT_MAX:
        raise GenericError("Image is too big")
    if l1_size < l1_needed:
        raise GenericError("L1 table is too small")
    return header


def parse_extensions(raw: bytes, header: Qcow2Header) -> Qcow2Header:
    """The header extensions and the backing file name (qcow2_do_open's later steps)."""
    ext_end = _be64(raw.ljust(16, b"\0"), 8) or header.cluster_size
    backing_format = data_file = None
    for ext_type, data in _extensions(raw, header.header_length, ext_end):
        if ext_type == EXT_BACKING_FORMAT:
            if len(data) >= _BACKING_FORMAT_MAX:
                raise GenericError(
                    f"ERROR: ext_backing_format: len={len(data)} too large "
                    f"(>={_BACKING_FORMAT_MAX})"
                )
            backing_format = _c_string(data)
        elif ext_type == EXT_DATA_FILE:
            data_file = _c_string(data)
    return replace(header, backing_format=backing_format, data_file=data_file)


def parse_backing_name(raw: bytes, header: Qcow2Header) -> Qcow2Header:
    """The backing file name stored in the header, if any."""
    head = raw.ljust(24, b"\0")
    bf_off, bf_size = _be64(head, 8), _be32(head, 16)
    if not bf_off:
        return header
    if bf_size > min(1023, header.cluster_size - bf_off):
        raise GenericError("Backing file name too long")
    name = raw[bf_off : bf_off + bf_size].ljust(bf_size, b"\0")
    return replace(header, backing_file=_c_string(name))


def _check_options(header: Qcow2Header, options: dict[str, Any]) -> None:
    """qcow2_update_options_prepare's checks of the runtime options."""
    for key in qdict_order([k for k in options if k in _SIZE_OPTIONS]):
        if int(options[key]) < 0:
            raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")
    cluster = header.cluster_size
    entry = 16 if header.extended_l2 else 8
    max_l2_entries = -(-(header.size // 512 * 512) // cluster)
    max_l2_cache = -(-(max_l2_entries * entry) // cluster) * cluster
    combined = options.get("cache-size")
    l2_setting = int(options.get("l2-cache-size", _DEFAULT_L2_CACHE_MAX))
    refcount = int(options.get("refcount-cache-size", 0))
    l2_cache = min(max_l2_cache, l2_setting)
    if combined is not None:
        combined = int(combined)
        if "l2-cache-size" in options and "refcount-cache-size" in options:
            raise GenericError(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
            )
        if "l2-cache-size" in options and l2_setting > combined:
            raise GenericError("l2-cache-size may not exceed cache-size")
        if refcount > combined:
            raise GenericError("refcount-cache-size may not exceed cache-size")
        if "l2-cache-size" not in options:
            if "refcount-cache-size" in options:
                l2_cache = combined - refcount
            elif combined >= max_l2_cache + _MIN_REFCOUNT_CACHE * cluster:
                l2_cache = max_l2_cache
            else:
                l2_cache = combined - min(combined, _MIN_REFCOUNT_CACHE * cluster)
    entry_size = int(options.get("l2-cache-entry-size", cluster))
    if l2_cache < max_l2_cache and "l2-cache-entry-size" not in options:
        entry_size = min(cluster, 4096)
    if entry_size < 512 or entry_size > cluster or entry_size & (entry_size - 1):
        raise GenericError(
            "L2 cache entry size must be a power of two between 512 and the cluster size "
            f"({cluster})"
        )
    if max(l2_cache // entry_size, 2) > _INT_MAX:
        raise GenericError("L2 cache size too big")
    if max(refcount // cluster, _MIN_REFCOUNT_CACHE) > _INT_MAX:
        raise GenericError("Refcount cache size too big")
    # QemuOpts reads the number unsigned: a negative interval wraps around.
    if int(options.get("cache-clean-interval", 600)) % (1 << 64) > _UINT_MAX:
        raise GenericError("Cache clean interval too big")
    lazy = options.get("lazy-refcounts", bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS))
    if lazy and header.version < 3:
        raise GenericError(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
        )
    overlap = options.get("overlap-check")
    template = overlap.get("template") if isinstance(overlap, dict) else None
    if isinstance(overlap, str) and template is not None and overlap != template:
        raise GenericError(
            f"Conflicting values for qcow2 options 'overlap-check' ('{overlap}') and "
            f"'overlap-check.template' ('{template}')"
        )
    encrypt = options.get("encrypt")
    fmt = encrypt.get("format") if isinstance(encrypt, dict) else None
    if fmt is not None and header.crypt_method == 0:
        raise GenericError(f"No encryption in image header, but options specified format '{fmt}'")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An internal snapshot as SnapshotInfo reports it."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None
    disk_size: int | None = None  # None: not recorded (the image's size applies)


def read_snapshots(read: Any, offset: int, count: int) -> tuple[Snapshot, ...]:
    """The snapshot table: ``count`` entries from ``offset``, via ``read(offset, length)``."""
    out: list[Snapshot] = []
    for _ in range(count):
        head = read(offset, _SNAPSHOT_HEADER).ljust(_SNAPSHOT_HEADER, b"\0")
        _, _, id_len, name_len, date_sec, date_nsec, clock, vm_state, extra_len = struct.unpack(
            ">QIHHIIQII", head
        )
        offset += _SNAPSHOT_HEADER
        extra = read(offset, extra_len).ljust(extra_len, b"\0")
        offset += extra_len
        if extra_len >= 8:
            vm_state = _be64(extra, 0)
        # icount is -1 when unknown (and absent in older extra data).
        icount = _be64(extra, 16) if extra_len >= 24 else None
        if icount == (1 << 64) - 1:
            icount = None
        disk_size = _be64(extra, 8) if extra_len >= 16 else None
        text = read(offset, id_len + name_len).ljust(id_len + name_len, b"\0")
        offset = (offset + id_len + name_len + 7) & ~7
        ident = text[:id_len].decode("utf-8", "replace")
        name = text[id_len:].decode("utf-8", "replace")
        out.append(Snapshot(ident, name, vm_state, date_sec, date_nsec, clock, icount, disk_size))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Qcow2State:
    """Per-node state of a qcow2 node."""

    header: Qcow2Header
    snapshots: tuple[Snapshot, ...] = ()
    #: bs->auto_backing_file: the header's backing name at open, then the
    #: implicitly opened backing node's filename, or change-backing-file's name.
    #: The filename refresh compares it with the backing child's filename.
    auto_backing_file: str = ""

    @property
    def size(self) -> int:
        """Virtual size in bytes (whole sectors, as bs->total_sectors holds it)."""
        return self.header.size // 512 * 512


class Qcow2(Driver):
    """qcow2: QEMU's native format, with backing files and external data files."""

    format_name = "qcow2"
    is_format = True
    supports_backing = True
    options = frozenset(
        {
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
            "encrypt",
        }
    )
    # qcow2_mutable_opts: everything but the encryption options.
    mutable_options = options - {"encrypt"}

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """qcow2_reopen_prepare absorbs every qcow2 runtime option (encrypt.* too)."""
        del graph, node
        for key in [k for k in options if k.split(".", 1)[0] in self.options]:
            del options[key]
        return None

    children = (
        ChildSpec("file", Role.IMAGE),
        ChildSpec("data-file", Role.DATA, required=False),
        ChildSpec("backing", Role.COW, required=False),
    )

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file``, validate the header and options, then open ``data-file``."""
        rest = {k: v for k, v in options.items() if k != "backing"}
        self.reject_unknown(rest)
        edge = ctx.open_child(node, options, "file", Role.IMAGE)
        assert edge is not None and edge.child is not None
        child = edge.child
        assert child.driver is not None
        raw = child.driver.read(child, 0, _HEADER_READ)
        need = header_read_length(raw)
        if need > len(raw):
            raw = child.driver.read(child, 0, need)
        writable = bool(node.open_flags & OpenFlag.RDWR)
        header = parse_header(raw, writable=writable, options=options)
        data_edge = None
        if "data-file" in options:
            data_edge = ctx.open_child(node, options, "data-file", Role.DATA)
        if header.has_data_file:
            if data_edge is None and header.data_file:
                implicit = {"driver": "file", "filename": header.data_file}
                data_edge = ctx.open_child(node, {}, "data-file", Role.DATA, implicit=implicit)
            if data_edge is None:
                raise GenericError("'data-file' is required for this image")
            set_edge_role(ctx.tran, edge, Role.METADATA | Role.PRIMARY)
        else:
            if data_edge is not None:
                raise GenericError(
                    "'data-file' can only be set for images with an external data file"
                )
            if header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
                raise GenericError("data-file-raw requires a data file")
        if header.incompatible_features & INCOMPAT_DIRTY and writable:
            # A writable open repairs a dirty image and clears the bit.
            header = replace(header, incompatible_features=header.incompatible_features & ~1)
        snapshots = read_snapshots(
            lambda off, n: child.driver.read(child, off, n) if n else b"",
            header.snapshots_offset,
            header.nb_snapshots,
        )
        node.state = Qcow2State(header, snapshots, header.backing_file or "")
        # Persistent dirty bitmaps stored in the image (qcow2_load_dirty_bitmaps).
        from qmpgraph.drivers import qcow2_bitmaps  # noqa: PLC0415 (it imports this module)

        qcow2_bitmaps.load(ctx, node, child)

    def reopen_bitmaps(self, tran: Transaction, node: Node, *, read_only: bool) -> None:
        """qcow2_reopen_bitmaps_ro (in prepare) / _rw (after commit)."""
        from qmpgraph.drivers import qcow2_bitmaps  # noqa: PLC0415 (it imports this module)

        if read_only:
            qcow2_bitmaps.reopen_read_only(tran, node)
        else:
            qcow2_bitmaps.reopen_read_write(tran, node)

    def close(self, node: Node) -> None:
        """qcow2_close: store the persistent dirty bitmaps, then drop the node's."""
        from qmpgraph.bitmaps import registry  # noqa: PLC0415 (only closing needs it)
        from qmpgraph.drivers import qcow2_bitmaps  # noqa: PLC0415 (it imports this module)

        qcow2_bitmaps.store(node)
        qcow2_bitmaps.forget(node)
        registry.forget(node)

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Guest data for format probes: zeros (clusters are not mapped here)."""
        del node, offset
        return bytes(length)

    def set_auto_backing_file(self, node: Node, name: str) -> None:
        """Record the implicitly opened backing node's filename (open path only)."""
        state = node.state
        if isinstance(state, Qcow2State):
            node.state = replace(state, auto_backing_file=name)

    def header_backing(self, node: Node) -> tuple[str, str | None] | None:
        """(backing file name, format) from the header, for the implicit backing open."""
        state = node.state
        if isinstance(state, Qcow2State) and state.header.backing_file:
            return state.header.backing_file, state.header.backing_format
        return None


DRIVERS = (Qcow2(),)
