"""Reading guest data through a qcow2 L1 table: the mapping shared by the
active layer (``Qcow2Image``) and internal snapshot views (``Qcow2Snapshot``).

``GuestMapping._runs`` walks the L1/L2 tables of a guest range and returns
maximal runs of one cluster kind (unallocated, zero, normal with contiguous
host offsets, compressed); ``readinto``/``read`` and ``block_status`` are
built on it, so a contiguous host range is one ``pread``.

What does not live here: L2/compressed-cluster caches, backing reads and
every write (``qcow2_io``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpgraph.drivers.qcow2_storage import Extent, Status, merge_extents, pread_full

if TYPE_CHECKING:
    from qmpgraph.drivers.qcow2_io import Qcow2Image

OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

# Cluster kinds, from an L2 entry.
UNALLOCATED, ZERO, NORMAL, COMPRESSED = range(4)


class GuestMapping:
    """Guest-to-host mapping through one L1 table (the active one or a snapshot's).

    Subclasses set ``image`` (the ``Qcow2Image`` whose caches, backing and
    files are used), ``l1`` and ``size``.
    """

    image: Qcow2Image
    l1: list[int]
    size: int

    def _runs(
        self, offset: int, length: int, first_only: bool = False
    ) -> list[tuple[int, int, int, int]]:
        """Maximal runs ``(kind, guest_offset, length, host)`` over the range.

        With ``first_only`` the walk stops where a second run would begin
        (block status wants one extent; walking the rest of the range for
        every extent would make a long query quadratic).

        ``host`` is the byte offset of the guest offset for NORMAL runs
        (contiguous on the host), the raw L2 entry for COMPRESSED runs (one
        cluster each), 1 for ZERO runs with a host cluster, else 0.
        """
        img = self.image
        cb, l2_bits = img.cluster_bits, img.l2_bits
        in_cluster = img.cluster_size - 1
        l2_mask = (1 << l2_bits) - 1
        v3 = img.header.version >= 3
        # With an external data file, 0 is a valid host offset: COPIED
        # (always set there) tells allocated from not.
        ext = OFLAG_COPIED if img.external_data else 0
        simple = self._one_run(offset, length)
        if simple is not None:
            return [simple]
        out: list[list[int]] = []
        pos, end = offset, offset + length
        cur: list[int] | None = None
        while pos < end:
            l1_index = pos >> (cb + l2_bits)
            l2_offset = self.l1[l1_index] & OFFSET_MASK if l1_index < len(self.l1) else 0
            slice_end = min(end, (l1_index + 1) << (cb + l2_bits))
            if not l2_offset:
                kind, host, n = UNALLOCATED, 0, slice_end - pos
                if cur is not None and cur[0] == kind:
                    cur[2] += n
                elif first_only and out:
                    break
                else:
                    cur = [kind, pos, n, 0]
                    out.append(cur)
                pos = slice_end
                continue
            table = img._l2(l2_offset)
            index = (pos >> cb) & l2_mask
            while pos < slice_end:
                entry = table[index]
                stop = min(slice_end, ((pos >> cb) + 1) << cb)
                n = stop - pos
                if entry & OFLAG_COMPRESSED:
                    kind, host = COMPRESSED, entry
                else:
                    host = entry & OFFSET_MASK
                    if v3 and entry & OFLAG_ZERO:
                        kind, host = ZERO, 1 if host or entry & ext else 0
                    elif host or entry & ext:
                        kind, host = NORMAL, host + (pos & in_cluster)
                    else:
                        kind = UNALLOCATED
                if (
                    cur is not None
                    and cur[0] == kind
                    and kind != COMPRESSED
                    and (kind != NORMAL or cur[3] + cur[2] == host)
                    and (kind != ZERO or cur[3] == host)
                ):
                    cur[2] += n
                elif first_only and out:
                    break
                else:
                    cur = [kind, pos, n, host]
                    out.append(cur)
                pos = stop
                index += 1
            if first_only and pos < slice_end:
                break
        return [(r[0], r[1], r[2], r[3]) for r in out]

    def _one_run(self, offset: int, length: int) -> tuple[int, int, int, int] | None:
        """The range as one run when it lies in one L2 table and its entries
        are all zero (unallocated) or one contiguous data run with equal flags
        (a copy's common case, compared in bulk); None for anything else, which
        the per-cluster walk of ``_runs`` answers (with the same result here)."""
        img = self.image
        cb = img.cluster_bits
        shift = cb + img.l2_bits
        l1_index = offset >> shift
        if length <= 0 or (offset + length - 1) >> shift != l1_index or l1_index >= len(self.l1):
            return None
        l2_offset = self.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return None
        table = img._l2(l2_offset)
        l2_mask = img.l2_entries - 1
        lo = (offset >> cb) & l2_mask
        hi = ((offset + length - 1) >> cb & l2_mask) + 1
        first = table[lo]
        if not first:
            return (UNALLOCATED, offset, length, 0) if not any(table[lo:hi]) else None
        host = first & OFFSET_MASK
        if not host or first & OFLAG_COMPRESSED or (first & OFLAG_ZERO and img.header.version >= 3):
            return None
        cs = img.cluster_size
        if hi - lo > 1 and table[lo:hi] != list(range(first, first + (hi - lo) * cs, cs)):
            return None
        return (NORMAL, offset, length, host + (offset & (cs - 1)))

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"request [{offset}, {offset + length}) is outside the image (size {self.size})"
            )

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the guest data at ``offset``."""
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        img = self.image
        into = getattr(img.data_host, "preadinto", None)
        for kind, guest, n, host in self._runs(offset, len(view)):
            dst = view[guest - offset : guest - offset + n]
            if kind == NORMAL:
                if into is None or into(host, dst) < n:
                    dst[:] = pread_full(img.data_host, host, n)
            elif kind == UNALLOCATED:
                img._read_backing(dst, guest)
            elif kind == ZERO:
                dst[:] = bytes(n)
            else:
                cluster = img._inflate(host)
                start = guest & (img.cluster_size - 1)
                dst[:] = cluster[start : start + n]

    def read(self, offset: int, length: int) -> bytes:
        """The guest data of [offset, offset + length)."""
        self._check_range(offset, length)
        runs = self._runs(offset, length)
        if len(runs) == 1 and runs[0][0] == NORMAL:
            # One contiguous host range: no staging buffer.
            return pread_full(self.image.data_host, runs[0][3], length)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents of [offset, offset + length), merged; see ``Extent``."""
        self._check_range(offset, length)
        img = self.image
        out: list[Extent] = []
        here = Status.ALLOCATED
        for kind, guest, n, _ in self._runs(offset, length):
            if kind in (NORMAL, COMPRESSED):
                out.append(Extent(guest, n, Status.DATA | here, 1))
            elif kind == ZERO:
                out.append(Extent(guest, n, Status.ZERO | here, 1))
            else:
                out.extend(img._backing_status(guest, n))
        return merge_extents(out)
