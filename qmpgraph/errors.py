"""QMP error classes as exceptions.

Every error a command reports travels as one of these exceptions until the
dispatcher, the one place where an exception becomes a QMP ``error`` reply.
Each class carries the wire name of its QMP ErrorClass::

    QMPError                 (root; never raised itself)
     +-- GenericError        "GenericError"
     +-- CommandNotFound     "CommandNotFound"
     +-- DeviceNotActive     "DeviceNotActive"
     +-- DeviceNotFound      "DeviceNotFound"
     +-- KVMMissingCap       "KVMMissingCap"

What does not live here: the text of messages (each raiser words its own, as
QEMU does) and protocol-level framing errors (``qmpgraph.protocol``).
"""

from __future__ import annotations

from typing import ClassVar


class QMPError(Exception):
    """Root of every error that becomes a QMP error reply."""

    error_class: ClassVar[str] = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_wire(self) -> dict[str, str]:
        """The ``error`` member of a QMP reply, keys in QEMU's output order."""
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QMPError):
    """The error class of nearly every QEMU failure."""

    error_class = "GenericError"


class CommandNotFound(QMPError):
    """Unknown command, or a command not valid in the session's current mode."""

    error_class = "CommandNotFound"


class DeviceNotActive(QMPError):
    """A device exists but is not active."""

    error_class = "DeviceNotActive"


class DeviceNotFound(QMPError):
    """A named device (block backend, job, ...) does not exist."""

    error_class = "DeviceNotFound"


class KVMMissingCap(QMPError):
    """Listed for completeness: QEMU's last ErrorClass, never raised by qmpgraph."""

    error_class = "KVMMissingCap"
