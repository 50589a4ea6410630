"""The chardev objects of one daemon and the simple backends.

QEMU 7.2 keeps every chardev as a QOM child of ``/chardevs``; ``query-chardev``
lists them in that container's (GLib hash) order, reversed, as ``qom-list``
does. A chardev whose ``frontend`` is set is busy (``chardev-remove`` refuses
it): in qemu-storage-daemon the only frontends are QMP monitors and muxes.
Only a monitor's frontend reports itself open (``frontend-open``), and
neither supports ``chardev-change``.

Lives here: ``Chardev`` and its backend classes (ringbuf/memory, null, file,
pipe, stdio, serial, parallel, pty, udp, mux), ``ChardevTable`` (one per
daemon, the ``/chardevs`` container), ``open_backend`` (QEMU's
``chardev_new`` for a QMP ``ChardevBackend``). The byte conversions of
``ringbuf-read``/``ringbuf-write`` are in ``qmpgraph.chardev.data``.

What does not live here: the socket backend (``qmpgraph.chardev.socket``),
the QMP commands (``qmpgraph.commands.chardev``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.objects.qom import Container, QomObject, tree_for

__all__ = [
    "QSD_BACKENDS",
    "Chardev",
    "ChardevTable",
    "RingbufChardev",
    "chardev_table",
    "open_backend",
]

#: The backends qsd 7.2 builds in, as ``query-chardev-backends`` lists them.
QSD_BACKENDS = (
    "serial",
    "mux",
    "pipe",
    "parallel",
    "null",
    "ringbuf",
    "stdio",
    "socket",
    "file",
    "memory",
    "udp",
    "pty",
)
_DEFAULT_RINGBUF_SIZE = 65536
# <linux/ppdev.h>: _IO('p', 0x8b)
_PPCLAIM = 0x708B


class Chardev(QomObject):
    """One chardev: ``label`` is its id; ``frontend`` who uses it, if anyone."""

    kind: ClassVar[str] = ""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        #: "monitor" or "mux" (the user QEMU would call the chardev's frontend).
        self.frontend: str | None = None
        self._fds: list[int] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.qom_type = f"chardev-{cls.kind}"

    def filename(self) -> str:
        """``query-chardev``'s ``filename`` (QEMU's default: the backend name)."""
        return self.kind

    def frontend_open(self) -> bool:
        """``query-chardev``'s ``frontend-open``: a monitor has opened it."""
        return self.frontend == "monitor"

    def busy(self) -> bool:
        """``qemu_chr_is_busy``: has a frontend."""
        return self.frontend is not None

    #: QEMU_CHAR_FEATURE_GCONTEXT: a monitor on it may offer out-of-band execution.
    gcontext: ClassVar[bool] = True

    def write_output(self, data: bytes) -> None:
        """Bytes a frontend (a monitor) writes to the chardev; discarded by default."""

    def close(self) -> None:
        """Release what the backend holds (object finalization)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def snapshot(self) -> Any:
        """Chardevs are not user objects; ``qom-set`` never reaches them."""
        return {}


class NullChardev(Chardev):
    """``null``: discards output, never has input."""

    kind = "null"


class RingbufChardev(Chardev):
    """``ringbuf`` (and its alias ``memory``): a power-of-two byte ring.

    Writing past ``size`` bytes drops the oldest; ``prod``/``cons`` count
    bytes written and read, as QEMU's free-running indexes.
    """

    kind = "ringbuf"

    def __init__(self, label: str, size: int) -> None:
        super().__init__(label)
        self.size = size
        # Grows to ``size`` as bytes arrive (QEMU's buffer is lazily backed
        # zeroed memory: a huge ring costs nothing until written).
        self.buf = bytearray()
        self.prod = 0
        self.cons = 0

    gcontext = False

    def write_output(self, data: bytes) -> None:
        """A frontend's output lands in the ring, as ringbuf-write's does."""
        self.write(data)

    def write(self, data: bytes) -> None:
        """``ringbuf_chr_write``."""
        if self.size == 0:
            # QEMU indexes a zero-length buffer here (out of bounds); keep nothing.
            self.cons = self.prod = self.prod + len(data)
            return
        for byte in data:
            index = self.prod % self.size
            if index == len(self.buf):
                self.buf.append(byte)
            else:
                self.buf[index] = byte
            self.prod += 1
            if self.prod - self.cons > self.size:
                self.cons = self.prod - self.size

    def read(self, size: int) -> bytes:
        """``ringbuf_get`` of at most ``size`` bytes."""
        count = min(size, self.prod - self.cons)
        out = bytes(self.buf[(self.cons + i) % self.size] for i in range(count))
        self.cons += count
        return out


class MemoryChardev(RingbufChardev):
    """``memory``: QEMU's legacy name for a ringbuf (a subclass there too)."""

    kind = "memory"


class FdChardev(Chardev):
    """A backend that only holds descriptors (subclassed per backend name)."""

    def __init__(self, label: str, fds: list[int], filename: str | None = None) -> None:
        super().__init__(label)
        self._fds = fds
        self._filename = filename

    def filename(self) -> str:
        """The backend name, or what the backend set (``pty:/dev/pts/N``)."""
        return self._filename if self._filename is not None else self.kind

    def output_fd(self) -> int | None:
        """Where output goes: the first descriptor (a file's ``out``)."""
        return self._fds[0] if self._fds else None

    def write_output(self, data: bytes) -> None:
        """Write without blocking; what does not fit is dropped."""
        fd = self.output_fd()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)
                os.write(fd, data)


class FileChardev(FdChardev):
    """``file``: output (and optionally input) files."""

    kind = "file"


class PipeChardev(FdChardev):
    """``pipe``: ``PATH.in``/``PATH.out``, or ``PATH`` both ways."""

    kind = "pipe"

    def output_fd(self) -> int | None:
        """``PATH.out`` when the pipe pair was opened, else ``PATH``."""
        return self._fds[1] if len(self._fds) > 1 and self._two else super().output_fd()

    _two = False


class SerialChardev(FdChardev):
    """``serial``: a host tty device."""

    kind = "serial"


class ParallelChardev(FdChardev):
    """``parallel``: a host parport device."""

    kind = "parallel"


class StdioChardev(FdChardev):
    """``stdio``: the daemon's standard input and output."""

    kind = "stdio"

    def output_fd(self) -> int | None:
        """Standard output."""
        return 1


class PtyChardev(FdChardev):
    """``pty``: a new pseudo-terminal (its name in ``filename``)."""

    kind = "pty"


class UdpChardev(FdChardev):
    """``udp``: a connected datagram socket."""

    kind = "udp"


class MuxChardev(Chardev):
    """``mux``: multiplexes its ``base`` chardev (whose frontend it becomes)."""

    kind = "mux"

    def __init__(self, label: str, base: Chardev) -> None:
        super().__init__(label)
        self.base = base

    def busy(self) -> bool:
        """Always: QEMU counts a mux busy once made (``mux_cnt >= 0``), so
        ``chardev-remove`` never removes one."""
        return True

    def close(self) -> None:
        """Finalizing a mux releases its base chardev."""
        if self.base.frontend == "mux":
            self.base.frontend = None


class ChardevTable:
    """The chardevs of one daemon: the ``/chardevs`` container of its QOM tree."""

    def __init__(self, container: Container) -> None:
        self.container = container
        #: ``stdio_in_use``: set while a stdio chardev exists.
        self.stdio_used = False
        #: A stdio chardev was finalized: QEMU closed the daemon's stdin then.
        self.stdin_closed = False
        #: Whether ``close_all`` already runs when the daemon stops.
        self.cleanup_registered = False

    def find(self, label: str) -> Chardev | None:
        """``qemu_chr_find``."""
        obj = self.container.child(label)
        return obj if isinstance(obj, Chardev) else None

    def add(self, chr_: Chardev) -> None:
        """``object_property_try_add_child`` under ``/chardevs``."""
        self.container.add_child(chr_.label, chr_)

    def remove(self, label: str) -> Chardev:
        """``object_unparent``: the chardev leaves the tree and is finalized."""
        chr_ = self.find(label)
        assert chr_ is not None
        self.container.del_child(label)
        chr_.close()
        if isinstance(chr_, StdioChardev):
            self.stdio_used = False
            self.stdin_closed = True
        return chr_

    def all(self) -> list[Chardev]:
        """Chardevs in ``query-chardev`` order."""
        return [c for _, c in reversed(self.container.children()) if isinstance(c, Chardev)]

    def close_all(self) -> None:
        """``qemu_chr_cleanup`` at exit: finalize every chardev."""
        for chr_ in self.all():
            chr_.close()


_TABLES: weakref.WeakKeyDictionary[BlockGraph, ChardevTable] = weakref.WeakKeyDictionary()


def chardev_table(graph: BlockGraph) -> ChardevTable:
    """The chardev table of the daemon that owns ``graph`` (made on first use)."""
    table = _TABLES.get(graph)
    if table is None:
        container = tree_for(graph).root.child("chardevs")
        assert isinstance(container, Container)
        table = _TABLES[graph] = ChardevTable(container)
    return table


# -- opening backends --------------------------------------------------------------


def _open_file(path: str, flags: int) -> int:
    """``qmp_chardev_open_file_source``: QEMU's "Could not open" message."""
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise GenericError(f"Could not open '{path}': {os.strerror(err.errno or 0)}") from None


def _ringbuf(label: str, data: dict[str, Any], cls: type[RingbufChardev]) -> Chardev:
    size = data.get("size", _DEFAULT_RINGBUF_SIZE)
    # QEMU tests size & (size - 1) on a 64-bit value: 0 passes, negatives fail.
    if size < 0 or size & (size - 1):
        raise GenericError("size of ringbuf chardev must be power of two")
    return cls(label, size)


def _file(label: str, data: dict[str, Any]) -> Chardev:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if data.get("append") else os.O_TRUNC)
    out = _open_file(data["out"], flags)
    fds = [out]
    if "in" in data:
        try:
            fds.append(_open_file(data["in"], os.O_RDONLY))
        except GenericError:
            os.close(out)
            raise
    return FileChardev(label, fds)


def _pipe(label: str, data: dict[str, Any]) -> Chardev:
    path = data["device"]
    fds: list[int] = []
    for suffix, flags in ((".in", os.O_RDWR), (".out", os.O_WRONLY)):
        with contextlib.suppress(OSError):
            fds.append(os.open(path + suffix, flags | os.O_CLOEXEC))
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        fds = [_open_file(path, os.O_RDWR)]
    chr_ = PipeChardev(label, fds)
    chr_._two = len(fds) == 2
    return chr_


def _serial(label: str, data: dict[str, Any]) -> Chardev:
    return SerialChardev(label, [_open_file(data["device"], os.O_RDWR | os.O_NONBLOCK)])


def _parallel(label: str, data: dict[str, Any]) -> Chardev:
    fd = _open_file(data["device"], os.O_RDWR)
    try:
        fcntl.ioctl(fd, _PPCLAIM)
    except OSError as err:
        os.close(fd)
        raise GenericError(f"not a parallel port: {os.strerror(err.errno or 0)}") from None
    return ParallelChardev(label, [fd])


def _pty(label: str, data: dict[str, Any]) -> Chardev:
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    return PtyChardev(label, [master], f"pty:{name}")


def _resolve(host: str, port: str, passive: bool) -> Any:
    """getaddrinfo for a datagram socket, with QEMU's message on failure."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        return socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, 0, flags)
    except socket.gaierror as err:
        raise GenericError(f"address resolution failed for {host}:{port}: {err.strerror}") from None


def _udp(label: str, data: dict[str, Any]) -> Chardev:
    remote = data["remote"]
    local = data.get("local")
    if remote.get("type") != "inet" or (local is not None and local.get("type") != "inet"):
        raise GenericError("qmpgraph supports only inet addresses for udp chardevs")
    rdata = remote["data"]
    raddr = _resolve(rdata["host"], rdata["port"], False)[0]
    sock = socket.socket(raddr[0], socket.SOCK_DGRAM)
    try:
        if local is not None:
            ldata = local["data"]
            laddr = _resolve(ldata.get("host", ""), ldata.get("port", "0") or "0", True)[0]
            try:
                sock.bind(laddr[4])
            except OSError as err:
                raise GenericError(
                    f"Failed to bind socket: {os.strerror(err.errno or 0)}"
                ) from None
        try:
            sock.connect(raddr[4])
        except OSError as err:
            raise GenericError(f"Failed to connect socket: {os.strerror(err.errno or 0)}") from None
    except BaseException:
        sock.close()
        raise
    return UdpChardev(label, [sock.detach()])


def _null(label: str, data: dict[str, Any]) -> Chardev:
    return NullChardev(label)


def open_backend(
    table: ChardevTable,
    label: str,
    backend: dict[str, Any],
    socket_opener: Callable[[str, dict[str, Any]], Chardev],
) -> Chardev:
    """``chardev_new`` for the QMP ``ChardevBackend`` ``backend``; raises
    ``GenericError`` with QEMU's message (without chardev-add's prefix)."""
    kind = backend["type"]
    data = backend.get("data", {})
    if kind not in QSD_BACKENDS:
        raise GenericError(f"'{kind}' is not a valid char driver name")
    log_fd = _open_log(data)
    try:
        chr_ = _open(table, label, kind, data, socket_opener)
    except BaseException:
        if log_fd is not None:
            os.close(log_fd)
        raise
    if log_fd is not None:
        chr_._fds.append(log_fd)
    return chr_


def _open_log(data: dict[str, Any]) -> int | None:
    logfile = data.get("logfile")
    if logfile is None:
        return None
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if data.get("logappend") else os.O_TRUNC)
    try:
        return os.open(logfile, flags | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise GenericError(f"Could not create '{logfile}': {os.strerror(err.errno or 0)}") from None


def _open(
    table: ChardevTable,
    label: str,
    kind: str,
    data: dict[str, Any],
    socket_opener: Callable[[str, dict[str, Any]], Chardev],
) -> Chardev:
    if kind == "ringbuf":
        return _ringbuf(label, data, RingbufChardev)
    if kind == "memory":
        return _ringbuf(label, data, MemoryChardev)
    if kind == "stdio":
        if table.stdio_used:
            raise GenericError("cannot use stdio by multiple character devices")
        if table.stdin_closed:
            # qmpgraph keeps its stdin open; QEMU's is gone by now.
            raise GenericError("Failed to set FD nonblocking: Bad file descriptor")
        table.stdio_used = True
        return StdioChardev(label, [])
    if kind == "mux":
        base = table.find(data["chardev"])
        if base is None:
            raise GenericError(f"mux: base chardev {data['chardev']} not found")
        if base.frontend is not None:
            raise GenericError(f"Device '{base.label}' is in use")
        base.frontend = "mux"
        return MuxChardev(label, base)
    if kind == "socket":
        return socket_opener(label, data)
    opener = {
        "null": _null,
        "file": _file,
        "pipe": _pipe,
        "serial": _serial,
        "parallel": _parallel,
        "pty": _pty,
        "udp": _udp,
    }[kind]
    return opener(label, data)
