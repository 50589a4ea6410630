"""``BackendIO``: requests entering the graph at a BlockBackend's root edge.

Mirrors QEMU's ``blk_co_*``: a request must lie inside the device (else
EIO), writes need the root edge's WRITE permission (else EPERM), and then it
follows the generic path of ``qmpgraph.io.hooks``.
"""

from __future__ import annotations

import errno

from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.io import depth, fastzero, hooks
from qmpgraph.io.request import REQ_FUA, REQ_MAY_UNMAP, BlockIOError, eio


class BackendIO:
    """I/O on the node under ``backend``'s root edge."""

    def __init__(self, backend: BlockBackend) -> None:
        self.backend = backend

    @property
    def edge(self) -> Edge:
        """The root edge (ENOMEDIUM once it is gone)."""
        edge = self.backend.root
        if edge is None or edge.child is None:
            raise BlockIOError(errno.ENOMEDIUM)
        return edge

    @property
    def node(self) -> Node:
        """The root node."""
        node = self.edge.child
        assert node is not None
        return node

    def size(self) -> int:
        """The device's length in bytes: blk_getlength, whole sectors rounded up."""
        node = self.node
        size = node.driver.size(node) if node.driver is not None else 0
        return -(-size // 512) * 512

    def _check(self, offset: int, length: int) -> None:
        size = self.size()
        if offset < 0 or length < 0 or offset > size or length > size - offset:
            raise eio()

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        self._check(offset, length)
        return await hooks.child_read(self.edge, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is stable before this returns."""
        self._check(offset, len(data))
        await hooks.child_write(self.edge, offset, data, REQ_FUA if fua else 0)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        no_fallback: bool = False,
    ) -> None:
        """Zero a range (holes allowed with ``may_unmap``, whatever the node's discard);
        with ``no_fallback``, ENOTSUP where zeroing would mean writing zeros."""
        self._check(offset, length)
        if no_fallback and not await fastzero.supported(self.node, offset, length):
            raise BlockIOError(errno.ENOTSUP)
        flags = (REQ_MAY_UNMAP if may_unmap else 0) | (REQ_FUA if fua else 0)
        await hooks.child_write_zeroes(self.edge, offset, length, flags, backend=True)

    async def discard(self, offset: int, length: int) -> None:
        """Discard a range (a no-op on nodes without ``discard=unmap``)."""
        self._check(offset, length)
        await hooks.child_discard(self.edge, offset, length)

    async def flush(self) -> None:
        """Make every acknowledged write stable."""
        await hooks.flush_node(self.node)

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        """(BDRV_BLOCK_* flags, bytes they hold for) from ``offset``: the answer
        of the whole chain, walked as QEMU's blk_co_block_status_above does."""
        self._check(offset, length)
        flags, pnum, _ = await depth.status_above(self.node, offset, length)
        return flags, pnum
