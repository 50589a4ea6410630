"""Bit constants of the block graph: permissions, edge roles and open flags.

Lives here: QEMU 7.2's values and the two spellings of permission names (the
message form, in enum order, and the QAPI form used by queries).  What does not
live here: the rules that compute permissions (``qmpgraph.transactions.refresh``
and each driver's ``child_perm``).
"""

from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    """BLK_PERM_*: what a parent does with (or lets others do to) a child."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_ALL = 0x0F
PERM_PASSTHROUGH = PERM_ALL
# 0 since GRAPH_MOD was removed in 7.0; kept so the formulas read like QEMU's.
PERM_UNCHANGED = PERM_ALL & ~PERM_PASSTHROUGH

_MESSAGE_NAMES = (
    (Perm.CONSISTENT_READ, "consistent read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write unchanged"),
    (Perm.RESIZE, "resize"),
)
_QAPI_NAMES = (
    (Perm.CONSISTENT_READ, "consistent-read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write-unchanged"),
    (Perm.RESIZE, "resize"),
)


def perm_message_names(perm: int) -> str:
    """Names for error messages, joined by ", " in enum order."""
    return ", ".join(name for bit, name in _MESSAGE_NAMES if perm & bit)


def perm_qapi_names(perm: int) -> list[str]:
    """QAPI BlockPermission names as x-debug-query-block-graph lists them (reverse order)."""
    return [name for bit, name in reversed(_QAPI_NAMES) if perm & bit]


class Role(enum.IntFlag):
    """BdrvChildRole bits of an edge."""

    NONE = 0
    DATA = 1
    METADATA = 2
    FILTERED = 4
    COW = 8
    PRIMARY = 16
    IMAGE = DATA | METADATA | PRIMARY


class OpenFlag(enum.IntFlag):
    """BDRV_O_* open flags (7.2 values)."""

    NO_SHARE = 0x0001
    RDWR = 0x0002
    RESIZE = 0x0004
    SNAPSHOT = 0x0008
    TEMPORARY = 0x0010
    NOCACHE = 0x0020
    NATIVE_AIO = 0x0080
    NO_BACKING = 0x0100
    NO_FLUSH = 0x0200
    COPY_ON_READ = 0x0400
    INACTIVE = 0x0800
    CHECK = 0x1000
    ALLOW_RDWR = 0x2000
    UNMAP = 0x4000
    PROTOCOL = 0x8000
    NO_IO = 0x10000
    AUTO_RDONLY = 0x20000
    IO_URING = 0x40000
