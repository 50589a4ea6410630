"""Which leftover key QEMU names in "Parameter 'X' is unexpected".

QEMU's JSON input visitor puts an object's keys into a GLib ``GHashTable``
(``g_str_hash``), removes each key as its member is visited, and at the end
reports the first key still in the table in *bucket* order. With two or more
unknown keys, which one is named therefore depends on GLib 2.74's open
addressing: the table's size history (it grows while keys are inserted and
shrinks while they are removed), tombstones, and its in-place rehash. This
module replays those operations on hashes alone.

What does not live here: the QDict order the keys are inserted in
(``qmpgraph.protocol.qjson.qdict_order``) and the visit order that removes
them (``qmpgraph.schema.visitor``).
"""

from __future__ import annotations

_MIN_SHIFT = 3
_PRIME_MOD = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
    65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
    33554393, 67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip
_UNUSED = 0
_TOMBSTONE = 1


def g_str_hash(key: str) -> int:
    """GLib's djb2 string hash over the key's bytes taken as *signed* chars."""
    h = 5381
    for byte in key.encode("utf-8", "surrogatepass"):
        h = (h * 33 + (byte - 0x100 if byte >= 0x80 else byte)) & 0xFFFFFFFF
    # Hash values 0 and 1 mark unused and removed slots.
    return h if h >= 2 else 2


class StrSet:
    """A ``GHashTable`` of string keys, replaying insert/remove/first-key."""

    __slots__ = ("_hashes", "_keys", "_mask", "_mod", "_nnodes", "_noccupied", "_size")

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self._hashes = [_UNUSED] * self._size
        self._keys: list[str | None] = [None] * self._size
        self._nnodes = 0
        self._noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self._size = 1 << shift
        self._mod = _PRIME_MOD[shift]
        self._mask = self._size - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & 0xFFFFFFFF) % self._mod

    def _lookup(self, key: str, h: int) -> int:
        i = self._index(h)
        step = 0
        tomb = -1
        while True:
            nh = self._hashes[i]
            if nh == _UNUSED:
                break
            if nh == h and self._keys[i] == key:
                return i
            if nh == _TOMBSTONE and tomb < 0:
                tomb = i
            step += 1
            i = (i + step) & self._mask
        return tomb if tomb >= 0 else i

    def insert(self, key: str) -> None:
        """``g_hash_table_insert(h, key, NULL)``."""
        h = g_str_hash(key)
        i = self._lookup(key, h)
        old = self._hashes[i]
        if old >= 2:
            return
        self._hashes[i] = h
        self._keys[i] = key
        self._nnodes += 1
        if old == _UNUSED:
            self._noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        """``g_hash_table_remove(h, key)`` (a no-op for absent keys)."""
        h = g_str_hash(key)
        i = self._lookup(key, h)
        if self._hashes[i] < 2:
            return
        self._hashes[i] = _TOMBSTONE
        self._keys[i] = None
        self._nnodes -= 1
        self._maybe_resize()

    def keys(self) -> list[str]:
        """Every key in ``g_hash_table_iter_next`` order (bucket order)."""
        return [
            k for h, k in zip(self._hashes, self._keys, strict=True) if h >= 2 and k is not None
        ]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._hashes[self._lookup(key, g_str_hash(key))] >= 2

    def first(self) -> str | None:
        """The key ``g_hash_table_iter_next`` returns first, if any."""
        for i, h in enumerate(self._hashes):
            if h >= 2:
                return self._keys[i]
        return None

    def _maybe_resize(self) -> None:
        size = self._size
        nocc = self._noccupied
        if (size > self._nnodes * 4 and size > 1 << _MIN_SHIFT) or size <= nocc + nocc // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self._size
        # GLib sizes the table for the live nodes times 1.333 (a C int).
        want = int(self._nnodes * 1.333)
        shift = 0
        while want:
            want >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self._size > old_size:
            self._hashes.extend([_UNUSED] * (self._size - old_size))
            self._keys.extend([None] * (self._size - old_size))
        relocated = [False] * max(self._size, old_size)
        hashes = self._hashes
        keys = self._keys
        # In-place rehash: each node is moved to its new probe position;
        # a live node found there is evicted and moved in turn.
        for i in range(old_size):
            nh = hashes[i]
            if nh < 2:
                hashes[i] = _UNUSED
                continue
            if relocated[i]:
                continue
            hashes[i] = _UNUSED
            key = keys[i]
            keys[i] = None
            while True:
                j = self._index(nh)
                step = 0
                while relocated[j]:
                    step += 1
                    j = (j + step) & self._mask
                relocated[j] = True
                replaced = hashes[j]
                hashes[j] = nh
                if replaced < 2:
                    keys[j] = key
                    break
                nh = replaced
                key, keys[j] = keys[j], key
        if self._size < old_size:
            del hashes[self._size :]
            del keys[self._size :]
        self._noccupied = self._nnodes


def first_leftover(inserted: list[str], removed: list[str]) -> str | None:
    """The key QEMU reports as unexpected after inserting ``inserted`` (QDict
    order) and removing ``removed`` (visit order)."""
    table = StrSet()
    for k in inserted:
        table.insert(k)
    for k in removed:
        table.remove(k)
    return table.first()
