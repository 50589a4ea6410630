"""The bitmap model against a naive one (a set of granule numbers).

Checks what QEMU's digest and counts depend on: which granules a byte range
touches, the byte layout hashed by ``sha256`` (LSB-first, whole 64-bit words,
at least one), counts in whole granules, runs, merges across granularities
and truncation.  The layout itself was checked against qemu-storage-daemon
(tests/bitmaps/test_live.py); here the naive model is the reference.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpgraph.bitmaps.model import DirtyBitmap

GRANS = st.sampled_from([512, 1024, 4096, 65536])
SIZES = st.integers(min_value=0, max_value=3 << 20)


def naive_bytes(granules: set[int], size: int, gran: int) -> bytes:
    nbits = (size + gran - 1) // gran
    words = max(1, (nbits + 63) // 64)
    value = sum(1 << g for g in granules)
    return value.to_bytes(words * 8, "little")


def naive_set(granules: set[int], size: int, gran: int, offset: int, length: int) -> None:
    end = min(offset + length, size)
    if length > 0 and offset < end:
        granules.update(range(offset // gran, (end - 1) // gran + 1))


@settings(max_examples=150, deadline=None)
@given(
    gran=GRANS,
    size=SIZES,
    writes=st.lists(st.tuples(st.integers(0, 3 << 20), st.integers(0, 1 << 20)), max_size=12),
)
def test_set_count_sha_runs(gran: int, size: int, writes: list[tuple[int, int]]) -> None:
    bm = DirtyBitmap("b", size, gran)
    ref: set[int] = set()
    for offset, length in writes:
        bm.set_range(offset, length)
        naive_set(ref, size, gran, offset, length)
    assert bytes(bm.bits) == naive_bytes(ref, size, gran)
    assert bm.count() == len(ref) * gran
    assert bm.sha256() == hashlib.sha256(naive_bytes(ref, size, gran)).hexdigest()
    runs = [g for first, end in bm.granule_runs() for g in range(first, end)]
    assert runs == sorted(ref)
    for first, end in bm.granule_runs():  # runs are maximal
        assert first - 1 not in ref and end not in ref
    for lo, hi in bm.dirty_ranges():
        assert lo < hi <= size
    if ref:
        assert bm.get(min(ref) * gran)


@settings(max_examples=100, deadline=None)
@given(
    g1=GRANS,
    g2=GRANS,
    size=SIZES,
    writes=st.lists(st.tuples(st.integers(0, 3 << 20), st.integers(1, 1 << 19)), max_size=8),
)
def test_merge_across_granularities(
    g1: int, g2: int, size: int, writes: list[tuple[int, int]]
) -> None:
    src = DirtyBitmap("s", size, g1)
    dst = DirtyBitmap("d", size, g2)
    dst.set_range(0, 1)
    ref: set[int] = set()
    naive_set(ref, size, g2, 0, 1)
    for offset, length in writes:
        src.set_range(offset, length)
    # hbitmap_merge: every dirty source byte range is set in the target.
    for lo, hi in src.dirty_ranges():
        naive_set(ref, size, g2, lo, hi - lo)
    dst.merge_from(src)
    assert bytes(dst.bits) == naive_bytes(ref, size, g2)


@settings(max_examples=100, deadline=None)
@given(gran=GRANS, size=SIZES, new=SIZES, offset=st.integers(0, 3 << 20))
def test_truncate_keeps_bits_inside_the_new_size(
    gran: int, size: int, new: int, offset: int
) -> None:
    bm = DirtyBitmap("b", size, gran)
    bm.set_range(0, size)
    bm.truncate(new)
    ngran = (min(size, new) + gran - 1) // gran
    assert bytes(bm.bits) == naive_bytes(set(range(ngran)), new, gran)
    bm.set_range(offset, 1)
    assert bm.size == new


def test_clear_copy_restore() -> None:
    bm = DirtyBitmap("b", 1 << 20, 65536)
    bm.set_range(70000, 200000)
    saved = bm.copy_bits()
    bm.clear()
    assert bm.count() == 0
    bm.restore_bits(saved)
    assert bm.count() == 4 * 65536


@settings(max_examples=100, deadline=None)
@given(
    gran=GRANS,
    size=SIZES,
    writes=st.lists(st.tuples(st.integers(0, 3 << 20), st.integers(1, 1 << 19)), max_size=8),
    window=st.tuples(st.integers(0, 3 << 20), st.integers(0, 3 << 20)),
)
def test_dirty_ranges_in_a_window(
    gran: int, size: int, writes: list[tuple[int, int]], window: tuple[int, int]
) -> None:
    bm = DirtyBitmap("b", size, gran)
    for offset, length in writes:
        bm.set_range(offset, length)
    lo, hi = min(window), max(window)
    whole = list(bm.dirty_ranges())
    want = [(max(a, lo), min(b, hi)) for a, b in whole if max(a, lo) < min(b, hi)]
    assert list(bm.dirty_ranges(lo, hi)) == want
