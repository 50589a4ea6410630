"""QEMU's image locking: permission bits as OFD byte-range locks on the image file.

The scheme is file-posix's (QEMU 7.2), so qmpgraph and real QEMU processes
(qemu-storage-daemon, qemu-img, qemu-io, a VM) see each other's claims:

* bit ``i`` of a node's cumulative *perm* is advertised by a shared (read)
  lock on byte ``100 + i``; bit ``i`` it does *not share* by a shared lock on
  byte ``200 + i``.  Only bits of ``PERM_ALL`` (0..3 in 7.2) are used.
* a user wanting perm bit ``i`` tests byte ``200 + i`` ("does anyone unshare
  it?"), and for each bit it does not share tests byte ``100 + i`` ("does
  anyone hold it?").  The test asks for an exclusive lock with F_OFD_GETLK,
  which reports any other open file description's lock, also one of the same
  process: two file nodes on one path conflict like two processes do.
* locks are open-file-description (OFD) locks, tied to the node's own
  descriptor: closing it (node deleted, process exit) drops them all.

Per node, ``ImageLock`` mirrors the three steps the permission refresh drives:
``prepare`` (check_perm: lock the union of old and new bits first, so nothing
can slip in between, then test for conflicts), ``commit`` (set_perm: keep
exactly the new bits) and ``abort`` (abort_perm_update: back to the old bits).
Locking is skipped for ``locking=off``, for ``auto`` without OFD support, and
for inactive nodes.

What does not live here: the ``file`` driver's open and option handling
(``qmpgraph.drivers.file``), and the permission rules themselves.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
import weakref

from qmpgraph.errors import GenericError
from qmpgraph.graph.perms import PERM_ALL, perm_message_names

# Libvirt owns byte 0; QEMU starts well above it (file-posix's layout).
PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200

# Linux values; Python exposes them on Linux since 3.9, the literals are a fallback.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock: l_type, l_whence, l_start, l_len, l_pid, in native layout.  The
# kernel's struct may carry tail padding the format does not; 32 bytes covers it.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_BUFSIZE = max(_FLOCK.size, 32)

_BITS = tuple(1 << i for i in range(PERM_ALL.bit_length()))


def _flock(lock_type: int, offset: int) -> bytes:
    return _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0).ljust(_FLOCK_BUFSIZE, b"\0")


@functools.cache
def ofd_supported() -> bool:
    """Whether the kernel has OFD locks (QEMU probes the same way, on /dev/null)."""
    try:
        fd = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, 0))
    except OSError as err:
        return err.errno != errno.EINVAL
    finally:
        os.close(fd)
    return True


def _lock_cmds() -> tuple[int, int]:
    """(set, get) commands: OFD locks, or process-wide POSIX locks as QEMU's fallback."""
    if ofd_supported():
        return F_OFD_SETLK, F_OFD_GETLK
    return fcntl.F_SETLK, fcntl.F_GETLK


def lock_byte(fd: int, offset: int) -> int:
    """Take a shared lock on one byte; 0 or the errno."""
    return _setlk(fd, fcntl.F_RDLCK, offset)


def unlock_byte(fd: int, offset: int) -> int:
    """Release one byte; 0 or the errno."""
    return _setlk(fd, fcntl.F_UNLCK, offset)


def _setlk(fd: int, lock_type: int, offset: int) -> int:
    cmd = _lock_cmds()[0]
    while True:
        try:
            fcntl.fcntl(fd, cmd, _flock(lock_type, offset))
        except InterruptedError:
            continue
        except OSError as err:
            return err.errno or errno.EIO
        return 0


def test_byte(fd: int, offset: int) -> int:
    """0 if nobody else holds a lock on the byte, EAGAIN if someone does, else the errno."""
    try:
        raw = fcntl.fcntl(fd, _lock_cmds()[1], _flock(fcntl.F_WRLCK, offset))
    except OSError as err:
        return err.errno or errno.EIO
    lock_type = _FLOCK.unpack_from(raw)[0]
    return 0 if lock_type == fcntl.F_UNLCK else errno.EAGAIN


def _lock_error(err: int, text: str) -> GenericError:
    # "Somebody holds it" is the expected case: QEMU then leaves out strerror.
    if err in (errno.EAGAIN, errno.EACCES):
        return GenericError(text)
    return GenericError(f"{text}: {os.strerror(err)}")


class ImageLockError(GenericError):
    """A lock conflict, with QEMU's hint naming the image (shown by command-line front ends)."""

    def __init__(self, desc: str, hint: str) -> None:
        super().__init__(desc)
        self.hint = hint


def holders(fd: int) -> tuple[int, int]:
    """(perm, unshared) bits other descriptors hold on the file: for tests and tools."""
    perm = sum(b for i, b in enumerate(_BITS) if test_byte(fd, PERM_LOCK_BASE + i))
    unshared = sum(b for i, b in enumerate(_BITS) if test_byte(fd, SHARED_LOCK_BASE + i))
    return perm, unshared


class ImageLock:
    """The lock bytes one open image descriptor holds, driven by check/set/abort_perm.

    ``perm``/``shared`` are the committed permissions; ``locked_perm`` and
    ``locked_unshared`` are the bits whose bytes are locked right now (between
    ``prepare`` and ``commit``/``abort`` they may cover old and new bits).
    The descriptor is owned: ``close`` (or garbage collection, as a safety net
    for graphs that are simply dropped) closes it, which releases every lock.
    """

    def __init__(self, fd: int, filename: str, *, use_lock: bool) -> None:
        self.fd = fd
        self.filename = filename
        self.use_lock = use_lock
        self.perm = 0
        self.shared = PERM_ALL
        self.locked_perm = 0
        self.locked_unshared = 0
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def closed(self) -> bool:
        """Whether the descriptor was closed."""
        return not self._closer.alive

    def close(self) -> None:
        """Close the descriptor: the kernel drops all its locks."""
        self._closer()

    def moved_to(self, fd: int) -> ImageLock:
        """The same lock bytes and permissions on a new descriptor ``fd`` (now owned).

        For a reopen that switches the access mode: the new descriptor takes
        every byte this one holds, then this one releases them (its own bytes
        would conflict with the new descriptor's tests: OFD locks of two open
        file descriptions) but stays open, so ``take_back`` can undo the move.
        No other process sees a gap.  Raises GenericError (``fd`` closed) if
        a byte cannot be locked.
        """
        new = ImageLock(fd, self.filename, use_lock=self.use_lock)
        if self.use_lock and not self.closed:
            error = new._apply(self.locked_perm, self.locked_unshared, unlock=False)
            if error is not None:
                new.close()
                raise error
            self._apply(0, 0, unlock=True)  # only unlocks: cannot fail
        new.perm, new.shared = self.perm, self.shared
        return new

    def take_back(self, new: ImageLock) -> None:
        """Undo ``moved_to``: lock again what ``new`` holds, then close ``new``."""
        if self.use_lock and not self.closed and not new.closed:
            self._apply(new.locked_perm, new.locked_unshared, unlock=True)
        new.close()

    def _apply(self, perm: int, unshared: int, *, unlock: bool) -> GenericError | None:
        """Lock the bytes of ``perm`` and ``unshared``; with ``unlock``, release the rest."""
        for base, want, attr in (
            (PERM_LOCK_BASE, perm, "locked_perm"),
            (SHARED_LOCK_BASE, unshared, "locked_unshared"),
        ):
            for i, bit in enumerate(_BITS):
                held = getattr(self, attr) & bit
                if want & bit and not held:
                    err = lock_byte(self.fd, base + i)
                    if err:
                        return _lock_error(err, f"Failed to lock byte {base + i}")
                    setattr(self, attr, getattr(self, attr) | bit)
                elif unlock and held and not want & bit:
                    err = unlock_byte(self.fd, base + i)
                    if err:
                        return GenericError(f"Failed to unlock byte {base + i}: {os.strerror(err)}")
                    setattr(self, attr, getattr(self, attr) & ~bit)
        return None

    def _check(self, perm: int, shared: int) -> GenericError | None:
        """Test for others unsharing what ``perm`` wants, then holding what we unshare."""
        for i, bit in enumerate(_BITS):
            if perm & bit:
                err = test_byte(self.fd, SHARED_LOCK_BASE + i)
                if err:
                    return _lock_error(err, f'Failed to get "{perm_message_names(bit)}" lock')
        for i, bit in enumerate(_BITS):
            if not shared & bit:
                err = test_byte(self.fd, PERM_LOCK_BASE + i)
                if err:
                    name = perm_message_names(bit)
                    return _lock_error(err, f'Failed to get shared "{name}" lock')
        return None

    def prepare(self, perm: int, shared: int) -> None:
        """check_perm: claim ``(perm, shared)`` on top of the committed bits, or raise.

        Only a tightening (new perm bits or fewer shared bits) touches the
        file; a pure loosening waits for ``commit`` and so cannot fail.  On
        failure the bytes are put back as they were before the call; a
        conflict raises ``ImageLockError``, whose hint names the image.
        """
        if not self.use_lock or self.closed:
            return
        if (self.perm | perm) == self.perm and (self.shared & shared) == self.shared:
            return
        error = self._apply(self.perm | perm, ~self.shared | ~shared, unlock=False)
        if error is None:
            error = self._check(perm, shared)
            if error is None:
                return
            hint = f"Is another process using the image [{self.filename}]?"
            error = ImageLockError(error.desc, hint)
        self._apply(self.perm, ~self.shared, unlock=True)  # only unlocks: cannot fail
        raise error

    def commit(self, perm: int, shared: int) -> None:
        """set_perm: hold exactly the bytes of ``(perm, shared)`` from now on."""
        if self.use_lock and not self.closed:
            self._apply(perm, ~shared, unlock=True)  # only unlocks: cannot fail
        self.perm = perm
        self.shared = shared

    def abort(self) -> None:
        """abort_perm_update: back to the bytes of the committed permissions."""
        if self.use_lock and not self.closed:
            self._apply(self.perm, ~self.shared, unlock=True)
