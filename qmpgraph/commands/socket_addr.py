"""Listening sockets for the ``unix``, ``inet``, ``fd`` and ``vsock`` address types
(QEMU 7.2's ``socket_listen`` in util/qemu-sockets.c), used by
``nbd-server-start``.

``inet``: getaddrinfo (AI_PASSIVE; ``numeric`` adds AI_NUMERICHOST and
AI_NUMERICSERV; ``ipv4``/``ipv6`` choose the family as
inet_ai_family_from_address does), then each address, each port up to
``to``, is bound (SO_REUSEADDR; IPv6 only unless both families or neither
were named) and listened on; a port in use moves on to the next.

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

``unix``: the path's length is checked (108 bytes, 107 abstract) before an
existing file of any type is unlinked; an empty path is a new temporary
``qemu-socket-XXXXXX``; an abstract name is bound tight (its own length)
unless ``tight`` is false (the whole zero-padded ``sun_path``).

What does not live here: the NBD server
table (``exports``), serving connections (``qmpgraph.server.nbd``).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import socket
import stat
import tempfile
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


def _inet_family(data: dict[str, Any]) -> int:
    """QEMU's inet_ai_family_from_address: which family getaddrinfo is asked for."""
    ipv4, ipv6 = data.get("ipv4"), data.get("ipv6")
    if ipv4 is False and ipv6 is False:
        raise GenericError("Cannot disable IPv4 and IPv6 at same time")
    if ipv4 is True and ipv6 is True:
        # Both asked for: "" listens on "::" (V6ONLY off), any other host
        # is left to getaddrinfo.
        return socket.AF_INET6 if not data.get("host") else socket.AF_UNSPEC
    if ipv6 is True or ipv4 is False:
        return socket.AF_INET6
    if ipv4 is True or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _try_bind(sock: socket.socket, data: dict[str, Any], family: int, addr: Any) -> int:
    """bind (IPv6: V6ONLY unless both or neither family was asked for); 0 or errno."""
    ipv4, ipv6 = data.get("ipv4"), data.get("ipv6")
    v6only = not ((ipv4 is None and ipv6 is None) or (ipv4 is True and ipv6 is True))
    while True:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            sock.bind(addr)
        except OSError as err:
            # The IPv4 port may be the one taken: retry the IPv6 one alone.
            if family == socket.AF_INET6 and err.errno == errno.EADDRINUSE and not v6only:
                v6only = True
                continue
            return err.errno or 0
        return 0


def inet_listen(data: dict[str, Any]) -> socket.socket:
    """QEMU 7.2's inet_listen_saddr: resolve (getaddrinfo, AI_PASSIVE), then for
    each address and each port up to ``to``, bind and listen; the first that
    listens wins.  Errors carry QEMU's words (and the resolver's)."""
    host, port = str(data["host"]), str(data["port"])
    family = _inet_family(data)
    flags = socket.AI_PASSIVE
    if data.get("numeric"):
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(host or None, port or None, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as err:
        raise GenericError(f"address resolution failed for {host}:{port}: {err.strerror}") from err
    created, last_errno = False, 0
    for fam, kind, proto, _, addr in infos:
        low = int(addr[1])
        high = int(data["to"]) if "to" in data else low
        for p in range(low, high + 1):
            try:
                sock = socket.socket(fam, kind, proto)
            except OSError as err:
                if p == low:
                    last_errno = err.errno or 0
                    continue
                raise GenericError(
                    f"Failed to recreate failed listening socket: {os.strerror(err.errno or 0)}"
                ) from err
            created = True
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            failed = _try_bind(sock, data, fam, (addr[0], p, *addr[2:]))
            if not failed:
                try:
                    sock.listen(1)
                    return sock
                except OSError as err:
                    failed = err.errno or 0
                    if failed != errno.EADDRINUSE:
                        sock.close()
                        raise GenericError(
                            f"Failed to listen on socket: {os.strerror(failed)}"
                        ) from err
            elif failed != errno.EADDRINUSE:
                sock.close()
                raise GenericError(f"Failed to bind socket: {os.strerror(failed)}")
            sock.close()
            last_errno = failed
    text = "Failed to find an available port" if created else "Failed to create a socket"
    raise GenericError(f"{text}: {os.strerror(last_errno)}" if last_errno else text)


_SUN_PATH = 108  # sizeof(struct sockaddr_un.sun_path)


def unix_listen(data: dict[str, Any]) -> tuple[socket.socket, str | None]:
    """QEMU 7.2's unix_listen_saddr; the socket and the file path it made (None
    for an abstract one).  An empty path is a new ``qemu-socket-XXXXXX`` in
    $TMPDIR; the length is checked before an existing file is unlinked."""
    abstract = bool(data.get("abstract", False))
    path = str(data["path"])
    temporary = not path and not abstract
    if temporary:
        path = os.path.join(os.environ.get("TMPDIR") or "/tmp", "qemu-socket-XXXXXX")
    size = len(path.encode())
    if size > _SUN_PATH or (abstract and size > _SUN_PATH - 1):
        raise GenericError(f"UNIX socket path '{path}' is too long")
    if temporary:
        fd, path = tempfile.mkstemp(prefix="qemu-socket-", dir=os.path.dirname(path))
        os.close(fd)
    if not abstract:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise GenericError(
                f"Failed to unlink socket {path}: {os.strerror(err.errno or 0)}"
            ) from err
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        name: str | bytes = path
        if abstract:
            raw = b"\0" + path.encode()
            # tight (the default): the address is the name alone; else the
            # whole sun_path, zero padded.
            name = raw if data.get("tight", True) else raw.ljust(_SUN_PATH, b"\0")
        try:
            sock.bind(name)
        except OSError as err:
            raise GenericError(
                f"Failed to bind socket to {path}: {os.strerror(err.errno or 0)}"
            ) from err
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock, None if abstract else path
