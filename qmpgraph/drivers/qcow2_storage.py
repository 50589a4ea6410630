"""What the qcow2 data path reads and writes through: host files and block sources.

``HostFile`` is the narrow, synchronous interface ``Qcow2Image`` needs from
the file under it (the image file, or an external data file): positional
``pread``/``pwrite``, ``size``, ``flush`` and ``truncate``.  ``FdFile``
implements it over a POSIX file descriptor (``WatchedFdFile`` also reports
the ranges it wrote); an async I/O layer can wrap its own objects in
anything with these five methods (``qmpgraph.io.qcow2_graphfile.GraphFile``
goes through the block graph, with a ``discard`` method that
``qcow2_discard.freeing`` uses instead of punching holes in a descriptor).

``BlockSource`` is what a backing image must offer: a virtual ``size``,
``read`` and ``block_status``.  ``Qcow2Image`` is one; ``RawImage`` (a raw
file used as a backing image) is the other.  ``Extent`` and ``Status`` are
the block-status answer both return.

What does not live here: the qcow2 format itself (``qcow2_io``), refcounts
(``qcow2_refcount``), and any async or trio code.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

from qmpgraph.io.stats import record_fd_write


class Qcow2Error(Exception):
    """The image cannot be read or written as asked (corrupt, unsupported, read-only)."""


class HostFile(Protocol):
    """Positional I/O on the file under a format (image file or data file)."""

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (shorter only at end of file)."""

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (the file grows as needed)."""

    def size(self) -> int:
        """The file's current length in bytes."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def truncate(self, size: int) -> None:
        """Set the file's length."""


def pread_full(host: HostFile, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``, zeros past the end of the file."""
    if length <= 0:
        return b""
    data = host.pread(offset, length)
    if len(data) < length:
        data = bytes(data) + bytes(length - len(data))
    return data


class FdFile:
    """``HostFile`` over a file descriptor (``os.pread``/``os.pwrite``/``fdatasync``)."""

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self.fd = fd
        self.owned = owned

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> FdFile:
        """Open ``path`` (read-write unless ``read_only``); ``close`` closes it."""
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        return cls(fd, owned=True)

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``."""
        out = os.pread(self.fd, length, offset)
        # pread may return short on some file systems before EOF: loop.
        while len(out) < length:
            more = os.pread(self.fd, length - len(out), offset + len(out))
            if not more:
                break
            out += more
        return out

    def preadinto(self, offset: int, buf: memoryview) -> int:
        """Read into ``buf`` at ``offset`` (an optional ``HostFile`` extra that
        ``Qcow2Image.readinto`` uses to skip a copy); returns the bytes read."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            record_fd_write(self.fd, offset, done)
            view = view[done:]
            offset += done

    def pwritev(self, offset: int, bufs: list[bytes | bytearray | memoryview]) -> None:
        """Write the buffers back to back at ``offset`` (an optional ``HostFile``
        extra that ``Qcow2Image.write`` uses to skip joining them)."""
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            done = os.pwritev(self.fd, views[:1024], offset)  # IOV_MAX
            record_fd_write(self.fd, offset, done)
            offset += done
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]

    def size(self) -> int:
        """The file's length."""
        return os.fstat(self.fd).st_size

    def flush(self) -> None:
        """fdatasync the file."""
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        """ftruncate the file."""
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        """Close the descriptor if this object opened it."""
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WatchedFdFile(FdFile):
    """``FdFile`` that reports every write's range to ``on_write`` (after it,
    whatever its outcome), so the layer above can mark the file node's dirty
    bitmaps as QEMU's block layer does for a format driver's writes."""

    def __init__(self, fd: int, on_write: Callable[[int, int], None]) -> None:
        super().__init__(fd)
        self.on_write = on_write

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``, then report the range."""
        try:
            super().pwrite(offset, data)
        finally:
            self.on_write(offset, memoryview(data).nbytes)

    def pwritev(self, offset: int, bufs: list[bytes | bytearray | memoryview]) -> None:
        """Write the buffers back to back at ``offset``, then report the range."""
        try:
            super().pwritev(offset, bufs)
        finally:
            self.on_write(offset, sum(memoryview(b).nbytes for b in bufs))


class Status(enum.IntFlag):
    """Block-status flags.

    ``DATA`` and ``ZERO`` say how the range reads through the whole backing
    chain (NBD ``base:allocation``: a range without DATA is a hole);
    ``ALLOCATED`` says the image itself (depth 1) provides it.
    """

    DATA = 1
    ZERO = 2
    ALLOCATED = 4


class Extent(NamedTuple):
    """One block-status extent: ``depth`` is the 1-based chain layer that
    provides the range (1 = this image), 0 where no layer does (it reads as
    zeros), as NBD's ``qemu:allocation-depth`` reports it."""

    offset: int
    length: int
    flags: Status
    depth: int


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours with equal flags and depth."""
    out: list[Extent] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        if out and out[-1].flags == ext.flags and out[-1].depth == ext.depth:
            last = out[-1]
            out[-1] = Extent(last.offset, last.length + ext.length, last.flags, last.depth)
        else:
            out.append(ext)
    return out


class BlockSource(Protocol):
    """A readable virtual disk: what a qcow2 image's backing must be."""

    @property
    def size(self) -> int:
        """Virtual size in bytes."""

    def read(self, offset: int, length: int) -> bytes:
        """Guest data of [offset, offset + length) (within ``size``)."""

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering [offset, offset + length) (within ``size``)."""

    def close(self) -> None:
        """Release what the source opened itself."""


class RawImage:
    """A raw file as a ``BlockSource`` (a raw backing image)."""

    def __init__(self, host: HostFile, *, owned: bool = False) -> None:
        self.host = host
        self._owned = owned

    @property
    def size(self) -> int:
        """The file's length: a raw image's virtual size."""
        return self.host.size()

    def read(self, offset: int, length: int) -> bytes:
        """The file's bytes."""
        return pread_full(self.host, offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Everything is data, allocated at this layer."""
        return [Extent(offset, length, Status.DATA | Status.ALLOCATED, 1)]

    def close(self) -> None:
        """Close the file if this image opened it."""
        close = getattr(self.host, "close", None)
        if self._owned and close is not None:
            close()
