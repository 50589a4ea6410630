"""Chardev commands: chardev-add, chardev-change, chardev-remove,
chardev-send-break, ringbuf-write, ringbuf-read, query-chardev,
query-chardev-backends.

Checks run in QEMU 7.2's order with its messages (probed on
qemu-storage-daemon 7.2): ``chardev-add`` prefixes a backend's error with
"Failed to add chardev 'ID': "; ``chardev-change`` of a chardev nobody uses
removes it and adds the new one (so a failing change leaves no chardev, as
in QEMU), and refuses a chardev whose user (a monitor, a mux) cannot be
switched. Chardevs are not part of the block graph: no graph transaction.

What does not live here: the chardev objects and backends
(``qmpgraph.chardev``).
"""

from __future__ import annotations

import socket
from typing import Any

from qmpgraph.chardev.data import base64_text, glib_base64_decode, json_text, qmp_string_bytes
from qmpgraph.chardev.model import (
    QSD_BACKENDS,
    Chardev,
    ChardevTable,
    MuxChardev,
    PtyChardev,
    RingbufChardev,
    chardev_table,
    open_backend,
)
from qmpgraph.chardev.socket import CmdlineSocket, open_socket
from qmpgraph.cmdline.chardev import ChardevSpec
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.daemon import Daemon
from qmpgraph.errors import GenericError
from qmpgraph.objects.qom import tree_for
from qmpgraph.protocol import qjson


def table_of(daemon: Daemon) -> ChardevTable:
    """The daemon's chardevs; their sockets are closed when it stops."""
    table = chardev_table(daemon.graph)
    if not table.cleanup_registered:
        table.cleanup_registered = True
        daemon.on_stop(table.close_all)
    return table


def new_chardev(daemon: Daemon, label: str, backend: dict[str, Any]) -> Chardev:
    """``chardev_new``: open ``backend`` as chardev ``label`` (not yet in the tree)."""
    table = table_of(daemon)
    tree = tree_for(daemon.graph)

    def sock(lbl: str, data: dict[str, Any]) -> Chardev:
        return open_socket(lbl, data, objects=tree.lookup)

    return open_backend(table, label, backend, sock)


def _reply(chr_: Chardev) -> dict[str, Any]:
    if isinstance(chr_, PtyChardev):
        return {"pty": chr_.filename()[4:]}
    return {}


def _add(daemon: Daemon, label: str, backend: dict[str, Any]) -> dict[str, Any]:
    table = table_of(daemon)
    if table.find(label) is not None:
        raise GenericError(f"Chardev with id '{label}' already exists")
    try:
        chr_ = new_chardev(daemon, label, backend)
        try:
            table.add(chr_)
        except GenericError:
            chr_.close()  # an id such as "type" clashes with the container's property
            raise
    except GenericError as exc:
        raise GenericError(f"Failed to add chardev '{label}': {exc.desc}") from None
    return _reply(chr_)


@command("chardev-add")
def chardev_add(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Create a chardev; the reply names a new pty."""
    return _add(ctx.daemon, args["id"], args["backend"])


@command("chardev-change")
def chardev_change(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """Replace a chardev's backend; only an unused chardev can be changed in qsd."""
    label = args["id"]
    table = table_of(ctx.daemon)
    chr_ = table.find(label)
    if chr_ is None:
        raise GenericError(f"Chardev '{label}' does not exist")
    if isinstance(chr_, MuxChardev):
        raise GenericError("Mux device hotswap not supported yet")
    if chr_.frontend is None:
        table.remove(label)
        return _add(ctx.daemon, label, args["backend"])
    # qsd's frontends (monitors, muxes) have no chr_be_change hook.
    raise GenericError("Chardev user does not support chardev hotswap")


@command("chardev-remove")
def chardev_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Remove a chardev nobody uses."""
    label = args["id"]
    table = table_of(ctx.daemon)
    chr_ = table.find(label)
    if chr_ is None:
        raise GenericError(f"Chardev '{label}' not found")
    if chr_.busy():
        raise GenericError(f"Chardev '{label}' is busy")
    table.remove(label)


@command("chardev-send-break")
def chardev_send_break(ctx: CommandContext, args: dict[str, Any]) -> None:
    """A break event to the chardev's frontend (none in qsd takes any action)."""
    label = args["id"]
    if table_of(ctx.daemon).find(label) is None:
        raise GenericError(f"Chardev '{label}' not found")


def _ringbuf(ctx: CommandContext, device: str) -> RingbufChardev:
    chr_ = table_of(ctx.daemon).find(device)
    if chr_ is None:
        raise GenericError(f"Device '{device}' not found")
    if not isinstance(chr_, RingbufChardev):
        raise GenericError(f"{device} is not a ringbuf device")
    return chr_


@command("ringbuf-write")
def ringbuf_write(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Write ``data`` (UTF-8 text, or base64) into a ringbuf chardev."""
    chr_ = _ringbuf(ctx, args["device"])
    # QEMU works on the C string: a NUL (modified UTF-8 C0 80 after the JSON
    # parser) ends nothing, but base64 sees those bytes as invalid characters.
    data = qmp_string_bytes(args["data"])
    if args.get("format") == "base64":
        data = glib_base64_decode(data)
    chr_.write(data)


@command("ringbuf-read")
def ringbuf_read(ctx: CommandContext, args: dict[str, Any]) -> str:
    """Read up to ``size`` bytes from a ringbuf chardev, as UTF-8 text or base64."""
    chr_ = _ringbuf(ctx, args["device"])
    size = args["size"]
    if size <= 0:
        raise GenericError("size must be greater than zero")
    data = chr_.read(size)
    if args.get("format") == "base64":
        return base64_text(data)
    return json_text(data)


@command("query-chardev")
def query_chardev(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chardev: label, filename, frontend-open."""
    return [
        {"label": c.label, "filename": c.filename(), "frontend-open": c.frontend_open()}
        for c in table_of(ctx.daemon).all()
    ]


@command("query-chardev-backends")
def query_chardev_backends(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The backends qsd 7.2 builds in."""
    return [{"name": name} for name in QSD_BACKENDS]


# -- command-line chardevs ---------------------------------------------------------


def open_from_cmdline(
    daemon: Daemon,
    spec: ChardevSpec,
    listener: socket.socket | None = None,
    connections: list[socket.socket] | None = None,
    created: tuple[str, int] | None = None,
) -> Chardev:
    """The chardev a ``--chardev`` stands for, opened (not yet in the tree).

    A socket's sockets were made by ``qmpgraph.server.startup`` (``listener``,
    ``connections``, the socket file ``created``); the chardev adopts them.
    """
    if spec.backend == "socket":
        if spec.path is not None:
            addr: dict[str, Any] = {"type": "unix", "path": spec.path}
        elif spec.host is not None:
            addr = {"type": "inet", "host": spec.host, "port": spec.port or ""}
        else:
            addr = {"type": "fd", "str": spec.fd or ""}
        return CmdlineSocket(
            spec.id,
            addr,
            spec.server,
            listener=listener,
            connections=connections or [],
            created=created,
        )
    chr_ = new_chardev(daemon, spec.id, {"type": spec.backend, "data": dict(spec.data)})
    if isinstance(chr_, PtyChardev):
        # QEMU's qemu_printf: stdout at start-up; a QMP monitor swallows it.
        print(f"char device redirected to {chr_.filename()[4:]} (label {spec.id})", flush=True)
    return chr_


def add_from_cmdline(daemon: Daemon, chr_: Chardev) -> None:
    """Put a command-line chardev into ``/chardevs`` (its id is new)."""
    table_of(daemon).add(chr_)


def attach_monitor(daemon: Daemon, label: str, pretty: bool = False) -> None:
    """``--monitor``: the chardev's frontend is now a QMP monitor.

    A chardev that is open at once (not a socket: a ringbuf, a file) gets
    the greeting straight away, without ``oob`` where the backend has no
    context of its own (a ringbuf), as qsd 7.2 writes it.
    """
    chr_ = table_of(daemon).find(label)
    if chr_ is None:
        return
    chr_.frontend = "monitor"
    if isinstance(chr_, CmdlineSocket):
        return
    greeting = daemon.greeting()
    if not chr_.gcontext:
        greeting["QMP"]["capabilities"] = []
    text = qjson.dumps(greeting, pretty=pretty).replace("\n", "\r\n")
    chr_.write_output(text.encode("ascii") + b"\r\n")
