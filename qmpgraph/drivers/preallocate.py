"""The ``preallocate`` filter: grows ``file`` ahead of writes past its end.

QEMU 7.2 (block/preallocate.c): ``file`` (FILTERED|PRIMARY) opens first,
then ``prealloc-align``/``prealloc-size`` (QemuOpts sizes) are checked:
non-negative, the alignment a multiple of 512 and of the child's request
alignment.  Reopen re-reads both.  Permissions: the default rule, with
WRITE|RESIZE taken and unshared when the parents take both.  No data path
lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import OpenContext, file_child, node_alignment
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Perm
from qmpgraph.protocol.qjson import qdict_order

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph

_DEFAULT_ALIGN = 1 << 20
_NOT_512 = "prealloc-align parameter of preallocate filter is not aligned to 512"


class Preallocate(FilterDriver):
    """preallocate: takes WRITE|RESIZE and unshares them when its parents hold both."""

    format_name = "preallocate"
    options = frozenset({"prealloc-align", "prealloc-size"})

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """preallocate_open: ``file``, then the sizes (QemuOpts) and the alignment."""
        super().open(ctx, node, options)
        for key in qdict_order([k for k in sorted(self.options) if k in options]):
            if int(options[key]) < 0:
                raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")
        align = int(options.get("prealloc-align", _DEFAULT_ALIGN))
        if align % 512:
            raise GenericError(_NOT_512)
        child_align = node_alignment(file_child(node))
        if align % child_align:
            raise GenericError(
                "prealloc-align parameter of preallocate filter is not aligned to request "
                f"alignment of underlying node ({child_align})"
            )

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """preallocate_reopen_prepare: re-reads both sizes (neither is mutable)."""
        del graph, node
        align = options.pop("prealloc-align", _DEFAULT_ALIGN)
        options.pop("prealloc-size", None)
        if int(align) % 512:
            raise GenericError(_NOT_512)
        return None

    def adjust_default_perms(
        self, node: Node, perm: int, shared: int, nperm: int, nshared: int
    ) -> tuple[int, int]:
        """WRITE|RESIZE forced and unshared when the parents take both."""
        del node, shared
        both = Perm.WRITE | Perm.RESIZE
        if perm & both == both:
            nperm |= both
            nshared &= ~both
        return int(nperm), int(nshared)


DRIVERS = (Preallocate(),)
