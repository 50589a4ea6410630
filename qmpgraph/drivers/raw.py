"""The ``raw`` format driver: a window (offset, size) onto its ``file`` child.

Without ``offset`` and ``size`` the file edge is FILTERED|PRIMARY ("filter-like"
mode; raw is still not a filter); with either it is DATA|PRIMARY.  Its perm
rule takes WRITE and RESIZE on the file only when its own parents need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext, file_child
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Perm, Role
from qmpgraph.protocol.qjson import qdict_order

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph


@dataclass(frozen=True, slots=True)
class RawState:
    """Per-node state of a raw node."""

    offset: int
    size: int
    has_size: bool


class Raw(Driver):
    """raw: a format driver with no metadata."""

    format_name = "raw"
    is_format = True
    options = frozenset({"offset", "size"})
    mutable_options = frozenset({"offset", "size"})
    children = (ChildSpec("file", Role.FILTERED | Role.PRIMARY),)

    @staticmethod
    def file_role(options: dict[str, Any]) -> Role:
        """FILTERED|PRIMARY without a size and a non-zero offset, else DATA|PRIMARY."""
        if options.get("offset") or "size" in options:
            return Role.DATA | Role.PRIMARY
        return Role.FILTERED | Role.PRIMARY

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file``, then check offset and size against its size."""
        self.reject_unknown(options)
        # QemuOpts size parsing, in the QDict's iteration order.
        for key in qdict_order([k for k in options if k in self.options]):
            if int(options[key]) < 0:
                raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")
        edge = ctx.open_child(node, options, "file", self.file_role(options))
        assert edge is not None and edge.child is not None
        node.state = self._window(edge.child, options)

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """raw_reopen_prepare: offset and size again, against the current file."""
        del graph
        taken: dict[str, Any] = {k: options.pop(k) for k in ("offset", "size") if k in options}
        assert node.file is not None and node.file.child is not None
        return self._window(node.file.child, taken)

    @staticmethod
    def _window(child: Node, options: dict[str, Any]) -> RawState:
        """raw_apply_options: the (offset, size) window checked against ``child``."""
        # bdrv_getlength() counts whole 512-byte sectors.
        real = child.driver.size(child) if child.driver is not None else 0
        real = (real + 511) // 512 * 512
        offset = int(options.get("offset", 0))
        has_size = "size" in options
        if offset > real:
            raise GenericError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        size = int(options["size"]) if has_size else real - offset
        if has_size and real - offset < size:
            raise GenericError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal "
                f"to the  actual size of the containing file ({real})"
            )
        if has_size and size % 512:
            raise GenericError("Specified size is not multiple of 512")
        return RawState(offset, size, has_size)

    def adjust_default_perms(
        self, node: Node, perm: int, shared: int, nperm: int, nshared: int
    ) -> tuple[int, int]:
        """WRITE and RESIZE only as far as the parents want them."""
        del node, shared
        keep = Perm.WRITE | Perm.RESIZE
        nperm = (nperm & ~keep) | (perm & keep)
        return int(nperm), nshared

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Read through the window."""
        state = node.state
        base = state.offset if isinstance(state, RawState) else 0
        return super().read(node, base + offset, length)

    def size(self, node: Node) -> int:
        """raw_co_getlength: the window, re-read from ``file`` (it may have been resized)."""
        state = node.state
        if not isinstance(state, RawState):
            return 0
        child = file_child(node)
        if child is None or child.driver is None:
            return state.size
        length = (child.driver.size(child) + 511) // 512 * 512
        if length < state.offset:
            return 0
        if state.has_size:
            return min(state.size, length - state.offset)
        return length - state.offset


DRIVERS = (Raw(),)
