"""What an I/O request returns besides data: block status flags and errors."""

from __future__ import annotations

import errno
import os

# BDRV_BLOCK_* bits that matter to NBD and allocation queries.
DATA = 0x01
ZERO = 0x02
OFFSET_VALID = 0x04
ALLOCATED = 0x10

# BDRV_REQ_* flags of writes and write-zeroes.
REQ_FUA = 0x10
REQ_MAY_UNMAP = 0x04
REQ_NO_FALLBACK = 0x100


class BlockIOError(Exception):
    """A failed request: ``errno`` is the host error QEMU's layer would return."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err


def eperm() -> BlockIOError:
    """The error of a write without the WRITE permission or on a read-only node."""
    return BlockIOError(errno.EPERM)


def eio() -> BlockIOError:
    """The error of a request outside the device."""
    return BlockIOError(errno.EIO)
