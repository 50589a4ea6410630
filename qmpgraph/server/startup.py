"""Start-up I/O, before the event loop: chardev sockets, block nodes, pidfile,
daemonizing.

This is the ``Applier`` that ``qmpgraph.cmdline.qsd.process_options`` hands
each accepted option to. It runs synchronously (plain ``socket``), so that
``--daemonize`` can fork before trio starts and every error is reported at
the option that caused it, as QEMU does. The trio side
(``qmpgraph.server.run``) receives the bound sockets as ``PreparedMonitor``.

QEMU behaviour kept here (probed on qemu-storage-daemon 7.2): an existing
file at a socket path is unlinked before binding (a directory is an error);
``wait=on`` blocks start-up until one client connects; ``server=off``
connects out; the pidfile is created and ``fcntl``-locked after all options
succeeded, holds ``PID\\n``, and is removed on exit; ``--daemonize`` forks
twice and the parent's exit status says whether start-up succeeded.
Unlike QEMU, sockets created by a start-up that then fails are removed.
``--blockdev``, ``--object``, ``--nbd-server`` and ``--export`` act on the
``Daemon`` at once, through the handlers of the QMP commands they stand for
(blockdev-add, object-add, nbd-server-start, block-export-add), so a later
option can refer to what an earlier one made and not the other way round.
The NBD socket is bound here and served once the trio loop runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import Any

import qmpgraph.commands  # noqa: F401 (registers blockdev-add for --blockdev)
from qmpgraph.cmdline.chardev import ChardevSpec, MonitorSpec
from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.cmdline.qsd import OptionArgs, ReportFn
from qmpgraph.commands import chardev as chardev_commands
from qmpgraph.commands import socket_addr
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import REGISTRY
from qmpgraph.daemon import Daemon
from qmpgraph.errors import QMPError
from qmpgraph.protocol.session import QMPSession
from qmpgraph.schema import Schema
from qmpgraph.schema.keyval_visitor import visit_keyval
from qmpgraph.schema.types import IntType, Member, ObjectType
from qmpgraph.schema.visitor import visit_arguments

__all__ = [
    "Daemonizer",
    "PreparedMonitor",
    "Startup",
    "add_blockdev",
    "add_export",
    "add_nbd_server",
    "add_object",
    "bind_unix",
    "remove_socket",
    "write_pidfile",
]

_UNIX_PATH_MAX = 108
_BACKLOG = 128


@dataclass(slots=True)
class Endpoint:
    """One chardev's sockets: a listener, and connections made at start-up
    (``server=off``, or the client ``wait=on`` waited for)."""

    spec: ChardevSpec
    listener: socket.socket | None = None
    connections: list[socket.socket] = field(default_factory=list)
    # (absolute path, inode) of a Unix socket file this process created.
    created: tuple[str, int] | None = None


@dataclass(slots=True)
class PreparedMonitor:
    """A QMP monitor ready to serve: sockets already bound or connected."""

    listener: socket.socket | None
    connections: list[socket.socket]
    pretty: bool
    description: str


def bind_unix(path: str) -> tuple[socket.socket, tuple[str, int]]:
    """Listen on Unix socket ``path`` as QEMU does; the socket and its file."""
    if len(os.fsencode(path)) >= _UNIX_PATH_MAX:
        raise CmdlineError(
            f"UNIX socket path '{path}' is too long\nPath must be less than {_UNIX_PATH_MAX} bytes"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CmdlineError(f"Failed to unlink socket {path}: {os.strerror(e.errno or 0)}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(_BACKLOG)
    except OSError as e:
        sock.close()
        raise CmdlineError(
            f"Failed to bind socket to {path}: {os.strerror(e.errno or 0)}"
        ) from None
    return sock, (os.path.abspath(path), os.stat(path).st_ino)


def remove_socket(created: tuple[str, int] | None) -> None:
    """Unlink a socket file we created, unless another process replaced it."""
    if created is None:
        return
    path, ino = created
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if st.st_ino == ino and stat.S_ISSOCK(st.st_mode):
            os.unlink(path)


def _bind_tcp(spec: ChardevSpec) -> socket.socket:
    """Listen as QEMU's chardev does: its inet socket address (host, port and
    the optional ``to``, ``ipv4``, ``ipv6``) through the same listener loop
    as QMP's chardev-add and the NBD server (``socket_addr.inet_listen``)."""
    data: dict[str, Any] = {"host": spec.host or "", "port": spec.port or ""}
    for key in ("to", "ipv4", "ipv6"):
        if getattr(spec, key) is not None:
            data[key] = getattr(spec, key)
    try:
        return socket_addr.inet_listen(data)
    except QMPError as exc:
        raise CmdlineError(exc.desc) from None


def _connect(spec: ChardevSpec) -> socket.socket:
    if spec.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(spec.path)
        except OSError as e:
            sock.close()
            raise CmdlineError(
                f"Failed to connect to '{spec.path}': {os.strerror(e.errno or 0)}"
            ) from None
        return sock
    try:
        return socket.create_connection((spec.host or "", int(spec.port or "0")))
    except (OSError, ValueError) as e:
        reason = os.strerror(e.errno or 0) if isinstance(e, OSError) else str(e)
        raise CmdlineError(f"Failed to connect to '{spec.host}:{spec.port}': {reason}") from None


def _from_fd(text: str) -> socket.socket:
    try:
        fd = int(text, 10)
    except ValueError:
        raise CmdlineError(f"Unable to parse FD number {text}") from None
    try:
        return socket.socket(fileno=fd)
    except OSError:
        raise CmdlineError(f"File descriptor '{text}' is not a socket") from None


def _waiting_for(spec: ChardevSpec) -> str:
    where = f"unix:{spec.path}" if spec.path is not None else f"tcp:{spec.host}:{spec.port}"
    return f"info: QEMU waiting for connection on: disconnected:{where},server=on"


_BACKING_EMPTY = 'warning: Use of "backing": "" is deprecated; use "backing": null instead'


def _typed_options(daemon: Daemon, command: str, args: OptionArgs) -> dict[str, Any]:
    """An option's tree typed as ``command``'s arguments: QEMU's keyval input
    visitor for the keyval form, the QMP one for the JSON form."""
    if args.keyval:
        return daemon.schema.validate_keyval_arguments(command, args.options)
    return daemon.schema.validate_arguments(command, args.options)


def add_object(daemon: Daemon, args: OptionArgs) -> None:
    """``--object``: QMP ``object-add`` on ``daemon``, as qsd's
    ``user_creatable_process_cmdline`` runs it (keyval or JSON form)."""
    try:
        _run_command(daemon, "object-add", _typed_options(daemon, "object-add", args))
    except QMPError as exc:
        raise CmdlineError(exc.desc) from None


def add_blockdev(daemon: Daemon, args: OptionArgs, report: ReportFn) -> None:
    """``--blockdev``: QMP ``blockdev-add`` on ``daemon``, as qsd runs it.

    The option's tree goes through QEMU's keyval input visitor (keyval form)
    or the QMP one (JSON form), then through the registered ``blockdev-add``
    handler: one graph transaction, the top node monitor-owned, logged like
    a QMP command. Raises ``CmdlineError`` with QEMU's message.
    """
    try:
        typed = _typed_options(daemon, "blockdev-add", args)
        # QEMU warns when it opens the top node, after blockdev-add's own
        # node-name check and before any open error. (The open path has no
        # warning channel, so a nested ``backing=""`` is not warned about.)
        if isinstance(typed.get("node-name"), str) and typed.get("backing") == "":
            report(_BACKING_EMPTY)
        _run_command(daemon, "blockdev-add", typed)
    except QMPError as exc:
        raise CmdlineError(exc.desc) from None


def _run_command(daemon: Daemon, name: str, typed: dict[str, Any]) -> None:
    """Run QMP command ``name`` on typed arguments, as start-up does.

    The handler needs a session; no client is involved at start-up.
    """
    session = QMPSession(daemon.greeting())
    session.accept_capabilities([])
    REGISTRY[name].handler(CommandContext(daemon, session), typed)


def _nbd_server_options(schema: Schema) -> ObjectType:
    """qsd's NbdServerOptions, which introspection does not show: built from
    the SocketAddress of blockdev-add's nbd ``server`` and a ``str``."""
    nbd = schema.arg_type("blockdev-add").variants["nbd"]
    addr = next(m.type for m in nbd.members if m.name == "server")
    text = next(m.type for m in schema.arg_type("block-export-add").members if m.name == "id")
    return ObjectType(
        "NbdServerOptions",
        "object",
        members=[
            Member("addr", addr, False),
            Member("tls-creds", text, True),
            Member("tls-authz", text, True),
            Member("max-connections", IntType("int", "int", "uint32"), True),
        ],
    )


def add_nbd_server(daemon: Daemon, args: OptionArgs) -> None:
    """``--nbd-server``: typed as NbdServerOptions, then QMP ``nbd-server-start``.

    The option's ``addr`` is a flat SocketAddress; the command takes the
    legacy form (``{"type": ..., "data": {...}}``), which QEMU flattens
    back, so the two are the same server. The socket is bound now; it is
    served once the trio loop runs (``qmpgraph.server.nbd.serve_bound_server``).
    """
    opts_type = _nbd_server_options(daemon.schema)
    try:
        if args.keyval:
            typed = visit_keyval(opts_type, args.options)
        else:
            typed = visit_arguments(opts_type, args.options)
        addr = dict(typed["addr"])
        kind = addr.pop("type")
        command_args: dict[str, Any] = {"addr": {"type": kind, "data": addr}}
        for key in ("tls-creds", "tls-authz", "max-connections"):
            if key in typed:
                command_args[key] = typed[key]
        with socket_addr.without_monitor():  # fd addresses are numbers here
            _run_command(daemon, "nbd-server-start", command_args)
    except QMPError as exc:
        raise CmdlineError(exc.desc) from None


def add_export(daemon: Daemon, args: OptionArgs) -> None:
    """``--export``: QMP ``block-export-add`` on ``daemon``, as qsd runs it
    (BlockExportOptions by the keyval or the JSON visitor, then the handler)."""
    try:
        typed = _typed_options(daemon, "block-export-add", args)
        _run_command(daemon, "block-export-add", typed)
    except QMPError as exc:
        raise CmdlineError(exc.desc) from None


class Startup:
    """The ``Applier``: creates chardevs, block nodes (on ``daemon``), and
    collects monitors and options."""

    def __init__(self, daemon: Daemon | None = None) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.monitors: list[PreparedMonitor] = []
        #: The daemon ``--blockdev`` adds nodes to (None: refused).
        self.daemon = daemon
        #: --blockdev/--export/--nbd-server/--object, in order.
        self.options: list[OptionArgs] = []
        # Sockets of a chardev whose id turned out to be a duplicate.
        self._orphans: list[Endpoint] = []

    def chardev(self, spec: ChardevSpec, report: ReportFn) -> None:
        """Create ``spec``'s sockets now, as QEMU does while parsing."""
        ep = Endpoint(spec)
        if spec.backend == "socket":
            if spec.fd is not None:
                sock = _from_fd(spec.fd)
                if spec.server:
                    ep.listener = sock
                else:
                    ep.connections.append(sock)
            elif not spec.server:
                ep.connections.append(_connect(spec))
            elif spec.path is not None:
                ep.listener, ep.created = bind_unix(spec.path)
            else:
                ep.listener = _bind_tcp(spec)
            if spec.server and spec.wait:
                report(_waiting_for(spec))
                assert ep.listener is not None
                conn, _ = ep.listener.accept()
                ep.connections.append(conn)
        chr_ = None
        if self.daemon is not None:
            try:
                chr_ = chardev_commands.open_from_cmdline(
                    self.daemon, spec, ep.listener, ep.connections, ep.created
                )
            except QMPError as exc:
                raise CmdlineError(exc.desc) from None
        # A duplicate id is detected by the caller after this returns (as in
        # QEMU); keep the first chardev's sockets, remember these for cleanup.
        self.endpoints.setdefault(spec.id, ep)
        if self.endpoints[spec.id] is not ep:
            self._orphans.append(ep)
            if chr_ is not None:
                chr_.close()
        elif chr_ is not None and self.daemon is not None:
            chardev_commands.add_from_cmdline(self.daemon, chr_)

    def monitor(self, spec: MonitorSpec) -> None:
        """Serve QMP on chardev ``spec.chardev``."""
        ep = self.endpoints[spec.chardev]
        desc = ep.spec.path or (f"{ep.spec.host}:{ep.spec.port}" if ep.spec.host else "")
        if self.daemon is not None:
            chardev_commands.attach_monitor(self.daemon, spec.chardev, spec.pretty)
        if ep.spec.backend != "socket":
            return
        self.monitors.append(PreparedMonitor(ep.listener, ep.connections, spec.pretty, desc))

    def option(self, args: OptionArgs, report: ReportFn) -> None:
        """Run --blockdev, --object, --nbd-server and --export now, through
        the QMP commands' handlers (``add_blockdev``, ``add_object``,
        ``add_nbd_server``, ``add_export``)."""
        self.options.append(args)
        if self.daemon is None:
            raise CmdlineError(f"--{args.option} is not supported yet by qmpgraph")
        if args.option == "blockdev":
            add_blockdev(self.daemon, args, report)
        elif args.option == "object":
            add_object(self.daemon, args)
        elif args.option == "nbd-server":
            add_nbd_server(self.daemon, args)
        else:
            add_export(self.daemon, args)

    def add_default_monitor(self, path: str) -> PreparedMonitor:
        """The argument-less daemon's monitor on ``path``."""
        spec = ChardevSpec("qmpgraph-default", "socket", path=path, server=True)
        ep = Endpoint(spec)
        ep.listener, ep.created = bind_unix(path)
        self.endpoints[spec.id] = ep
        mon = PreparedMonitor(ep.listener, [], False, path)
        self.monitors.append(mon)
        return mon

    def close(self) -> None:
        """Close every socket and remove the socket files this process made."""
        for ep in [*self.endpoints.values(), *self._orphans]:
            for conn in ep.connections:
                conn.close()
            if ep.listener is not None:
                ep.listener.close()
            remove_socket(ep.created)


class PidFile:
    """A locked pidfile; ``remove`` unlinks it (by its resolved path)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def remove(self) -> None:
        """Unlink and unlock (QEMU's exit notifier)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def write_pidfile(path: str) -> PidFile:
    """Create, lock and fill ``path`` as QEMU's ``qemu_write_pidfile``.

    Raises ``CmdlineError`` with QEMU's message (without the "cannot create
    PID file: " prefix the caller adds).
    """
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CmdlineError(f"Could not create '{path}': {os.strerror(e.errno or 0)}") from None
        try:
            before = os.fstat(fd)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise CmdlineError(f"Cannot lock pid file: {os.strerror(e.errno or 0)}") from None
        # The file we locked must still be the one at ``path``: another
        # instance may have removed or replaced it meanwhile.
        try:
            now = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        if now.st_ino == before.st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return PidFile(fd, os.path.realpath(path))


class Daemonizer:
    """QEMU's ``--daemonize``: fork twice; the first parent waits for a status byte.

    ``start`` returns in the grandchild only (the original process exits
    with 0 if the grandchild reported success, 1 otherwise). ``done``
    detaches from the terminal and reports success.
    """

    def __init__(self) -> None:
        self._pipe: int | None = None

    def start(self) -> None:
        """Fork; only the daemon process returns."""
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        if os.fork() > 0:
            os.close(w)
            status = b""
            while True:
                try:
                    status = os.read(r, 1)
                    break
                except InterruptedError:
                    continue
            os._exit(0 if status == b"\0" else 1)
        os.close(r)
        self._pipe = w
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.umask(0o027)
        for sig in (signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN):
            signal.signal(sig, signal.SIG_IGN)

    def done(self) -> None:
        """Start-up succeeded: detach stdio, tell the waiting parent."""
        if self._pipe is None:
            return
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        sys.stdout.flush()
        sys.stderr.flush()
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        try:
            os.write(self._pipe, b"\0")
        except OSError as e:
            if e.errno != errno.EINTR:
                os._exit(1)
        os.close(self._pipe)
        self._pipe = None
