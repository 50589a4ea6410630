"""What block jobs ask of the data plane: allocation along a chain, copying a range.

``layer_allocated`` is bdrv_is_allocated on one node (a qcow2 layer answers
from its own L2 tables, format-less nodes hold all their data, filters hold
none of their own; a range past a short layer's end counts as allocated
zeros, as QEMU's block-status-above treats it); ``allocated_above`` is
bdrv_is_allocated_above; ``write_back`` writes what a job read (zeros as
write-zeroes, as copy-on-read does).

What does not live here: the per-driver hooks (``qmpgraph.io``), the jobs.
"""

from __future__ import annotations

from qmpgraph.drivers.qcow2_read import UNALLOCATED
from qmpgraph.graph.graph import filter_or_cow_child
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io.hooks import child_write, child_write_zeroes
from qmpgraph.io.qcow2_hook import QCOW2_IO


def node_size(node: Node) -> int:
    """The node's length in bytes (0 without a driver)."""
    return node.driver.size(node) if node.driver is not None else 0


async def layer_allocated(node: Node, offset: int, length: int) -> tuple[bool, int]:
    """(whether ``node`` itself holds the data at ``offset``, for how many bytes)."""
    size = node_size(node)
    if offset >= size:
        return True, length
    length = min(length, size - offset)
    if node.format_name == "qcow2":
        runs = await QCOW2_IO.own_runs(node, offset, length)
        if not runs:
            return False, length
        kind, _, n, _ = runs[0]
        return kind != UNALLOCATED, max(1, n)
    if node.driver is not None and node.driver.is_filter:
        return False, length
    return True, length


async def allocated_above(
    top: Node | None, base: Node | None, include_base: bool, offset: int, length: int
) -> tuple[bool, int]:
    """bdrv_is_allocated_above: allocated anywhere from ``top`` down to ``base``."""
    node = top
    n = length
    while node is not None:
        if node is base and not include_base:
            break
        allocated, pnum = await layer_allocated(node, offset, n)
        if allocated:
            return True, pnum
        n = min(n, pnum)
        if node is base:
            break
        edge = filter_or_cow_child(node)
        node = edge.child if edge is not None else None
    return False, n


async def write_back(dst: Edge, offset: int, data: bytes) -> None:
    """Write ``data`` through ``dst`` (all-zero data as write-zeroes, as copy-on-read does)."""
    if data.count(0) == len(data):
        await child_write_zeroes(dst, offset, len(data))
    else:
        await child_write(dst, offset, data)
