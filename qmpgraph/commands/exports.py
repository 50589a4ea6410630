"""Block exports and the NBD server: nbd-server-start/-stop, block-export-add/-del,
the legacy nbd-server-add/-remove, and query-block-exports.

An export is a BlockBackend root parent of its node (QEMU's ``blk_exp_add``):
permissions ``consistent-read`` (plus ``write`` when writable), shared
everything but ``resize``.  Graph changes run in one transaction per command;
the export table changes through undoable actions, and the side effects that
must not happen on abort (the BLOCK_EXPORT_DELETED event, disconnecting
clients, closing the listener) are queued with ``tran.on_commit``.

Deleting an export a client holds: mode safe refuses; mode hard hangs the
clients up and marks the export shutting down (QEMU's ``!user_owned``: its
id stays taken and its node in use, its NBD name is free); the runtime calls
``finish_shutdown`` once the last client has gone, which deletes it and
sends the event, after the command's reply.

The listening socket is bound synchronously (``socket_addr``), so that
bind errors are the command's errors; serving it is the job of a runtime
(``qmpgraph.server.nbd``), started only when the command runs inside trio.

What does not live here: the NBD protocol (``qmpgraph.nbd``), sockets'
tasks and request execution (``qmpgraph.server.nbd``, ``qmpgraph.io``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.commands import socket_addr
from qmpgraph.commands.bitmaps import export_bitmaps, release_export_bitmaps
from qmpgraph.commands.iothread import export_iothread
from qmpgraph.commands.registry import command
from qmpgraph.errors import GenericError
from qmpgraph.graph.aio_context import unpin
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.jobs.drain import DrainsOnAbort, drain_node_bounce
from qmpgraph.nbd import constants as nbdc
from qmpgraph.objects import id_wellformed, tree_for
from qmpgraph.objects.misc import IOThread
from qmpgraph.transactions.actions import add_root_parent, remove_root_parent
from qmpgraph.transactions.composite import detach_child, root_attach, set_edge_perms_checked
from qmpgraph.transactions.engine import Action, Transaction

if TYPE_CHECKING:
    from qmpgraph.commands.context import CommandContext
    from qmpgraph.daemon import Daemon
    from qmpgraph.graph.graph import BlockGraph


class NBDRuntime(Protocol):
    """What the serving side offers the commands (``qmpgraph.server.nbd``)."""

    def has_clients(self, export: NBDExport) -> bool:
        """Whether a client is connected to ``export``."""
        ...

    def newest_client(self, export: NBDExport) -> int:
        """When the newest client of ``export`` connected (a count; 0: none)."""
        ...

    def disconnect(self, export: NBDExport) -> None:
        """Hang up every client of ``export``."""
        ...

    def stop(self) -> None:
        """Stop accepting and hang up every client."""
        ...


@dataclass(eq=False)
class NBDExport:
    """One block export of type nbd (QEMU's ``NBDExport`` with its ``BlockExport``)."""

    id: str
    name: str
    description: str | None
    node: Node
    backend: BlockBackend
    writable: bool
    allocation_depth: bool
    size: int
    nbdflags: int
    request_alignment: int = 1
    max_transfer: int = nbdc.MAX_BUFFER_SIZE
    # The exported dirty bitmaps (busy while exported), in context-id order.
    bitmaps: tuple[DirtyBitmap, ...] = ()
    # Deleted in mode hard while clients were connected: the user's reference
    # is dropped and the name released, but the export (its id, its node)
    # stays until its last client has gone (QEMU's !user_owned).
    shutting_down: bool = False

    @property
    def bitmap_names(self) -> tuple[str, ...]:
        """Their names, as the ``qemu:dirty-bitmap:NAME`` contexts show them."""
        return tuple(str(bm.name) for bm in self.bitmaps)

    @property
    def node_name(self) -> str:
        """The exported node's name (as query-block-exports shows it): the
        BlockBackend's current root, which a mirror's pivot may have moved."""
        root = self.backend.root
        node = root.child if root is not None and root.child is not None else self.node
        return node.node_name


@dataclass(eq=False)
class NBDServer:
    """The running NBD server: its listening socket and limits."""

    sock: socket.socket
    unix_path: str | None
    max_connections: int
    runtime: NBDRuntime | None = None

    def close(self) -> None:
        """Stop serving and release the socket (a Unix socket's file is removed)."""
        if self.runtime is not None:
            self.runtime.stop()
        self.sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)


@dataclass(eq=False)
class ExportTable:
    """A daemon's exports (newest first, as QEMU's list) and its NBD server."""

    exports: list[NBDExport] = field(default_factory=list)
    server: NBDServer | None = None

    def by_id(self, export_id: str) -> NBDExport | None:
        """The export with this id."""
        return next((e for e in self.exports if e.id == export_id), None)

    def find(self, name: str) -> NBDExport | None:
        """The NBD export called ``name`` (``ExportDirectory`` of the protocol core);
        one shutting down has given up its name."""
        return next((e for e in self.exports if e.name == name and not e.shutting_down), None)

    def all(self) -> list[NBDExport]:
        """NBD exports oldest first (the NBD server's own list order), without
        those shutting down (gone from it, as from ``find``)."""
        return [e for e in reversed(self.exports) if not e.shutting_down]


_TABLES: weakref.WeakKeyDictionary[Daemon, ExportTable] = weakref.WeakKeyDictionary()


def export_table(daemon: Daemon) -> ExportTable:
    """The daemon's export table (created on first use)."""
    table = _TABLES.get(daemon)
    if table is None:
        table = _TABLES[daemon] = ExportTable()
        daemon.on_stop(lambda: _stop_server(table))
    return table


def _stop_server(table: ExportTable) -> None:
    if table.server is not None:
        table.server.close()
        table.server = None


# -- undoable changes of the table ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportAdded(Action):
    """An export entered the table; removed again on abort."""

    name: ClassVar[str] = "export-add"
    table: ExportTable
    export: NBDExport

    def abort(self) -> None:
        self.table.exports.remove(self.export)


@dataclass(frozen=True, slots=True)
class ExportRemoved(Action):
    """An export left the table; put back at its place on abort."""

    name: ClassVar[str] = "export-del"
    table: ExportTable
    export: NBDExport
    index: int

    def abort(self) -> None:
        self.table.exports.insert(self.index, self.export)


@dataclass(frozen=True, slots=True)
class ExportShutdown(Action):
    """An export started shutting down; owned by the user again on abort."""

    name: ClassVar[str] = "export-shutdown"
    export: NBDExport

    def abort(self) -> None:
        self.export.shutting_down = False


@dataclass(frozen=True, slots=True)
class ServerSet(Action):
    """The server slot changed; restored on abort (the new socket is closed)."""

    name: ClassVar[str] = "nbd-server"
    table: ExportTable
    old: NBDServer | None
    new: NBDServer | None

    def abort(self) -> None:
        if self.new is not None:
            self.new.close()
        self.table.server = self.old


# -- the server -------------------------------------------------------------------


def _listen(addr: dict[str, Any]) -> tuple[socket.socket, str | None]:
    """Bind and listen as QEMU's socket_listen (each family in ``socket_addr``)."""
    kind = addr.get("type")
    data = addr.get("data", {})
    if kind == "unix":
        return socket_addr.unix_listen(data)
    if kind == "inet":
        return socket_addr.inet_listen(data), None
    other = socket_addr.listen_other(str(kind), data)
    if other is not None:
        return other, None
    raise GenericError(f"socket family '{kind}' is not supported by qmpgraph")


def _spawn_runtime(daemon: Daemon, table: ExportTable, server: NBDServer) -> None:
    """Start serving ``server`` if the command runs inside trio (not in library tests)."""
    from qmpgraph.server import nbd as nbd_server  # noqa: PLC0415 (trio only when serving)

    server.runtime = nbd_server.start_runtime(daemon, table, server)


@command("nbd-server-start")
def nbd_server_start(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Start the NBD server on ``addr`` (tls-creds are not supported)."""
    daemon = ctx.daemon
    table = export_table(daemon)
    with daemon.graph_transaction("nbd-server-start", args) as tran:
        if table.server is not None:
            raise GenericError("NBD server already running")
        # QEMU listens first: a bind error wins over a TLS one.
        sock, path = _listen(args["addr"])
        server = NBDServer(sock, path, int(args.get("max-connections", 0)))
        tran.add(ServerSet(table, None, server))
        creds = args.get("tls-creds")
        if creds is not None:
            # qmpgraph models no tls-creds-* object: any object found is not one.
            if tree_for(daemon.graph).lookup(str(creds)) is None:
                raise GenericError(f"No TLS credentials with id '{creds}'")
            raise GenericError(f"Object with id '{creds}' is not TLS credentials")
        table.server = server
        tran.on_commit(lambda: _spawn_runtime(daemon, table, server))


@command("nbd-server-stop")
def nbd_server_stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop the server and delete every NBD export (each with its event)."""
    daemon = ctx.daemon
    table = export_table(daemon)
    with daemon.graph_transaction("nbd-server-stop", args) as tran:
        server = table.server
        if server is None:
            raise GenericError("NBD server not running")
        # Deleted (and announced) oldest first, as qsd 7.2 does, except those
        # with clients: they go when their clients, hung up, have left (newest
        # connection first).  Those shutting down go too: QEMU waits for them.
        # (In QEMU, exports sharing a node with a client's export interleave
        # otherwise: deleting one drains the node, which polls in between.)
        runtime = server.runtime
        order = list(reversed(table.exports))
        if runtime is not None:
            order.sort(key=lambda e: -runtime.newest_client(e))
            order.sort(key=lambda e: runtime.newest_client(e) > 0)
        for exp in order:
            _delete_export(tran, daemon, table, exp)
        tran.add(ServerSet(table, server, None))
        table.server = None
        tran.on_commit(server.close)


# -- exports ----------------------------------------------------------------------


def _node_size(node: Node) -> int:
    return node.driver.size(node) if node.driver is not None else 0


def _export_flags(writable: bool, max_connections: int) -> int:
    flags = nbdc.FLAG_HAS_FLAGS | nbdc.FLAG_SEND_FLUSH | nbdc.FLAG_SEND_FUA | nbdc.FLAG_SEND_CACHE
    if max_connections != 1:
        flags |= nbdc.FLAG_CAN_MULTI_CONN
    if writable:
        flags |= nbdc.FLAG_SEND_TRIM | nbdc.FLAG_SEND_WRITE_ZEROES | nbdc.FLAG_SEND_FAST_ZERO
    else:
        flags |= nbdc.FLAG_READ_ONLY
    return flags


def _add_export(
    tran: Transaction, daemon: Daemon, args: dict[str, Any], *, legacy: bool = False
) -> NBDExport:
    """blk_exp_add then nbd_export_create, in QEMU 7.2's order of checks."""
    graph = daemon.graph
    table = export_table(daemon)
    export_id = str(args["id"])
    if not id_wellformed(export_id):
        raise GenericError("Invalid block export id")
    if table.by_id(export_id) is not None:
        raise GenericError(f"Block export id '{export_id}' is already in use")
    if args.get("type") != "nbd":
        raise GenericError("No driver found for the requested export type")
    node_name = str(args["node-name"])
    node = graph.lookup(node_name)
    if node is None:
        raise GenericError(f"Cannot find device='' nor node-name='{node_name}'")
    writable = bool(args.get("writable", False))
    if node.read_only and writable:
        raise GenericError("Cannot export read-only node as writable")
    iothread = args.get("iothread")
    thread = tree_for(graph).lookup(iothread) if iothread is not None else None
    if iothread is not None and not isinstance(thread, IOThread):
        raise GenericError(f'iothread "{iothread}" not found')
    fixed = bool(args.get("fixed-iothread"))
    io = thread if isinstance(thread, IOThread) else None
    pin_fixed = export_iothread(tran, daemon, node, io, fixed)
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else 0)
    bb = BlockBackend()
    add_root_parent(tran, graph, bb)
    pin_fixed(bb)
    edge = root_attach(
        tran,
        graph,
        bb,
        node,
        "root",
        role=Role.FILTERED | Role.PRIMARY,
        perm=int(perm),
        shared=PERM_ALL,
    )
    tran.add(DrainsOnAbort(daemon, node))  # a failure from here on unrefs the BlockBackend
    server = table.server
    if server is None:
        raise GenericError("NBD server not running")
    name = str(args.get("name", node_name) if not legacy else args["name"])
    if len(name.encode()) > nbdc.MAX_STRING_SIZE:
        raise GenericError(f"export name '{name}' too long")
    description = args.get("description")
    if description is not None and len(str(description).encode()) > nbdc.MAX_STRING_SIZE:
        raise GenericError(f"description '{description}' too long")
    if table.find(name) is not None:
        raise GenericError(f"NBD server already has export named '{name}'")
    size = _node_size(node)
    # Resizing is not shared while exported: the export's size is fixed.
    set_edge_perms_checked(tran, graph, edge, int(perm), PERM_ALL & ~Perm.RESIZE)
    bitmaps = export_bitmaps(tran, graph, node, list(args.get("bitmaps", [])), not writable)
    exp = NBDExport(
        id=export_id,
        name=name,
        description=None if description is None else str(description),
        node=node,
        backend=bb,
        writable=writable,
        allocation_depth=bool(args.get("allocation-depth", False)),
        # blk_getlength: whole sectors, rounded up (a file's last partial sector counts).
        size=-(-size // nbdc.SECTOR_SIZE) * nbdc.SECTOR_SIZE,
        nbdflags=_export_flags(writable, server.max_connections),
        request_alignment=node.driver.request_alignment(node) if node.driver else 1,
        bitmaps=bitmaps,
    )
    table.exports.insert(0, exp)
    tran.add(ExportAdded(table, exp))
    return exp


def _delete_export(tran: Transaction, daemon: Daemon, table: ExportTable, exp: NBDExport) -> None:
    """Remove ``exp`` from the graph and the table; clients and the event follow commit."""
    graph: BlockGraph = daemon.graph
    edge: Edge | None = exp.backend.root
    node = edge.child if edge is not None else None
    if edge is not None:
        detach_child(tran, graph, edge)
    remove_root_parent(tran, graph, exp.backend)
    tran.on_commit(lambda: unpin(exp.backend))
    release_export_bitmaps(tran, exp.bitmaps)
    index = table.exports.index(exp)
    del table.exports[index]
    tran.add(ExportRemoved(table, exp, index))
    server = table.server

    def after() -> None:
        if server is not None and server.runtime is not None:
            server.runtime.disconnect(exp)
        if node is not None:
            # Removing the export's BlockBackend drains its node twice in
            # QEMU 7.2: the jobs above it pause and resume twice.
            drain_node_bounce(daemon, node, times=2)
        daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": exp.id})

    tran.on_commit(after)


@command("block-export-add")
def block_export_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Export a node (type nbd) through the running NBD server."""
    with ctx.daemon.graph_transaction("block-export-add", args) as tran:
        _add_export(tran, ctx.daemon, args)


@command("nbd-server-add")
def nbd_server_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The legacy form: export ``device`` under ``name`` (default: the device)."""
    daemon = ctx.daemon
    with daemon.graph_transaction("nbd-server-add", args) as tran:
        # QEMU 7.2 looks the device up, then leaves every other check (the
        # name as an export id first, then the server and the export name)
        # to block-export-add's path.
        device = str(args["device"])
        name = str(args.get("name", device))
        writable = bool(args.get("writable", False))
        node = daemon.graph.lookup(device)
        if node is None:
            raise GenericError(f"Cannot find device='{device}' nor node-name='{device}'")
        # nbd-server-add quietly exports a read-only node read-only.
        if node.read_only:
            writable = False
        opts: dict[str, Any] = {
            "type": "nbd",
            "id": name,
            "node-name": device,
            "writable": writable,
            "name": name,
        }
        if "description" in args:
            opts["description"] = args["description"]
        if "bitmap" in args:
            opts["bitmaps"] = [args["bitmap"]]
        _add_export(tran, daemon, opts, legacy=True)


def _remove(ctx: CommandContext, export_id: str, args: dict[str, Any], command_name: str) -> None:
    daemon = ctx.daemon
    table = export_table(daemon)
    with daemon.graph_transaction(command_name, args) as tran:
        exp = table.by_id(export_id)
        if exp is None:
            raise GenericError(f"Export '{export_id}' is not found")
        if exp.shutting_down:
            raise GenericError(f"Export '{export_id}' is already shutting down")
        server = table.server
        runtime = server.runtime if server is not None else None
        if runtime is None or not runtime.has_clients(exp):
            _delete_export(tran, daemon, table, exp)
            return
        if args.get("mode", "safe") == "safe":
            raise GenericError(f"export '{export_id}' still in use")
        # Mode hard: the clients are hung up; the export (and the event) goes
        # once the last one has left, after this reply (finish_shutdown).
        exp.shutting_down = True
        tran.add(ExportShutdown(exp))
        tran.on_commit(lambda: runtime.disconnect(exp))


def finish_shutdown(daemon: Daemon, exp: NBDExport) -> None:
    """The last client of ``exp``, shutting down, has left: delete it (QEMU's
    blk_exp_delete_bh).  Called by the runtime; nothing if already deleted
    (nbd-server-stop deletes exports shutting down too)."""
    table = export_table(daemon)
    if exp not in table.exports:
        return
    with daemon.graph_transaction("export-delete", {"id": exp.id}) as tran:
        _delete_export(tran, daemon, table, exp)


@command("block-export-del")
def block_export_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Delete an export (``mode`` safe refuses while clients are connected)."""
    _remove(ctx, str(args["id"]), args, "block-export-del")


@command("nbd-server-remove")
def nbd_server_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The legacy form of block-export-del, by export id (= legacy name)."""
    _remove(ctx, str(args["name"]), args, "nbd-server-remove")


@command("query-block-exports")
def query_block_exports(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every export, newest first."""
    del args
    return [
        {"id": e.id, "type": "nbd", "node-name": e.node_name, "shutting-down": e.shutting_down}
        for e in export_table(ctx.daemon).exports
    ]
