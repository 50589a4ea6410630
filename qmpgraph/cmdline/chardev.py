"""``--chardev`` and ``--monitor``: from option text to validated specs.

The checks run in QEMU 7.2's order (``qemu_chr_new_from_opts``,
``qemu_chr_parse_socket``, ``qmp_chardev_validate_socket``,
``monitor_init``) with its messages. qmpgraph serves QMP over ``socket``
(Unix or TCP; listening, or connecting out with ``server=off``) and
``null`` chardevs. The ``ringbuf``, ``memory``, ``file``, ``pipe``,
``stdio``, ``pty``, ``udp``, ``serial`` and ``parallel`` backends become a
QMP ``ChardevBackend`` (``ChardevSpec.data``, as QEMU's ``qemu_chr_parse_*``
build it) that ``qmpgraph.chardev`` opens; ``mux`` (and ``mux=on``) is refused.

What does not live here: binding, connecting and serving
(``qmpgraph.server.startup``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.cmdline.keyval import option_dict
from qmpgraph.cmdline.qemuopts import CHARDEV_OPTS, QemuOpts, opts_help, parse_bool, parse_opts
from qmpgraph.protocol.qjson import qdict_order

__all__ = ["BACKENDS", "ChardevSpec", "MonitorSpec", "parse_chardev", "parse_monitor"]

#: QEMU 7.2's chardev backends, in the order ``--chardev help`` lists them.
BACKENDS = (
    "pty",
    "udp",
    "memory",
    "file",
    "socket",
    "stdio",
    "ringbuf",
    "null",
    "parallel",
    "pipe",
    "mux",
    "serial",
)
# Names QEMU also accepts for a backend.
_ALIASES = {"tty": "serial", "parport": "parallel"}
# Backends opened from ChardevSpec.data (qmpgraph.chardev.model), with the
# option that names their path and QEMU's message when it is missing.
_PATH_BACKENDS = {
    "file": ("out", "chardev: file: no filename given"),
    "pipe": ("device", "chardev: pipe: no device path given"),
    "serial": ("device", "chardev: serial/tty: no device path given"),
    "parallel": ("device", "chardev: parallel: no device path given"),
}
SUPPORTED_BACKENDS = ("socket", "null", "ringbuf", "memory", "stdio", "pty", "udp", *_PATH_BACKENDS)


@dataclass(frozen=True, slots=True)
class ChardevSpec:
    """A validated chardev.

    For a socket exactly one of ``path``, ``host`` (with ``port``) and ``fd``
    is set; ``server`` means listen, ``wait`` means block start-up until the
    first client connects. For the other backends ``data`` is the QMP
    ``ChardevBackend`` data (with ``logfile``/``logappend`` for any backend).
    """

    id: str
    backend: str
    path: str | None = None
    host: str | None = None
    port: str | None = None
    fd: str | None = None
    server: bool = False
    wait: bool = False
    # ipv4/ipv6/to of a TCP socket as given (None: not given).
    ipv4: bool | None = None
    ipv6: bool | None = None
    to: int | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """A validated ``--monitor``: QMP on chardev ``chardev``."""

    chardev: str
    pretty: bool = False
    id: str | None = None
    mode: str = "control"


class ChardevHelp(Exception):
    """``--chardev help`` (list backends, exit 0) or ``<backend>,help``
    (list options, exit 1): ``text`` goes to stdout."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.text = text
        self.status = status


def parse_chardev(text: str) -> tuple[ChardevSpec, list[str]]:
    """The chardev ``text`` describes, and QEMU's warnings about its syntax."""
    opts = parse_opts(CHARDEV_OPTS, text)
    if opts.help:
        raise ChardevHelp(opts_help(CHARDEV_OPTS), 1)
    backend = opts.get("backend")
    if backend in ("help", "?"):
        names = "".join(f"\n  {b}" for b in BACKENDS)
        raise ChardevHelp(f"Available chardev backend types: {names}\n", 0)
    try:
        return _validate(opts, backend), opts.warnings
    except CmdlineError as exc:
        exc.warnings = opts.warnings + exc.warnings
        raise


def _validate(opts: QemuOpts, backend: str | None) -> ChardevSpec:
    if opts.id is None:
        raise CmdlineError("chardev: no id specified")
    if backend is None:
        raise CmdlineError(f'chardev: "{opts.id}" missing backend')
    backend = _ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise CmdlineError(f"'{backend}' is not a valid char driver name")
    if backend not in SUPPORTED_BACKENDS:
        raise CmdlineError(f"qmpgraph does not support the '{backend}' chardev backend")
    if opts.get_bool("mux", False):
        raise CmdlineError("qmpgraph does not support mux=on")
    if backend == "socket":
        return _socket(opts, opts.id)
    data: dict[str, Any] = {}
    if opts.get("logfile") is not None:
        data["logfile"] = opts.get("logfile")
        data["logappend"] = opts.get_bool("logappend", False)
    if backend in _PATH_BACKENDS:
        key, missing = _PATH_BACKENDS[backend]
        path = opts.get("path")
        if path is None:
            raise CmdlineError(missing)
        data[key] = path
        if backend == "file":
            data["append"] = opts.get_bool("append", False)
    elif backend in ("ringbuf", "memory"):
        size = opts.get("size")
        if size is not None and parse_size(size) != 0:
            data["size"] = parse_size(size)
    elif backend == "udp":
        data.update(_udp(opts))
    elif backend == "stdio" and opts.get("signal") is not None:
        data["signal"] = opts.get_bool("signal", True)
    return ChardevSpec(opts.id, backend, data=data)


def _udp(opts: QemuOpts) -> dict[str, Any]:
    """``qemu_chr_parse_udp``: remote host (default localhost) and port, and a
    local address when either local option is given."""
    port = opts.get("port") or ""
    if not port:
        raise CmdlineError("chardev: udp: remote port not specified")
    flags = {k: opts.get_bool(k, False) for k in ("ipv4", "ipv6") if opts.get(k) is not None}
    remote = {"host": opts.get("host") or "localhost", "port": port, **flags}
    out: dict[str, Any] = {"remote": {"type": "inet", "data": remote}}
    localaddr, localport = opts.get("localaddr") or "", opts.get("localport") or ""
    if localaddr or localport:
        local = {"host": localaddr, "port": localport or "0", **flags}
        out["local"] = {"type": "inet", "data": local}
    return out


_SIZE_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """QemuOpts' size option: ``qemu_strtosz`` (bytes, or a k/M/G/T/P/E suffix)."""
    unit = _SIZE_SUFFIX.get(text[-1:].lower())
    number = text if unit is None else text[:-1]
    try:
        value = int(number, 0) if unit is None else int(float(number) * (1 << unit))
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 64:
        raise CmdlineError(
            "Parameter 'size' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively."
        )
    return value


def _socket(opts: QemuOpts, cid: str) -> ChardevSpec:
    path, host, port, fd = (opts.get(k) for k in ("path", "host", "port", "fd"))
    if (path is not None) + (fd is not None) + (host is not None) > 1:
        raise CmdlineError("None or one of 'path', 'fd' or 'host' option required.")
    if host is not None and port is None:
        raise CmdlineError("chardev: socket: no port given")
    server = opts.get_bool("server", False)
    tls_creds = opts.get("tls-creds")
    if path is None and host is None:
        if opts.get("reconnect") is not None:
            raise CmdlineError("'reconnect' option is incompatible with 'fd' address type")
        if tls_creds is not None and not server:
            raise CmdlineError(
                "'tls_creds' option is incompatible with 'fd' address type as client"
            )
    elif path is not None and tls_creds is not None:
        raise CmdlineError("'tls_creds' option is incompatible with 'unix' address type")
    if opts.get("tls-authz") is not None and tls_creds is None:
        raise CmdlineError("'tls_authz' option requires 'tls_creds' option")
    if server:
        if opts.get("reconnect") is not None:
            raise CmdlineError(
                "'reconnect' option is incompatible with socket in server listen mode"
            )
    else:
        if opts.get_bool("websocket", False):
            raise CmdlineError("Websocket client is not implemented")
        if opts.get("wait") is not None:
            raise CmdlineError("'wait' option is incompatible with socket in client connect mode")
    for unsupported in ("telnet", "tn3270", "websocket"):
        if opts.get_bool(unsupported, False):
            raise CmdlineError(f"qmpgraph does not support {unsupported}=on")
    if tls_creds is not None:
        raise CmdlineError("qmpgraph does not support tls-creds")
    if path is not None and opts.get_bool("abstract", False):
        raise CmdlineError("qmpgraph does not support abstract=on")
    if path is None and host is None and fd is None:
        # No address at all: QEMU reads it as an empty file descriptor number.
        raise CmdlineError("Unable to parse FD number ")
    return ChardevSpec(
        cid,
        "socket",
        path=path,
        host=host,
        port=port,
        fd=fd,
        server=server,
        wait=server and opts.get_bool("wait", True),
        ipv4=None if opts.get("ipv4") is None else opts.get_bool("ipv4", False),
        ipv6=None if opts.get("ipv6") is None else opts.get_bool("ipv6", False),
        # InetSocketAddress.to is a uint16: QEMU keeps the low 16 bits.
        to=None if (to := opts.get_number("to")) is None else to & 0xFFFF,
    )


def _bad_type(name: str, expected: str) -> CmdlineError:
    return CmdlineError(f"Invalid parameter type for '{name}', expected: {expected}")


def parse_monitor(text: str) -> MonitorSpec:
    """Visit ``text`` as QEMU's ``MonitorOptions`` (keyval or JSON).

    Only the visit: whether the chardev exists is checked by the caller.
    """
    d, keyval = option_dict(text, "chardev")
    values: dict[str, Any] = {}
    # QAPI member order of MonitorOptions: id, mode, pretty, chardev.
    for name, kind in (("id", "str"), ("mode", "enum"), ("pretty", "bool"), ("chardev", "str")):
        if name not in d:
            if name == "chardev":
                raise CmdlineError("Parameter 'chardev' is missing")
            continue
        v = d[name]
        if keyval:
            if not isinstance(v, str):
                raise CmdlineError(f"Parameters '{name}.*' are unexpected")
            if kind == "bool":
                v = parse_bool(name, v)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise _bad_type(name, "boolean")
        elif not isinstance(v, str):
            raise _bad_type(name, "string")
        if kind == "enum" and v not in ("readline", "control"):
            raise CmdlineError(f"Parameter '{name}' does not accept value '{v}'")
        values[name] = v
    leftover = [k for k in d if k not in values]
    if leftover:
        first = next(k for k in qdict_order(list(d)) if k not in values)
        raise CmdlineError(f"Parameter '{first}' is unexpected")
    return MonitorSpec(
        values["chardev"],
        values.get("pretty", False),
        values.get("id"),
        values.get("mode", "control"),
    )
