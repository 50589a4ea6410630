"""The ``preallocate`` filter: grows ``file`` ahead of writes past its end.

QEMU 7.2 (block/preallocate.c): ``file`` (FILTERED|PRIMARY) opens first,
then ``prealloc-align``/``prealloc-size`` (QemuOpts sizes) are checked:
non-negative, the alignment a multiple of 512 and of the child's request
alignment.  Reopen re-reads both.  Permissions: the default rule, with
WRITE|RESIZE taken and unshared when the parents take both.

``PreallocateState`` holds the options and the data path's bookkeeping
(``data_end``, ``zero_start``, ``file_end``; -1 while unknown); the node's
length is ``data_end`` once known.  ``close`` truncates the file back to
``data_end`` as preallocate_close does, and so does a permission update
that takes WRITE|RESIZE away (preallocate_check_perm).  The data path itself:
``qmpgraph.io.filters_io``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import OpenContext, file_child, node_alignment, node_size
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Perm
from qmpgraph.protocol.qjson import qdict_order

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph

_DEFAULT_ALIGN = 1 << 20
_DEFAULT_SIZE = 128 << 20
_NOT_512 = "prealloc-align parameter of preallocate filter is not aligned to 512"


@dataclass(eq=False, slots=True)
class PreallocateState:
    """BDRVPreallocateState: the options and the ends the data path tracks."""

    align: int
    size: int
    data_end: int = -1
    zero_start: int = -1
    file_end: int = -1
    # The file node, still reachable at close (its edge is gone by then).
    file_node: Node | None = None

    def invalidate(self) -> None:
        """Forget the ends (the permissions were lost)."""
        self.data_end = self.zero_start = self.file_end = -1


def child_length(node: Node | None) -> int:
    """bdrv_getlength of the filtered child."""
    return node_size(node)


def _truncate_to_data_end(state: PreallocateState) -> None:
    """preallocate_truncate_to_real_size, for a file child (errors ignored)."""
    child = state.file_node
    file_state = child.state if child is not None else None
    if state.data_end < 0 or not isinstance(file_state, FileState) or file_state.lock.closed:
        return
    if state.file_end < 0:
        state.file_end = child_length(child)
    if state.data_end < state.file_end:
        try:
            os.ftruncate(file_state.lock.fd, state.data_end)
        except OSError:
            return
        state.file_end = state.data_end


def _can_write_resize(perm: int) -> bool:
    both = Perm.WRITE | Perm.RESIZE
    return perm & both == both


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
        size = int(options.get("prealloc-size", _DEFAULT_SIZE))
        node.state = PreallocateState(align, size, file_node=file_child(node))

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """preallocate_reopen_prepare: re-reads both sizes (the new state carries them)."""
        del graph
        align = options.pop("prealloc-align", _DEFAULT_ALIGN)
        size = options.pop("prealloc-size", _DEFAULT_SIZE)
        if int(align) % 512:
            raise GenericError(_NOT_512)
        old = node.state
        if not isinstance(old, PreallocateState):
            return None
        # New options; the preallocation bookkeeping carries over.
        return PreallocateState(
            int(align), int(size), old.data_end, old.zero_start, old.file_end, old.file_node
        )

    def size(self, node: Node) -> int:
        """preallocate_co_getlength: the end of the data once known, else the file's."""
        state = node.state
        if isinstance(state, PreallocateState) and state.data_end >= 0:
            return state.data_end
        return super().size(node)

    def check_perm(self, node: Node, perm: int, shared: int) -> None:
        """preallocate_check_perm: losing WRITE|RESIZE drops the preallocation
        at once (QEMU truncates here, before the update commits)."""
        del shared
        state = node.state
        lost = not _can_write_resize(perm)
        if isinstance(state, PreallocateState) and state.data_end >= 0 and lost:
            _truncate_to_data_end(state)

    def set_perm(self, node: Node, perm: int, shared: int) -> None:
        """preallocate_set_perm: start tracking the ends with WRITE|RESIZE, else forget them."""
        del shared
        state = node.state
        if not isinstance(state, PreallocateState):
            return
        if _can_write_resize(perm):
            if state.data_end < 0:
                length = child_length(state.file_node)
                state.data_end = state.file_end = state.zero_start = length
        else:
            state.invalidate()

    def close(self, node: Node) -> None:
        """preallocate_close: drop the preallocation past the data."""
        state = node.state
        if isinstance(state, PreallocateState):
            _truncate_to_data_end(state)

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
