"""The ``Driver`` base class: the control-plane contract of a block driver.

A driver is a stateless singleton describing one ``driver`` value of
blockdev-add: its constants (``is_filter``, ``filtered_child_is_backing``,
``is_format``, ``supports_backing``, ``protocol``), its options, its children
and their roles, its child-permission function, and its open-time checks.
Per-node state lives in ``Node.state``.  No I/O path lives here.

Optional hooks (``strong_options``, ``gather_child_options``,
``refresh_exact_filename``) serve the queries' filename refresh
(``bdrv_refresh_filename``); their defaults mean "the generic rule".  The
helpers ``file_child``, ``node_size`` and ``node_alignment`` read a child
through its driver.

Opening: the generic open path (``qmpgraph.drivers.open``) parses the generic
options, then calls ``Driver.open(ctx, node, options)``, where ``options`` holds
only the driver's own keys plus its child keys (still nested).  The driver
opens its children through ``ctx.open_child(...)``, which handles inline
definitions, references and ``None``, inside the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import ReopenQueue, default_perms
from qmpgraph.graph.perms import Role

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph
    from qmpgraph.transactions.engine import Transaction

# The role of a filter's filtered child (``bs->file`` of the filter).
FILTERED = Role.FILTERED | Role.PRIMARY

# (node, a child's full options) -> the driver's child options for a json: filename.
GatherChildOptions = Callable[[Node, Callable[[Node], dict[str, Any]]], dict[str, Any]]
# (node, a child's exact filename, node's full options) -> its exact filename or "".
RefreshExactFilename = Callable[[Node, Callable[[Node], str], dict[str, Any]], str]


def file_child(node: Node) -> Node | None:
    """The node below ``node.file`` (its PRIMARY or filtered child), if any."""
    edge = node.file
    return edge.child if edge is not None else None


def node_size(node: Node | None) -> int:
    """``node``'s size through its driver; 0 without a node or a driver."""
    if node is None or node.driver is None:
        return 0
    return node.driver.size(node)


def node_alignment(node: Node | None) -> int:
    """``node``'s request alignment through its driver; 1 without a node or a driver."""
    if node is None or node.driver is None:
        return 1
    return node.driver.request_alignment(node)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child a driver may have: its edge name and its usual role."""

    name: str
    role: Role
    required: bool = True


class OpenContext(Protocol):
    """What a driver's ``open`` may use (implemented by the generic open path)."""

    graph: BlockGraph
    tran: Transaction

    def open_child(
        self,
        parent: Node,
        options: dict[str, Any],
        name: str,
        role: int,
        *,
        required: bool = True,
        implicit: dict[str, Any] | None = None,
    ) -> Edge | None:
        """Open or look up child ``name`` from ``options`` and attach it to ``parent``.

        ``implicit`` gives options to use when ``options`` has no ``name`` key
        (a child named by the image header).
        """
        ...


class Driver:
    """Base class of every block driver: defaults are a protocol driver without children."""

    # An instance attribute (not a ClassVar): one class may serve several names.
    format_name: str = ""
    is_filter: ClassVar[bool] = False
    filtered_child_is_backing: ClassVar[bool] = False
    is_format: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    protocol: ClassVar[bool] = False
    supports_reopen: ClassVar[bool] = True
    # Option keys the driver itself consumes (besides the generic ones and children).
    options: ClassVar[frozenset[str]] = frozenset()
    # Keys that may change in blockdev-reopen.
    mutable_options: ClassVar[frozenset[str]] = frozenset()
    children: ClassVar[tuple[ChildSpec, ...]] = ()
    # Options that make the node's filename a json: one when given
    # (the driver's ``strong_runtime_opts``); ``strong_options`` lists them.
    strong_runtime_options: ClassVar[tuple[str, ...]] = ()
    # Hooks of the filename refresh that replace the generic rule; None keeps it.
    # ``gather_child_options``: the children's part of the full options
    # (``.bdrv_gather_child_options``, quorum's one ``children`` list).
    gather_child_options: GatherChildOptions | None = None
    # ``refresh_exact_filename``: the exact filename (``.bdrv_refresh_filename``,
    # ``blkdebug:...``/``blkverify:...``).
    refresh_exact_filename: RefreshExactFilename | None = None

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Check options, open children, set ``node.state``; raise GenericError."""
        del ctx, node
        self.reject_unknown(options)

    def reject_unknown(self, options: dict[str, Any]) -> None:
        """QEMU's leftover-option error for keys the driver did not consume."""
        for key in options:
            if key not in self.options and key not in {c.name for c in self.children}:
                raise self.leftover_option(key)

    def leftover_option(self, key: str) -> GenericError:
        """QEMU's error for option ``key`` left over once the node is open."""
        kind = "protocol" if self.protocol else "format"
        verb = "doesn't" if self.protocol else "does not"
        return GenericError(f"Block {kind} '{self.format_name}' {verb} support the option '{key}'")

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """blockdev-reopen's driver check of the new (flattened) ``options``.

        Remove the keys the driver takes over (as QEMU's QemuOpts absorb does);
        keys left in ``options`` must equal the old ones.  Return the new
        ``node.state`` to install on commit, or None to keep it; raise
        GenericError to refuse.  The default takes nothing (null-co's rule).
        """
        del graph, node, options
        return None

    def reopen_commit(self, tran: Transaction, node: Node, old_state: Any) -> None:
        """bdrv_reopen_commit's driver part, run after the new state is installed.

        ``old_state`` is the state before the reopen.  Drivers whose state
        holds references (throttle's group) move them here, in ``tran``.  The
        default does nothing.
        """
        del tran, node, old_state

    def child_perm(
        self,
        node: Node,
        edge: Edge | None,
        role: int,
        perm: int,
        shared: int,
        *,
        queue: ReopenQueue | None,
    ) -> tuple[int, int]:
        """The (perm, shared) ``node`` needs on a child with ``role``.

        The default is QEMU's ``bdrv_default_perms`` followed by
        ``adjust_default_perms``; drivers with another rule override this.
        """
        del edge
        nperm, nshared = default_perms(node, role, queue, perm, shared)
        return self.adjust_default_perms(node, perm, shared, nperm, nshared)

    def adjust_default_perms(
        self, node: Node, perm: int, shared: int, nperm: int, nshared: int
    ) -> tuple[int, int]:
        """The driver's change to the default rule's (``nperm``, ``nshared``).

        ``perm``/``shared`` are what the node's parents take and share.  The
        default changes nothing.
        """
        del node, perm, shared
        return nperm, nshared

    def check_perm(self, node: Node, perm: int, shared: int) -> None:
        """Driver hook run during refresh (file locking would go here)."""

    def set_perm(self, node: Node, perm: int, shared: int) -> None:
        """Commit hook of ``check_perm``."""

    def abort_perm_update(self, node: Node) -> None:
        """Abort hook of ``check_perm``."""

    def request_alignment(self, node: Node) -> int:
        """Request alignment in bytes; refresh checks sizes against it."""
        del node
        return 1

    def size(self, node: Node) -> int:
        """Virtual size in bytes (control-plane view)."""
        state = node.state
        return int(getattr(state, "size", 0))

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Read bytes for format probes: through ``file`` by default, zeros without."""
        child = file_child(node)
        if child is not None and child.driver is not None:
            return child.driver.read(child, offset, length)
        return bytes(length)

    def filename(self, node: Node) -> str:
        """The node's filename as queries report it."""
        child = file_child(node)
        if child is not None and child.driver is not None:
            return child.driver.filename(child)
        return ""

    def strong_options(self, node: Node) -> dict[str, Any]:
        """The strong runtime options ``node`` was opened with, in QEMU's order.

        Non-empty means the filename must be a json: one.  The default lists
        the ``strong_runtime_options`` present in ``node.options``.
        """
        return {k: node.options[k] for k in self.strong_runtime_options if k in node.options}

    def close(self, node: Node) -> None:
        """Release per-node resources after the node was deleted (on commit)."""
