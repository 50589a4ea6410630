"""One dirty bitmap (QEMU's BdrvDirtyBitmap over an HBitmap), as plain data.

The bits live in a ``bytearray`` laid out exactly as the lowest level of
QEMU's HBitmap on a 64-bit little-endian host: bit ``i`` (granule ``i``) is
bit ``i % 8`` of byte ``i // 8``, and the array is padded with zeros to whole
64-bit words, at least one.  ``x-debug-block-dirty-bitmap-sha256`` hashes
exactly those bytes, so ``sha256()`` is QEMU's digest for the same writes.

Setting a range costs O(bytes of bitmap it covers); runs of set bits are
found with a bytes regex, so a large, sparse bitmap stays cheap.  The count is
in bytes, whole granules (HBitmap's ``count << granularity``).

What does not live here: which node holds which bitmaps, undo records and
the data-path hook (``registry.py``), the QMP commands.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator

# ``BDRV_BITMAP_MAX_NAME_SIZE``.
MAX_NAME_SIZE = 1023

# Creation order of bitmaps (and of the internal ones drivers make): queries
# list a node's bitmaps newest first, as QEMU's QLIST does.
_seq = itertools.count(1)


def next_seq() -> int:
    """The next creation sequence number."""
    return next(_seq)


_NONZERO = re.compile(rb"[^\x00]+")
_FULL_OR_BYTE = re.compile(rb"\xff+|[^\xff]")


def _array_len(size: int, granularity: int) -> int:
    """Bytes of the bit array for ``size`` bytes at ``granularity``."""
    nbits = (size + granularity - 1) // granularity
    words = max(1, (nbits + 63) // 64)
    return words * 8


class DirtyBitmap:
    """A dirty bitmap of one node: its flags and its bits."""

    __slots__ = (
        "bits",
        "busy",
        "disabled",
        "granularity",
        "inconsistent",
        "name",
        "persistent",
        "readonly",
        "seq",
        "shift",
        "size",
        "skip_store",
        "successor",
    )

    FLAG_NAMES = ("disabled", "persistent", "busy", "readonly", "inconsistent", "skip_store")

    def __init__(self, name: str | None, size: int, granularity: int) -> None:
        assert granularity > 0 and granularity & (granularity - 1) == 0
        self.seq = next_seq()
        self.name = name
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.bits = bytearray(_array_len(size, granularity))
        self.disabled = False
        self.persistent = False
        self.busy = False
        self.readonly = False
        self.inconsistent = False
        # A removal inside a transaction keeps the bitmap until commit but it
        # must not be written to the image meanwhile.
        self.skip_store = False
        # bdrv_dirty_bitmap_create_successor: while a backup job holds the
        # bitmap frozen, an anonymous bitmap records writes in its place.
        self.successor: DirtyBitmap | None = None

    # -- flags ---------------------------------------------------------------

    @property
    def recording(self) -> bool:
        """bdrv_dirty_bitmap_recording: enabled, or its successor is."""
        successor = self.successor
        return not self.disabled or (successor is not None and not successor.disabled)

    def flags(self) -> tuple[bool, bool, bool, bool, bool, bool]:
        """Every flag, for undo records and the digest."""
        return (
            self.disabled,
            self.persistent,
            self.busy,
            self.readonly,
            self.inconsistent,
            self.skip_store,
        )

    # -- bits ----------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> None:
        """hbitmap_set: mark every granule that ``[offset, offset+length)`` touches."""
        if length <= 0:
            return
        end = min(offset + length, self.size)
        if offset >= end:
            return
        first = offset >> self.shift
        last = (end - 1) >> self.shift
        self._set_bits(first, last)

    def _set_bits(self, first: int, last: int) -> None:
        bits = self.bits
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            bits[fb] |= ((0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))) & 0xFF
            return
        bits[fb] |= (0xFF << (first & 7)) & 0xFF
        if lb > fb + 1:
            bits[fb + 1 : lb] = b"\xff" * (lb - fb - 1)
        bits[lb] |= 0xFF >> (7 - (last & 7))

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty."""
        bit = offset >> self.shift
        return bool(self.bits[bit >> 3] >> (bit & 7) & 1)

    def clear(self) -> None:
        """hbitmap_reset_all."""
        self.bits = bytearray(len(self.bits))

    def copy_bits(self) -> bytes:
        """The bits, for an undo record (QEMU's backup HBitmap)."""
        return bytes(self.bits)

    def restore_bits(self, bits: bytes) -> None:
        """Put back what ``copy_bits()`` returned."""
        self.bits = bytearray(bits)

    def count(self) -> int:
        """bdrv_get_dirty_count: dirty granules times the granularity."""
        return int.from_bytes(self.bits, "little").bit_count() << self.shift

    def sha256(self) -> str:
        """hbitmap_sha256: the digest of the bit array's bytes."""
        return hashlib.sha256(self.bits).hexdigest()

    def granule_runs(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Runs of dirty granules as (first, end) granule numbers, in order.

        Only granules in ``[first, end)`` are looked at (runs are clipped).
        """
        nbits = len(self.bits) * 8
        end = nbits if end is None else min(end, nbits)
        if first >= end:
            return
        start = -1
        prev_end = -1
        lo_byte, hi_byte = first >> 3, (end + 7) >> 3
        for span in _NONZERO.finditer(self.bits, lo_byte, hi_byte):
            for part in _FULL_OR_BYTE.finditer(self.bits, span.start(), span.end()):
                pos = part.start()
                if part.group()[0] == 0xFF:
                    runs = [(pos * 8, part.end() * 8)]
                else:
                    runs = _byte_runs(part.group()[0], pos * 8)
                for run_lo, run_hi in runs:
                    lo, hi = max(run_lo, first), min(run_hi, end)
                    if lo >= hi:
                        continue
                    if lo == prev_end:
                        prev_end = hi
                        continue
                    if start >= 0:
                        yield start, prev_end
                    start, prev_end = lo, hi
        if start >= 0:
            yield start, prev_end

    def dirty_ranges(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Dirty byte ranges (start, end) inside ``[offset, end)`` and the bitmap's size.

        QEMU's bdrv_dirty_bitmap_next_dirty_area, repeated: granules are
        clipped to the window.
        """
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return
        for g0, g1 in self.granule_runs(offset >> self.shift, ((end - 1) >> self.shift) + 1):
            lo = max(g0 << self.shift, offset)
            hi = min(g1 << self.shift, end)
            if lo < hi:
                yield lo, hi

    def merge_from(self, src: DirtyBitmap) -> None:
        """hbitmap_merge: OR ``src`` in (any granularity; sizes are equal)."""
        if src.granularity == self.granularity:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(src.bits, "little")
            self.bits = bytearray(merged.to_bytes(len(self.bits), "little"))
            return
        for lo, hi in src.dirty_ranges():
            self.set_range(lo, hi - lo)

    def truncate(self, size: int) -> None:
        """hbitmap_truncate: new size; granules past a shrunk end are dropped."""
        nbits = (size + self.granularity - 1) >> self.shift
        new = bytearray(_array_len(size, self.granularity))
        keep = min(len(new), len(self.bits))
        new[:keep] = self.bits[:keep]
        # Clear the bits past the last granule inside the new size.
        if nbits < len(new) * 8:
            full, rest = divmod(nbits, 8)
            if rest and full < len(new):
                new[full] &= (1 << rest) - 1
                full += 1
            new[full:] = bytes(len(new) - full)
        self.bits = new
        self.size = size


def _byte_runs(value: int, base: int) -> list[tuple[int, int]]:
    """Runs of set bits of one byte, as granule numbers from ``base``."""
    runs: list[tuple[int, int]] = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((base + start, base + bit))
        else:
            bit += 1
    return runs
