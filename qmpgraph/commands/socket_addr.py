"""Listening sockets for the ``fd`` and ``vsock`` address types (QEMU 7.2's
``socket_listen`` in util/qemu-sockets.c), used by ``nbd-server-start``.

``fd``: a listening socket inherited by file descriptor number.  qsd has no
``getfd``: while a monitor runs the command (QMP), every ``fd`` address is
refused with "only QEMU supports file descriptor passing" (qsd's stub of
``monitor_get_fd``); at start-up (``--nbd-server``, no current monitor) the
string is a C integer (``qemu_strtoi``: leading blanks and a sign allowed,
nothing after the digits), the descriptor must be a socket (else it is
closed), and ``listen`` is called on it (backlog 1), which puts a bound
socket into the listening state.

``vsock``: ``cid`` and ``port`` are unsigned C integers (``qemu_strtoui``:
a negative number wraps), then socket, bind and listen, each failure with
the system's message (a machine without vsock: "Failed to create socket").

What does not live here: the unix and inet listeners and the NBD server
table (``exports``), serving connections (``qmpgraph.server.nbd``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import socket
import stat
from collections.abc import Iterator
from typing import Any

from qmpgraph.errors import GenericError

_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_UINT_MAX = (1 << 32) - 1
_ULLONG_MAX = (1 << 64) - 1
# strtol's accepted prefix: C isspace blanks, a sign, decimal digits.
_C_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")

#: True while start-up options run their commands (no current monitor).
_STARTUP: contextvars.ContextVar[bool] = contextvars.ContextVar("startup", default=False)


@contextlib.contextmanager
def without_monitor() -> Iterator[None]:
    """Run commands as start-up options do: ``fd`` addresses are numbers."""
    token = _STARTUP.set(True)
    try:
        yield
    finally:
        _STARTUP.reset(token)


def _parse(text: str, low: int, high: int) -> tuple[int | None, bool]:
    """A C integer in [low, high] (None if invalid) and whether it overflowed
    (strtoll/strtoull set ERANGE, which the message then shows)."""
    match = _C_NUMBER.match(text)
    if match is None:
        return None, False
    value = int(match.group(1) + match.group(2))
    overflow = not low <= value <= high
    if overflow or match.end() != len(text):
        return None, overflow
    return value, False


def _fd_socket(text: str) -> socket.socket:
    """socket_get_fd, then listen(fd, 1)."""
    if not _STARTUP.get():
        raise GenericError("only QEMU supports file descriptor passing")
    fd, overflow = _parse(text, _INT_MIN, _INT_MAX)
    if fd is None:
        suffix = f": {os.strerror(34)}" if overflow else ""  # ERANGE
        raise GenericError(f"Unable to parse FD number {text}{suffix}")
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except (OSError, OverflowError, ValueError):
        is_socket = False
    if not is_socket:
        if fd > 2:  # QEMU closes it; the standard streams stay for the message
            with contextlib.suppress(OSError):
                os.close(fd)
        raise GenericError(f"File descriptor '{text}' is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise GenericError(f"Failed to listen on fd socket: {os.strerror(err.errno or 0)}") from err
    return sock


def _uint(text: str) -> int | None:
    """qemu_strtoui: an unsigned int, a negative number wrapping around."""
    match = _C_NUMBER.match(text)
    if match is None or match.end() != len(text):
        return None
    magnitude = int(match.group(2))
    if magnitude > _UINT_MAX:
        return None
    return (-magnitude if match.group(1) == "-" else magnitude) & _UINT_MAX


def _vsock_socket(data: dict[str, Any]) -> socket.socket:
    """vsock_listen_saddr: parse cid and port, socket, bind, listen."""
    cid, port = str(data["cid"]), str(data["port"])
    cid_value = _uint(cid)
    if cid_value is None:
        raise GenericError(f"Failed to parse cid '{cid}'")
    port_value = _uint(port)
    if port_value is None:
        raise GenericError(f"Failed to parse port '{port}'")
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise GenericError(f"Failed to create socket: {os.strerror(97)}")  # EAFNOSUPPORT
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise GenericError(f"Failed to create socket: {os.strerror(err.errno or 0)}") from err
    try:
        try:
            sock.bind((cid_value, port_value))
        except OSError as err:
            raise GenericError(f"Failed to bind socket: {os.strerror(err.errno or 0)}") from err
        try:
            sock.listen(1)
        except OSError as err:
            raise GenericError(
                f"Failed to listen on socket: {os.strerror(err.errno or 0)}"
            ) from err
    except BaseException:
        sock.close()
        raise
    return sock


def listen_other(kind: str, data: dict[str, Any]) -> socket.socket | None:
    """The listening socket for an ``fd`` or ``vsock`` address; None for other kinds."""
    if kind == "fd":
        return _fd_socket(str(data["str"]))
    if kind == "vsock":
        return _vsock_socket(data)
    return None
