"""NBD protocol constants (the NBD protocol document), and QEMU's names for them.

The ``*_NAMES`` tables are QEMU's ``nbd_opt_lookup``/``nbd_cmd_lookup`` words,
which appear inside QEMU's error messages; ``nbd_errno`` is QEMU's
``system_errno_to_nbd_errno``.
"""

from __future__ import annotations

import errno

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # NBD_OPTS_MAGIC
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission (export) flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

OPT_NAMES = {
    OPT_EXPORT_NAME: "export name",
    OPT_ABORT: "abort",
    OPT_LIST: "list",
    OPT_STARTTLS: "starttls",
    OPT_INFO: "info",
    OPT_GO: "go",
    OPT_STRUCTURED_REPLY: "structured reply",
    OPT_LIST_META_CONTEXT: "list meta context",
    OPT_SET_META_CONTEXT: "set meta context",
}

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_POLICY = (1 << 31) | 2
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_PLATFORM = (1 << 31) | 4
REP_ERR_TLS_REQD = (1 << 31) | 5
REP_ERR_UNKNOWN = (1 << 31) | 6
REP_ERR_SHUTDOWN = (1 << 31) | 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) | 8

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write zeroes",
    CMD_BLOCK_STATUS: "block status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply chunks.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# base:allocation extent flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME's one flag.
STATE_DIRTY = 1 << 0

# QEMU's context ids (nbd/server.c): base:allocation first, then depth.
META_ID_BASE_ALLOCATION = 0
META_ID_ALLOCATION_DEPTH = 1
# Exported bitmap i answers as context META_ID_DIRTY_BITMAP + i.
META_ID_DIRTY_BITMAP = 2

# NBD error values.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

MAX_BUFFER_SIZE = 32 * 1024 * 1024  # NBD_MAX_BUFFER_SIZE
MAX_STRING_SIZE = 4096  # NBD_MAX_STRING_SIZE
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
SECTOR_SIZE = 512


def opt_name(option: int) -> str:
    """QEMU's word for an option code (``<unknown>`` for others)."""
    return OPT_NAMES.get(option, "<unknown>")


def cmd_name(cmd: int) -> str:
    """QEMU's word for a command code (``<unknown>`` for others)."""
    return CMD_NAMES.get(cmd, "<unknown>")


_ERRNO_MAP = {
    0: 0,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(err: int) -> int:
    """A host errno as the NBD error QEMU sends for it (EINVAL for the rest)."""
    return _ERRNO_MAP.get(err, NBD_EINVAL)
