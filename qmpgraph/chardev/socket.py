"""The ``socket`` chardev backend: Unix or TCP, listening or connecting out.

QEMU 7.2's socket chardev without a frontend (the only kind qsd's
``chardev-add`` can make) never reads: a client's bytes stay in the kernel.
It accepts one client at a time (the next waits in the backlog until the
first hangs up), notices a hang-up only by ``POLLHUP`` (a Unix peer closing;
a TCP peer's FIN is not a hang-up), and names its state in ``query-chardev``
(``disconnected:unix:PATH,server=on``, ``unix:PATH,server=on``, ``unix:`` for
a connected client, ``tcp:HOST:PORT,server=on <-> PEER:PORT``). Finalizing a
Unix listener unlinks its socket file.

qmpgraph observes all this when asked (``refresh``, called before any state
is shown) rather than in a task: accepting and polling without blocking gives
the same answers, since nothing else can see the state in between.

Lives here: ``SocketChardev`` (made by ``chardev-add``), ``CmdlineSocket``
(a ``--chardev socket``, whose sockets ``qmpgraph.server.startup`` made and
a monitor may serve), and ``open_socket``.
What does not live here: the other backends (``qmpgraph.chardev.model``).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import sys
import time
from typing import Any

from qmpgraph.chardev.model import Chardev
from qmpgraph.commands import socket_addr
from qmpgraph.errors import GenericError

__all__ = ["CmdlineSocket", "SocketChardev", "open_socket", "validate_socket"]


def validate_socket(data: dict[str, Any], kind: str) -> None:
    """``qmp_chardev_validate_socket``: options that depend on the address
    type and on server versus client, in QEMU's order and words."""
    server = data.get("server", True)
    tls = data.get("tls-creds")
    if kind == "fd":
        if "reconnect" in data:
            raise GenericError("'reconnect' option is incompatible with 'fd' address type")
        if tls is not None and not server:
            raise GenericError(
                "'tls_creds' option is incompatible with 'fd' address type as client"
            )
    elif kind in ("unix", "vsock") and tls is not None:
        raise GenericError(f"'tls_creds' option is incompatible with '{kind}' address type")
    if "tls-authz" in data and tls is None:
        raise GenericError("'tls_authz' option requires 'tls_creds' option")
    if server:
        if "reconnect" in data:
            raise GenericError(
                "'reconnect' option is incompatible with socket in server listen mode"
            )
    else:
        if data.get("websocket"):
            raise GenericError("Websocket client is not implemented")
        if "wait" in data:
            raise GenericError("'wait' option is incompatible with socket in client connect mode")


def _protocol(data: dict[str, Any]) -> str:
    if data.get("telnet"):
        return "telnet"
    if data.get("tn3270"):
        return "tn3270"
    if data.get("websocket"):
        return "websocket"
    return "tcp"


def _numeric(addr: Any) -> tuple[str, str]:
    host, port = socket.getnameinfo(addr[:2], socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
    return host, port


class SocketChardev(Chardev):
    """A socket chardev made by ``chardev-add`` (it owns its sockets)."""

    kind = "socket"
    class_properties = (("connected", "bool"), ("addr", "SocketAddress"))
    read_only = frozenset({"connected", "addr"})

    def __init__(self, label: str, addr: dict[str, Any], data: dict[str, Any]) -> None:
        super().__init__(label)
        #: The flat SocketAddress (a listener's: the address it is bound to).
        self.addr = addr
        self.server = bool(data.get("server", True))
        self.protocol = _protocol(data)
        self.reconnect = int(data.get("reconnect", 0))
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._conn_name = ""
        self._created: tuple[str, int] | None = None
        self._next_attempt = 0.0
        self._error_reported = False

    # -- state ---------------------------------------------------------------------

    def _address_text(self) -> str:
        a = self.addr
        on = ",server=on" if self.server else ""
        if a["type"] == "inet":
            return f"{self.protocol}:{a['host']}:{a['port']}{on}"
        if a["type"] == "unix":
            extra = ""
            if a.get("abstract"):
                extra = ",abstract=on" + (",tight=on" if a.get("tight", True) else "")
            return f"unix:{a['path']}{extra}{on}"
        if a["type"] == "fd":
            return f"fd:{a['str']}{on}"
        return f"vsock:{a['cid']}:{a['port']}"

    def _connected_name(self, conn: socket.socket) -> str:
        on = ",server=on" if self.server else ""
        if conn.family == socket.AF_UNIX:
            local = conn.getsockname()
            path = local if isinstance(local, str) else local.decode(errors="replace")
            # sun_path as a C string: an abstract name (leading NUL) prints as nothing.
            path = path.split("\0", 1)[0]
            return f"unix:{path}{on}"
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            left, right = ("[", "]") if conn.family == socket.AF_INET6 else ("", "")
            shost, sserv = _numeric(conn.getsockname())
            phost, pserv = _numeric(conn.getpeername())
            return (
                f"{self.protocol}:{left}{shost}{right}:{sserv}{on} <-> {left}{phost}{right}:{pserv}"
            )
        return "unknown"

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.conn = conn
        self._conn_name = self._connected_name(conn)

    def refresh(self) -> None:
        """Bring the connection state up to date: a hung-up client is dropped,
        the next waiting one accepted, a client chardev reconnected when due."""
        while True:
            if self.conn is not None:
                poller = select.poll()
                poller.register(self.conn, select.POLLHUP)
                if not any(ev & select.POLLHUP for _, ev in poller.poll(0)):
                    return
                self.conn.close()
                self.conn = None
                self._next_attempt = time.monotonic() + self.reconnect
            if self.listener is not None:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    return
                self._attach(conn)
                continue
            if self.reconnect and time.monotonic() >= self._next_attempt:
                self._try_connect()
            return

    def _try_connect(self) -> None:
        try:
            self._attach(_connect(self.addr))
        except GenericError as err:
            self._next_attempt = time.monotonic() + self.reconnect
            if not self._error_reported:
                self._error_reported = True
                print(
                    f"qemu-storage-daemon: Unable to connect character device {self.label}: {err}",
                    file=sys.stderr,
                    flush=True,
                )

    def filename(self) -> str:
        """``unix:PATH,server=on`` when connected, ``disconnected:...`` when not."""
        self.refresh()
        if self.conn is not None:
            return self._conn_name
        return "disconnected:" + self._address_text()

    def get(self, name: str) -> Any:
        """``connected`` and ``addr`` (QOM properties of chardev-socket)."""
        if name == "connected":
            self.refresh()
            return self.conn is not None
        if name == "addr":
            return dict(self.addr)
        return super().get(name)

    def close(self) -> None:
        """Close the sockets; a Unix socket file this chardev bound is unlinked."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._created is not None:
            path, ino = self._created
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if st.st_ino == ino and stat.S_ISSOCK(st.st_mode):
                    os.unlink(path)
            self._created = None
        super().close()


def _flatten(legacy: dict[str, Any]) -> dict[str, Any]:
    """``socket_address_flatten``: SocketAddressLegacy to SocketAddress."""
    return {"type": legacy["type"], **legacy.get("data", {})}


def _connect(addr: dict[str, Any]) -> socket.socket:
    if addr["type"] == "unix":
        path = addr["path"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            raise GenericError(
                f"Failed to connect to '{path}': {os.strerror(err.errno or 0)}"
            ) from None
        return sock
    if addr["type"] == "inet":
        host, port = addr.get("host", ""), addr.get("port", "")
        try:
            infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise GenericError(
                f"address resolution failed for {host}:{port}: {err.strerror}"
            ) from None
        last: OSError | None = None
        for fam, kind, proto, _, sa in infos:
            sock = socket.socket(fam, kind, proto)
            try:
                sock.connect(sa)
            except OSError as err:
                sock.close()
                last = err
                continue
            return sock
        reason = os.strerror(last.errno or 0) if last is not None else ""
        raise GenericError(f"Failed to connect to '{host}:{port}': {reason}")
    raise GenericError(f"socket family '{addr['type']}' is not supported by qmpgraph")


def open_socket(label: str, data: dict[str, Any], *, objects: Any = None) -> Chardev:
    """``qmp_chardev_open_socket`` for a ChardevSocket ``data``.

    ``objects`` looks up a ``tls-creds`` id (``ObjectTree.lookup``).
    """
    tls = data.get("tls-creds")
    if tls is not None:
        if objects is None or objects(tls) is None:
            raise GenericError(f"No TLS credentials with id '{tls}'")
        raise GenericError("qmpgraph does not support TLS chardevs")
    addr = _flatten(data["addr"])
    validate_socket(data, addr["type"])
    chr_ = SocketChardev(label, addr, data)
    if chr_.server:
        # The same listeners as the NBD server's: QEMU's chardev and NBD
        # server both go through socket_listen (unix/inet_listen_saddr).
        if addr["type"] == "unix":
            chr_.listener, made = socket_addr.unix_listen(addr)
            if made is not None:
                chr_._created = (os.path.abspath(made), os.stat(made).st_ino)
        elif addr["type"] == "inet":
            chr_.listener = socket_addr.inet_listen(addr)
            host, port = _numeric(chr_.listener.getsockname())
            v6 = chr_.listener.family == socket.AF_INET6
            chr_.addr = {"type": "inet", "host": host, "port": port, "ipv6" if v6 else "ipv4": True}
        else:
            sock = socket_addr.listen_other(addr["type"], addr)
            assert sock is not None
            chr_.listener = sock
        if data.get("wait", False):
            print(
                f"info: QEMU waiting for connection on: {chr_.filename()}",
                file=sys.stderr,
                flush=True,
            )
            conn, _ = chr_.listener.accept()
            chr_._attach(conn)
        chr_.listener.setblocking(False)
        return chr_
    try:
        chr_._attach(_connect(addr))
    except GenericError:
        if not chr_.reconnect:
            raise
        chr_._try_connect()
    return chr_


class CmdlineSocket(SocketChardev):
    """A ``--chardev socket``: ``qmpgraph.server.startup`` made its sockets.

    Until a ``--monitor`` takes it, it behaves as a chardev-add'ed one (and
    owns the sockets: accepts lazily, unlinks its file when removed). Once a
    monitor serves the sockets, the connection state is read from the
    kernel's table instead, and the sockets stay the start-up's to close.
    """

    def __init__(
        self,
        label: str,
        addr: dict[str, Any],
        server: bool,
        *,
        listener: socket.socket | None,
        connections: list[socket.socket],
        created: tuple[str, int] | None,
    ) -> None:
        super().__init__(label, addr, {"server": server})
        self.listener = listener
        self._created = created
        if connections:
            self._attach(connections[0])

    def _served(self) -> bool:
        return self.frontend == "monitor"

    def refresh(self) -> None:
        """As ``SocketChardev.refresh`` while no monitor serves the sockets."""
        if self._served():
            return
        if self.listener is not None:
            self.listener.setblocking(False)
        super().refresh()

    def _monitor_connected(self) -> bool:
        if not self.server:
            return True  # connected at start-up
        if self.addr["type"] != "unix":
            return False
        return _unix_path_connected(self.addr["path"])

    def filename(self) -> str:
        """As ``SocketChardev``'s; a monitor's connection judged from the kernel."""
        if not self._served():
            return super().filename()
        if self._monitor_connected() and self.addr["type"] == "unix":
            return f"unix:{self.addr['path']},server=on" if self.server else "unix:"
        return "disconnected:" + self._address_text()

    def get(self, name: str) -> Any:
        """``connected`` and ``addr``."""
        if name == "connected" and self._served():
            return self._monitor_connected()
        return super().get(name)

    def close(self) -> None:
        """Close (and unlink) unless a monitor serves the sockets."""
        if not self._served():
            super().close()


def _unix_path_connected(path: str) -> bool:
    """Whether a connection accepted on the Unix listener at ``path`` is open
    (accepted sockets carry the listener's path in /proc/net/unix)."""
    full = os.path.abspath(path)
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return True
    for line in lines:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; St 03 = connected.
        if len(fields) == 8 and fields[5] == "03" and fields[7] in (path, full):
            return True
    return False
