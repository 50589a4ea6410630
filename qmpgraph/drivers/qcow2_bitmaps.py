"""Persistent dirty bitmaps in qcow2 images (QEMU's block/qcow2-bitmap.c).

The format (docs/interop/qcow2.txt): autoclear bit 0 says the bitmaps header
extension (0x23852875: nb_bitmaps, reserved, directory size, directory
offset) is valid.  Each directory entry (8-byte aligned) holds the bitmap
table's offset and size, flags (bit 0 in_use, bit 1 auto = enabled), type 1,
granularity bits, the name; the table's big-endian entries point to clusters
of serialized bits (0 = all zeros; bit 0 without an offset = all ones).  The
serialized bits are HBitmap's last level, little-endian words: exactly
``DirtyBitmap.bits``.

* ``load(ctx, node, file_node)`` at open: every stored bitmap becomes a
  persistent ``DirtyBitmap`` (disabled without ``auto``; inconsistent,
  disabled and empty when ``in_use``; read-only on a read-only node).  A writable open
  marks them ``in_use`` in the image (in place, once the open committed), as
  QEMU does, so a crash leaves them inconsistent.
* ``store(node)`` at close (``blockdev-del``) and when the daemon exits:
  the persistent bitmaps are written to new clusters in QEMU's directory
  order (stored ones first, in their order, then new ones, newest first),
  the header extension and autoclear bit are rewritten, then the clusters
  of the old directory and tables are freed, so ``qemu-img check`` stays
  clean.  Inconsistent bitmaps keep their old entry and clusters.
* ``reopen_read_only`` / ``reopen_read_write``: a reopen that changes the
  node's access mode stores the bitmaps and makes them read-only (the image
  then holds them clean), or marks them in use again and writable.
* ``remove_stored``: ``block-dirty-bitmap-remove`` of a stored bitmap
  rewrites the directory without it at once (as QEMU does);
  ``image_bitmaps`` is the format-specific ``bitmaps`` list of queries, read
  from the image like QEMU's (flags as stored: ``in-use`` while open).

Only images whose ``file`` child is a ``file`` node (or a ``blkdebug`` over
one) are handled.  What does
not live here: the bitmap model and commands, the qcow2 header parser.
"""

from __future__ import annotations

import atexit
import contextlib
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpgraph.bitmaps import registry
from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.drivers.qcow2_discard import DiscardType, FreedClusters, passed_types
from qmpgraph.drivers.qcow2_refcount import Refcounts
from qmpgraph.drivers.qcow2_storage import FdFile, HostFile, Qcow2Error, pread_full
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.transactions.engine import Transaction

if TYPE_CHECKING:
    from qmpgraph.drivers.base import OpenContext

EXT_BITMAPS = 0x23852875
_EXT_FEATURE_TABLE = 0x6803F857
_KNOWN_BEFORE = (0xE2792ACA, 0x44415441, 0x0537BE77)  # backing fmt, data file, crypto
AUTOCLEAR_BITMAPS = 1 << 0
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_ALL_ONES = 1
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gbits, name, extra
_HEADER_EXT = struct.Struct(">IIQQ")


@dataclass(slots=True)
class _Stored:
    """What the image held at open: the directory, and each entry in order."""

    dir_offset: int
    dir_size: int
    # (name, table offset, table size, flags, granularity bits)
    entries: list[tuple[str, int, int, int, int]]


# Per open qcow2 node: its file node and what its image stored at open.
_FILES: dict[Node, Node] = {}
_STORED: dict[Node, _Stored] = {}


def _read_header(fd: int) -> bytes:
    return pread_full(FdFile(fd), 0, 65536)


def _be(fmt: str, raw: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(fmt, raw, offset)[0])


def _extensions(raw: bytes) -> list[tuple[int, bytes]]:
    """The header extensions (type, data) in file order (v3 headers)."""
    pos = _be(">I", raw, 100)  # header_length
    out: list[tuple[int, bytes]] = []
    while pos + 8 <= len(raw):
        ext_type, ext_len = struct.unpack_from(">II", raw, pos)
        pos += 8
        if ext_type == 0:
            break
        out.append((ext_type, raw[pos : pos + ext_len]))
        pos += (ext_len + 7) & ~7
    return out


def _read_directory(read: object, raw: bytes) -> _Stored | None:
    """The stored directory, when the extension is present and valid (autoclear set)."""
    if _be(">I", raw, 4) < 3 or not _be(">Q", raw, 88) & AUTOCLEAR_BITMAPS:
        return None
    for ext_type, data in _extensions(raw):
        if ext_type != EXT_BITMAPS or len(data) < _HEADER_EXT.size:
            continue
        nb, _, dir_size, dir_offset = _HEADER_EXT.unpack_from(data)
        assert callable(read)
        blob = read(dir_offset, dir_size)
        entries: list[tuple[str, int, int, int, int]] = []
        pos = 0
        for _ in range(nb):
            t_off, t_size, flags, _type, gbits, name_size, extra = _ENTRY.unpack_from(blob, pos)
            start = pos + _ENTRY.size + extra
            name = blob[start : start + name_size].decode("utf-8", "replace")
            entries.append((name, t_off, t_size, flags, gbits))
            pos += (_ENTRY.size + extra + name_size + 7) & ~7
        return _Stored(dir_offset, dir_size, entries)
    return None


def all_in_use(host: HostFile, raw: bytes) -> bool:
    """Whether the image's valid bitmaps extension lists only ``in_use`` bitmaps.

    Such bitmaps are never trusted again (QEMU marks them inconsistent), so a
    writer that does not track them may keep the extension: the qcow2 data
    path then leaves autoclear bit 0 set, and ``qemu-img check`` still counts
    the bitmaps' clusters (a crash leaves no leaks).
    """
    stored = _read_directory(lambda off, n: pread_full(host, off, n), raw)
    return stored is not None and all(e[3] & FLAG_IN_USE for e in stored.entries)


def _file_fd(file_node: Node | None) -> int | None:
    # blkdebug passes offsets through unchanged: its image's descriptor holds
    # the same bytes (iotest 257 puts it between qcow2 and the file).
    while file_node is not None and file_node.format_name == "blkdebug":
        image = next((e for e in file_node.children if e.name == "image"), None)
        file_node = image.child if image is not None else None
    state = file_node.state if file_node is not None else None
    if isinstance(state, FileState) and not state.lock.closed:
        return int(state.lock.fd)
    return None


def load(ctx: OpenContext, node: Node, file_node: Node) -> None:
    """qcow2_load_dirty_bitmaps: the image's bitmaps become the node's, at open."""
    fd = _file_fd(file_node)
    state = node.state
    if fd is None or not isinstance(state, Qcow2State) or state.header.version < 3:
        return
    _FILES[node] = file_node
    _register_exit_hook()
    raw = _read_header(fd)

    def read(offset: int, length: int) -> bytes:
        return pread_full(FdFile(fd), offset, length)

    stored = _read_directory(read, raw)
    if stored is None:
        return
    _STORED[node] = stored
    size = (state.header.size + 511) // 512 * 512
    cluster = state.header.cluster_size
    writable = bool(node.open_flags & OpenFlag.RDWR)
    for name, t_off, t_size, flags, gbits in stored.entries:
        bm = DirtyBitmap(name, size, 1 << gbits)
        bm.persistent = True
        bm.disabled = not flags & FLAG_AUTO
        bm.readonly = not writable
        if flags & FLAG_IN_USE:
            # bdrv_dirty_bitmap_set_inconsistent disables it too, auto or not.
            bm.inconsistent = True
            bm.disabled = True
        else:
            _load_bits(read, bm, t_off, t_size, cluster)
        registry.add(ctx.tran, ctx.graph, node, bm)
    if writable:
        ctx.tran.on_commit(lambda: _mark_in_use(fd, stored))


def _load_bits(read: object, bm: DirtyBitmap, t_off: int, t_size: int, cluster: int) -> None:
    """load_bitmap_data: each table entry is one cluster of serialized bits."""
    assert callable(read)
    table = struct.unpack(f">{t_size}Q", read(t_off, t_size * 8))
    bits = bm.bits
    for i, entry in enumerate(table):
        lo = i * cluster
        if lo >= len(bits):
            break
        hi = min(len(bits), lo + cluster)
        offset = entry & _OFFSET_MASK
        if offset:
            bits[lo:hi] = read(offset, hi - lo)
        elif entry & _ALL_ONES:
            bits[lo:hi] = b"\xff" * (hi - lo)
    # Bits past the last granule stay clear (a stored all-ones cluster covers them).
    bm.truncate(bm.size)


def _mark_in_use(fd: int, stored: _Stored) -> None:
    """Set in_use on every stored entry, in place (update_ext_header_and_dir_in_place)."""
    dirblob = bytearray(pread_full(FdFile(fd), stored.dir_offset, stored.dir_size))
    pos = 0
    for _ in stored.entries:
        t_off, t_size, flags, typ, gbits, name_size, extra = _ENTRY.unpack_from(dirblob, pos)
        _ENTRY.pack_into(dirblob, pos, t_off, t_size, flags | FLAG_IN_USE, typ, gbits,
                         name_size, extra)  # fmt: skip
        pos += (_ENTRY.size + extra + name_size + 7) & ~7
    FdFile(fd).pwrite(stored.dir_offset, bytes(dirblob))


def _disk_entries(fd: int, stored: _Stored) -> list[tuple[str, int, int, int, int]]:
    """The stored directory's entries as they are on disk now (flags included)."""
    raw = pread_full(FdFile(fd), stored.dir_offset, stored.dir_size)
    out: list[tuple[str, int, int, int, int]] = []
    pos = 0
    for _ in stored.entries:
        t_off, t_size, flags, _type, gbits, name_size, extra = _ENTRY.unpack_from(raw, pos)
        start = pos + _ENTRY.size + extra
        name = raw[start : start + name_size].decode("utf-8", "replace")
        out.append((name, t_off, t_size, flags, gbits))
        pos += (_ENTRY.size + extra + name_size + 7) & ~7
    return out


def image_bitmaps(node: Node) -> list[dict[str, object]] | None:
    """qcow2_get_bitmap_info_list: the image's stored bitmaps (None without any)."""
    stored = _STORED.get(node)
    fd = _file_fd(_FILES.get(node))
    if stored is None or not stored.entries or fd is None:
        return None
    out: list[dict[str, object]] = []
    for name, _t_off, _t_size, flags, gbits in _disk_entries(fd, stored):
        names = (["in-use"] if flags & FLAG_IN_USE else []) + (
            ["auto"] if flags & FLAG_AUTO else []
        )
        out.append({"flags": names, "name": name, "granularity": 1 << gbits})
    return out


def remove_stored(tran: Transaction, node: Node, name: str) -> None:
    """qcow2_co_remove_persistent_dirty_bitmap: drop ``name`` from the image now.

    As in QEMU this is not undone when a transaction aborts (the bitmap is
    stored again when the node closes).
    """
    del tran
    stored = _STORED.get(node)
    fd = _file_fd(_FILES.get(node))
    if stored is None or fd is None or node.read_only:
        return
    entries = _disk_entries(fd, stored)
    gone = [e for e in entries if e[0] == name]
    if not gone:
        return
    host = FdFile(fd)
    raw = bytearray(_read_header(fd))
    cluster_bits = _be(">I", raw, 20)
    cluster = 1 << cluster_bits
    refcounts = _refcounts(host, raw)
    _discarding(refcounts, fd, node)
    kept = [e for e in entries if e[0] != name]
    blob = b"".join(_entry_bytes(*e) for e in kept)
    dir_offset = 0
    if blob:
        dir_offset = refcounts.allocate((len(blob) + cluster - 1) // cluster)
        host.pwrite(dir_offset, blob)
    host.flush()
    _rewrite_header(host, raw, (len(kept), len(blob), dir_offset), cluster)
    host.flush()
    refcounts.free_bytes(stored.dir_offset, stored.dir_size)
    _, t_off, t_size, _flags, _gbits = gone[0]
    _free_table(host, refcounts, t_off, t_size)
    host.flush()
    if refcounts.discards is not None:
        refcounts.discards.process()
    _STORED[node] = _Stored(dir_offset, len(blob), kept)


def _entry_bytes(name: str, t_off: int, t_size: int, flags: int, gbits: int) -> bytes:
    """One directory entry, padded to 8 bytes."""
    name_b = name.encode()
    entry = _ENTRY.pack(t_off, t_size, flags, 1, gbits, len(name_b), 0) + name_b
    return entry.ljust((len(entry) + 7) & ~7, b"\0")


def _refcounts(host: FdFile, raw: bytes | bytearray) -> Refcounts:
    return Refcounts(
        host,
        cluster_bits=_be(">I", raw, 20),
        refcount_order=_be(">I", raw, 96),
        table_offset=_be(">Q", raw, 48),
        table_clusters=_be(">I", raw, 56),
    )


def forget(node: Node) -> None:
    """Drop what this module remembers of a closed node."""
    _FILES.pop(node, None)
    _STORED.pop(node, None)


def store(node: Node) -> None:
    """qcow2_store_persistent_dirty_bitmaps: write the node's persistent bitmaps."""
    file_node = node.file.child if node.file is not None else _FILES.get(node)
    fd = _file_fd(file_node)
    if fd is None:
        return
    old = _STORED.get(node)
    bitmaps = [bm for bm in registry.bitmaps_of(node) if bm.persistent and not bm.skip_store]
    if old is None and not bitmaps:
        return
    if not any(not bm.readonly and not bm.inconsistent for bm in bitmaps):
        # need_write: only read-only or inconsistent ones, nothing is written
        # (and a read-only node reports no error).
        return
    message = None
    if node.read_only:
        # bdrv_has_changed_persistent_bitmaps: loaded ones are read-only here.
        if any(not bm.readonly for bm in bitmaps):
            message = "No write access"
    else:
        try:
            _write(fd, node, old, bitmaps)
        except (OSError, ValueError, struct.error, Qcow2Error) as err:
            message = str(err)
    if message is not None or node.read_only:
        if message is not None:
            # QEMU reports and goes on closing (qcow2_inactivate).
            print(
                f"qmpgraph: Lost persistent bitmaps during inactivation of node "
                f"'{node.node_name}': {message}",
                file=sys.stderr,
            )
        return
    # The image now holds what was written; a later store frees these clusters.
    raw = _read_header(fd)
    _STORED[node] = _read_directory(lambda off, n: pread_full(FdFile(fd), off, n), raw) or _Stored(
        0, 0, []
    )


def _write(fd: int, node: Node, old: _Stored | None, bitmaps: list[DirtyBitmap]) -> None:
    host = FdFile(fd)
    raw = bytearray(_read_header(fd))
    cluster_bits = _be(">I", raw, 20)
    cluster = 1 << cluster_bits
    refcounts = _refcounts(host, raw)
    _discarding(refcounts, fd, node)
    by_name = {bm.name: bm for bm in bitmaps}
    old_entries = old.entries if old is not None else []
    # Directory order: stored ones keep theirs, new ones follow (newest first).
    order = [e[0] for e in old_entries if e[0] in by_name]
    order += [str(bm.name) for bm in bitmaps if bm.name not in order]
    kept_tables: set[int] = set()
    entries: list[bytes] = []
    for name in order:
        bm = by_name[name]
        old_entry = next((e for e in old_entries if e[0] == name), None)
        if bm.inconsistent and old_entry is not None:
            _, t_off, t_size, flags, gbits = old_entry
            kept_tables.add(t_off)
        else:
            t_off, t_size = _write_bits(host, refcounts, bm.bits, cluster)
            flags = 0 if bm.disabled else FLAG_AUTO
            gbits = bm.shift
        entries.append(_entry_bytes(name, t_off, t_size, flags, gbits))
    directory = b"".join(entries)
    dir_offset = 0
    if directory:
        dir_offset = refcounts.allocate((len(directory) + cluster - 1) // cluster)
        host.pwrite(dir_offset, directory)
    host.flush()
    _rewrite_header(host, raw, (len(entries), len(directory), dir_offset), cluster)
    host.flush()
    if old is not None:
        for _, t_off, t_size, _flags, _gbits in old.entries:
            if t_off and t_off not in kept_tables:
                _free_table(host, refcounts, t_off, t_size)
        if old.dir_size:
            _kind(refcounts, DiscardType.OTHER)
            refcounts.free_bytes(old.dir_offset, old.dir_size)
    host.flush()
    if refcounts.discards is not None:
        refcounts.discards.process()


def _write_bits(
    host: FdFile, refcounts: Refcounts, bits: bytearray, cluster: int
) -> tuple[int, int]:
    """store_bitmap: data clusters (all-zero ones left out), then the table."""
    n = (len(bits) + cluster - 1) // cluster
    table = []
    for i in range(n):
        chunk = bytes(bits[i * cluster : (i + 1) * cluster])
        if chunk.count(0) == len(chunk):
            table.append(0)
            continue
        offset = refcounts.allocate(1)
        host.pwrite(offset, chunk.ljust(cluster, b"\0"))
        table.append(offset)
    blob = struct.pack(f">{n}Q", *table)
    t_off = refcounts.allocate((len(blob) + cluster - 1) // cluster)
    host.pwrite(t_off, blob)  # bitmap_table_store writes the entries only
    return t_off, n


def _discarding(refcounts: Refcounts, fd: int, node: Node) -> None:
    """Clusters ``refcounts`` frees from now on are discarded in the file as the
    qcow2 node's discard options say (old directories and tables:
    QCOW2_DISCARD_OTHER, bitmap data clusters: QCOW2_DISCARD_ALWAYS)."""
    passed = passed_types(node, file_node=_FILES.get(node))
    if passed:
        refcounts.discards = FreedClusters(fd, refcounts.cluster_bits, passed, DiscardType.OTHER)


def _kind(refcounts: Refcounts, kind: DiscardType) -> None:
    if refcounts.discards is not None:
        refcounts.discards.kind = kind


def _free_table(host: FdFile, refcounts: Refcounts, t_off: int, t_size: int) -> None:
    """free_bitmap_clusters: the data clusters (always discarded), then the table."""
    table = struct.unpack(f">{t_size}Q", pread_full(host, t_off, t_size * 8))
    _kind(refcounts, DiscardType.ALWAYS)
    for entry in table:
        if entry & _OFFSET_MASK:
            refcounts.free_bytes(entry & _OFFSET_MASK, 1)
    _kind(refcounts, DiscardType.OTHER)
    refcounts.free_bytes(t_off, t_size * 8)


def _rewrite_header(
    host: FdFile, raw: bytearray, directory: tuple[int, int, int], cluster: int
) -> None:
    """qcow2_update_header's extension area, with the bitmaps extension in its place.

    ``directory`` is (nb_bitmaps, directory size, directory offset).
    """
    nb, dir_size, dir_offset = directory
    exts = [(t, d) for t, d in _extensions(bytes(raw)) if t != EXT_BITMAPS]
    if nb:
        data = _HEADER_EXT.pack(nb, 0, dir_size, dir_offset)
        at = 0
        for i, (t, _) in enumerate(exts):
            if t == _EXT_FEATURE_TABLE or t in _KNOWN_BEFORE:
                at = i + 1
        exts.insert(at, (EXT_BITMAPS, data))
    header_length = _be(">I", raw, 100)
    backing_offset, backing_size = _be(">Q", raw, 8), _be(">I", raw, 16)
    backing = bytes(raw[backing_offset : backing_offset + backing_size]) if backing_offset else b""
    area = bytearray()
    for t, d in exts:
        area += struct.pack(">II", t, len(d)) + d + bytes((-len(d)) % 8)
    area += bytes(8)  # end of extensions
    new_backing_offset = header_length + len(area) if backing else 0
    area += backing
    if header_length + len(area) > cluster:
        raise OSError("qcow2 header extensions do not fit in the first cluster")
    autoclear = _be(">Q", raw, 88)
    autoclear = autoclear | AUTOCLEAR_BITMAPS if nb else autoclear & ~AUTOCLEAR_BITMAPS
    struct.pack_into(">Q", raw, 88, autoclear)
    struct.pack_into(">Q", raw, 8, new_backing_offset)
    header = bytes(raw[:header_length]) + bytes(area)
    host.pwrite(0, header)


def _mark_all_in_use(node: Node) -> None:
    stored = _STORED.get(node)
    fd = _file_fd(_FILES.get(node))
    if stored is not None and stored.entries and fd is not None:
        with contextlib.suppress(OSError):
            _mark_in_use(fd, stored)


def reopen_read_only(tran: Transaction, node: Node) -> None:
    """qcow2_reopen_bitmaps_ro, in the driver's reopen prepare while the file is
    still writable: store the persistent bitmaps (clean, not in use) and make
    them read-only.  Nothing undoes it: qcow2_reopen_abort leaves the bitmaps
    stored and read-only on a node that stays writable (seen on qsd 7.2, both
    for a later check of the same entry and a permission failure; a read-write
    reopen makes them writable again)."""
    del tran
    persistent = [bm for bm in registry.bitmaps_of(node) if bm.persistent]
    if not persistent:
        return
    store(node)
    for bm in persistent:
        bm.readonly = True
    registry.touch()


def reopen_read_write(tran: Transaction, node: Node) -> None:
    """qcow2_reopen_bitmaps_rw, once a reopen to read-write committed (the file
    is writable again): the stored bitmaps are marked in use and become
    writable.  QEMU runs it after every such reopen; on a node that was
    already writable it only matters after a failed read-only reopen."""
    if node.open_flags & OpenFlag.RDWR and not any(
        bm.persistent and bm.readonly for bm in registry.bitmaps_of(node)
    ):
        return

    def done() -> None:
        _mark_all_in_use(node)
        for bm in registry.bitmaps_of(node):
            if bm.persistent and bm.readonly:
                bm.readonly = False
        registry.touch()

    tran.on_commit(done)


def store_all() -> None:
    """Store every open qcow2 node's persistent bitmaps (the daemon is exiting)."""
    for node in list(_FILES):
        with contextlib.suppress(OSError, ValueError, struct.error):
            store(node)


_exit_hook = False


def _register_exit_hook() -> None:
    """Store at exit; registered after the first image file was opened, because
    atexit runs newest first and the files' descriptors close in an older hook
    (``weakref.finalize``)."""
    global _exit_hook  # noqa: PLW0603 (one hook per process)
    if not _exit_hook:
        _exit_hook = True
        atexit.register(store_all)
