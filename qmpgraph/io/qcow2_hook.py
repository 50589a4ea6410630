"""The qcow2 data path of the graph: ``Qcow2IO`` wraps ``qcow2_io.Qcow2Image``.

A node's ``Qcow2Image`` is made on the node's first request, over the
descriptor its ``file`` child already holds (``FdFile`` on that fd: the
image locks live on it, so the file is never opened again); an external
``data-file`` child is used the same way.  The backing image is the
node's ``backing`` edge seen through the graph (``_BackingSource``), so
whatever driver the backing node has, its own hook serves the reads.
When the ``file`` or ``data-file`` child is not a ``file`` node (blkdebug,
a raw window, throttle...), the image reads and writes it through the graph
instead (``qcow2_graphfile.GraphFile``): such an image is built and used
only in its worker thread, and after a failed child request its L1 and
cached L2 tables are re-read from the file (``qcow2_graphfile.resync_tables``).

The library is synchronous and not thread-safe: calls on one image run one
at a time, in a worker thread under that image's ``trio.Lock`` (one worker
drains the queued calls); from there, backing reads come back into trio
with ``trio.from_thread``.  While the image is idle, a call runs in the
trio thread itself, as file reads do, when the node has no backing child or
the call needs nothing from the backing chain (block status of this layer,
a read of clusters it holds, a write that copies nothing from below).
An image is dropped when its node's file descriptor was closed (the node
went away) or when the node was reopened (its state, children or
read-only flag changed), and rebuilt on the next request.  The library keeps no dirty
data of its own (metadata is write-through), so dropping needs no flush.

``read_snapshot`` and ``block_status_snapshot`` read an internal snapshot
through the same image (its lock and L2 cache), for snapshot-access nodes
with qmpgraph's ``__org.qmpgraph_snapshot`` option.

What does not live here: the qcow2 format (``qmpgraph.drivers.qcow2_io``),
header checks at open (``qmpgraph.drivers.qcow2``), the generic request
path (``hooks``).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import outcome
import trio

from qmpgraph.bitmaps.registry import bitmaps_of, mark_dirty
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2_discard import DiscardType, freeing, passed_types
from qmpgraph.drivers.qcow2_io import Extent, Qcow2Error, Qcow2Image, Status
from qmpgraph.drivers.qcow2_read import COMPRESSED, NORMAL, UNALLOCATED
from qmpgraph.drivers.qcow2_storage import WatchedFdFile
from qmpgraph.errors import QMPError
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io import (
    qcow2_graphfile as graphfile,  # a module: it imports hooks, which import this one
)
from qmpgraph.io.hooks import (
    IOHook,
    child_block_status,
    child_read,
    disk_wait,
    in_job,
    register_hook,
)
from qmpgraph.io.request import ALLOCATED, DATA, OFFSET_VALID, REQ_MAY_UNMAP, ZERO, BlockIOError
from qmpgraph.io.stats import highest_offset, record_discard, record_write

T = TypeVar("T")


def _edge(node: Node, name: str) -> Edge | None:
    for edge in node.children:
        if edge.name == name:
            return edge
    return None


def _file_state(edge: Edge | None) -> FileState:
    """The file node under ``edge``; other protocol stacks have no data path yet."""
    child = edge.child if edge is not None else None
    state = child.state if child is not None else None
    if not isinstance(state, FileState):
        raise BlockIOError(errno.ENOTSUP, "qcow2 I/O needs a 'file' node as its file child")
    if state.lock.closed:
        raise BlockIOError(errno.EBADF)
    return state


class _BackingSource:
    """The node's current ``backing`` child as a ``BlockSource`` (from a worker thread).

    Looked up on every call, so a backing node attached or replaced later
    (e.g. by a snapshot) is read without rebuilding the image; without a
    backing child the image reads zeros where it has no data.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        # True while a call runs in the trio thread itself (``Qcow2IO._call``
        # does that only while the node has no backing child).
        self.inline = False

    def _graph(self) -> tuple[Edge | None, int]:
        """The backing edge and size, looked up in the trio thread."""
        if self.inline:
            return self._backing_size()
        return trio.from_thread.run_sync(self._backing_size)

    def _backing_size(self) -> tuple[Edge | None, int]:
        edge = self.node.backing
        child = edge.child if edge is not None else None
        if edge is None or child is None or child.driver is None:
            return None, 0
        return edge, child.driver.size(child)

    @property
    def size(self) -> int:
        """The backing node's length (0 without one)."""
        return self._graph()[1]

    def read(self, offset: int, length: int) -> bytes:
        """Guest data of the backing node, read through its own hook."""
        edge, _ = self._graph()
        if edge is None:
            return bytes(length)
        return trio.from_thread.run(child_read, edge, offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """The backing node's extents (depth 1 where it allocates, else 0)."""
        edge, _ = self._graph()
        if edge is None:
            return [Extent(offset, length, Status.ZERO, 0)]
        out: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            flags, pnum = trio.from_thread.run(child_block_status, edge, pos, end - pos)
            status = Status(0)
            if flags & DATA:
                status |= Status.DATA
            if flags & ZERO:
                status |= Status.ZERO
            if flags & ALLOCATED:
                status |= Status.ALLOCATED
            out.append(Extent(pos, pnum, status, 1 if flags & ALLOCATED else 0))
            pos += pnum
        return out

    def close(self) -> None:
        """Nothing to release: the graph owns the backing node."""


@dataclass(eq=False, slots=True)
class _Queued:
    """One library call waiting for (or done by) an image's worker thread."""

    work: Callable[[], Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[Any] | None = None


class _Runner:
    """Runs one image's library calls in a worker thread, one at a time, in order.

    A call queues itself; the first caller that finds no worker busy starts
    one, and that worker runs every queued call, including those queued while
    it runs.  A busy image (an NBD client with many requests in flight) so
    costs one thread hand-off per burst instead of two per call: handing each
    call to a fresh worker and back, under the GIL, cost more than a 256 KiB
    read from the page cache (profile of nbdcopy out of a qcow2 export: the
    event loop idle in epoll two thirds of the time, waiting for workers).
    Like ``trio.to_thread.run_sync``, a queued call runs even if its caller
    is cancelled meanwhile.
    """

    def __init__(self) -> None:
        self.queue: deque[_Queued] = deque()
        self.busy = False

    def idle(self, lock: trio.Lock) -> bool:
        """Whether no call is queued or running on the image."""
        return not self.busy and not lock.locked()

    async def run(self, lock: trio.Lock, work: Callable[[], T]) -> T:
        """``work()`` in the worker thread, after every call queued before it."""
        call = _Queued(work)
        self.queue.append(call)
        with trio.CancelScope(shield=True):
            if self.busy:
                await call.done.wait()
            else:
                self.busy = True
                try:
                    async with lock:
                        token = trio.lowlevel.current_trio_token()
                        while self.queue:
                            await trio.to_thread.run_sync(self._drain, token)
                finally:
                    self.busy = False
        assert call.result is not None
        return cast("T", call.result.unwrap())

    def _drain(self, token: trio.lowlevel.TrioToken) -> None:
        # In the worker thread; deque appends (trio side) and pops are atomic.
        while self.queue:
            call = self.queue.popleft()
            call.result = outcome.capture(call.work)
            token.run_sync_soon(call.done.set)


@dataclass(slots=True)
class _Open:
    """One node's image and what it was built from.

    ``file_state`` is None for an image whose file or data file is reached
    through the graph (``graph``): its calls always run in the worker thread.
    """

    image: Qcow2Image
    lock: trio.Lock
    key: tuple[Any, ...]
    file_state: FileState | None
    source: _BackingSource
    runner: _Runner = field(default_factory=_Runner)

    @property
    def graph(self) -> bool:
        """Whether the library's file I/O goes through the graph (``GraphFile``)."""
        return self.file_state is None

    def closed(self) -> bool:
        """Whether the file node's descriptor was closed (the node went away)."""
        return self.file_state is not None and self.file_state.lock.closed


def _key(node: Node) -> tuple[Any, ...]:
    file_edge = node.file
    data_child = None
    for edge in node.children:
        if edge.name == "data-file":
            data_child = edge.child
            break
    return (
        id(node.state),
        id(file_edge.child) if file_edge else None,
        id(data_child) if data_child is not None else None,
        node.read_only,
    )


# L1 and refcount table entries: the table's host offset.
_TABLE_OFFSET = 0x00FF_FFFF_FFFF_FE00


class _BitmapMarker:
    """Marks a child node's dirty bitmaps for every write the library makes
    through its descriptor (data and metadata), as QEMU's bdrv_co_pwritev on
    ``bs->file`` does.  A write into an L2 table or a refcount block marks
    the whole cluster: QEMU's metadata caches write whole tables.  Writes
    made in a worker thread are marked from the trio thread, before the
    call's result is seen (run_sync_soon keeps order)."""

    def __init__(self, edge: Edge | None) -> None:
        self.node = edge.child if edge is not None else None
        self.thread = threading.get_ident()
        # None when the image is made outside trio (a synchronous command).
        self.token: trio.lowlevel.TrioToken | None = None
        with contextlib.suppress(RuntimeError):
            self.token = trio.lowlevel.current_trio_token()
        self.image: Qcow2Image | None = None  # set for the image file (its metadata)

    def __call__(self, offset: int, length: int) -> None:
        node = self.node
        if node is None:
            return
        marks = bool(bitmaps_of(node))
        image = self.image
        # A metadata write past wr_highest_offset may end further as a whole
        # table: the table scan only then (a data cluster's write is whole).
        if image is not None and (
            marks
            or ((offset + length) % image.cluster_size
                and offset - offset % image.cluster_size + image.cluster_size
                > highest_offset(node))
        ):  # fmt: skip
            cs = image.cluster_size
            start = offset - offset % cs
            if offset + length <= start + cs and (
                any(e & _TABLE_OFFSET == start for e in image.l1)
                or any(e & _TABLE_OFFSET == start for e in image.refcounts.table)
            ):
                offset, length = start, cs
        record_write(node, offset, length)
        if marks:
            self._mark(node, offset, length)

    def discarded(self, offset: int, length: int) -> None:
        """Freed clusters were discarded in the file: its bitmaps and counters."""
        node = self.node
        if node is None:
            return
        record_discard(node, length, True)
        if bitmaps_of(node):
            self._mark(node, offset, length)

    def _mark(self, node: Node, offset: int, length: int) -> None:
        if self.token is None or threading.get_ident() == self.thread:
            # In trio's thread, or with no trio run known (the image was made
            # by a synchronous command and no worker has used it yet).
            mark_dirty(node, offset, length)
        else:
            self.token.run_sync_soon(mark_dirty, node, offset, length)


class Qcow2IO(IOHook):
    """qcow2: guest requests through the image's L1/L2 tables (``Qcow2Image``)."""

    def __init__(self) -> None:
        self._images: dict[int, _Open] = {}
        # Graph images are built in a worker thread: one build at a time.
        self._building = trio.Lock()

    def _stale(self, opened: _Open, node: Node | None) -> bool:
        return opened.closed() or (node is not None and opened.key != _key(node))

    def drop(self, node: Node) -> None:
        """Forget ``node``'s image (it is rebuilt on the next request)."""
        self._images.pop(node.id, None)

    async def _open(self, node: Node) -> _Open:
        """``node``'s current image, built if needed (in a worker thread when
        its file is reached through the graph)."""
        if not _through_graph(node):
            return self._image(node)
        async with self._building:
            opened = self._images.get(node.id)
            if opened is None or self._stale(opened, node):
                self._sweep(node)
                opened = await self._graph_image(node, _edge(node, "data-file") is not None)
                self._images[node.id] = opened
            return opened

    def _sweep(self, node: Node) -> None:
        """Forget ``node``'s image and those of nodes that went away (closed descriptors)."""
        for node_id, other in list(self._images.items()):
            if self._stale(other, None) or node_id == node.id:
                del self._images[node_id]

    def _image(self, node: Node) -> _Open:
        """``node``'s current image over its file node's descriptor."""
        opened = self._images.get(node.id)
        if opened is not None and not self._stale(opened, node):
            return opened
        self._sweep(node)
        file_state = _file_state(node.file)
        data_edge = _edge(node, "data-file")
        data_file = None
        if data_edge is not None:
            data_file = WatchedFdFile(_file_state(data_edge).lock.fd, _BitmapMarker(data_edge))
        marker = _BitmapMarker(node.file)
        source = _BackingSource(node)
        try:
            image = Qcow2Image(
                WatchedFdFile(file_state.lock.fd, marker),
                backing=source,
                data_file=data_file,
                read_only=node.read_only,
            )
        except (Qcow2Error, QMPError, ValueError) as err:
            raise BlockIOError(errno.EIO, str(err)) from err
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO) from err
        marker.image = image
        opened = _Open(image, trio.Lock(), _key(node), file_state, source)
        self._images[node.id] = opened
        return opened

    async def _graph_image(self, node: Node, has_data_file: bool) -> _Open:
        """An image whose file (and data file) I/O goes through the graph:
        built in a worker thread, as its reads come back into trio."""
        key = _key(node)
        host = graphfile.GraphFile(node, "file")
        data_file = graphfile.GraphFile(node, "data-file", data=True) if has_data_file else None
        source = _BackingSource(node)

        def build() -> Qcow2Image:
            image = Qcow2Image(host, backing=source, data_file=data_file, read_only=node.read_only)
            if not image.external_data:
                # Guest data in the image file itself: a view that fires
                # read_aio/write_aio (metadata I/O fires nothing).
                image.data_host = host.view(data=True)
            return image

        try:
            image = await trio.to_thread.run_sync(build)
        except (Qcow2Error, QMPError, ValueError) as err:
            raise BlockIOError(errno.EIO, str(err)) from err
        except OSError as err:
            raise BlockIOError(err.errno or errno.EIO) from err
        return _Open(image, trio.Lock(), key, None, source)

    def busy(self, node: Node) -> bool:
        """Whether a library call on ``node``'s image is queued or running in a
        worker thread (synchronous: the control plane asks it before it
        changes the image file itself, e.g. for an internal snapshot)."""
        opened = self._images.get(node.id)
        return opened is not None and not opened.runner.idle(opened.lock)

    async def _call(
        self,
        node: Node,
        fn: Callable[[Qcow2Image], T],
        *,
        own_only: bool = False,
        disk: bool = True,
    ) -> T:
        """Run ``fn(image)``, one call per image at a time: in a worker thread,
        or right here when the image is idle and the node has no backing child
        (or ``own_only``: ``fn`` never reads through the backing chain)."""
        # The common case inline (an NBD copy makes thousands of calls): the
        # image is open, current and idle, and the node has no backing child.
        opened = self._images.get(node.id)
        if opened is None or opened.closed() or opened.key != _key(node):
            opened = await self._open(node)
        if disk and not opened.graph:
            # Guest data is read or written: QEMU's request waits for the disk
            # (metadata lookups alone count as cached: no wait).  Through the
            # graph, the child's own hook waits where it does I/O (a blkdebug
            # rule fails the request before any).
            await disk_wait()
        backing = node.backing
        if (
            not opened.graph  # its file I/O comes back into trio: never inline
            and (own_only or backing is None or backing.child is None)
            and not opened.runner.busy
            and not opened.lock.locked()
        ):
            # Nothing to read through the graph and nobody else on the image:
            # run it here, as FileIO's preads do (no checkpoint, so nothing
            # else touches the image meanwhile).  Two thread hand-offs cost
            # more than a read from the page cache: this doubled nbdcopy's
            # throughput out of a qcow2 export.
            opened.source.inline = True
            try:
                return fn(opened.image)
            except (Qcow2Error, QMPError, ValueError) as err:
                raise BlockIOError(errno.EIO, str(err)) from err
            except OSError as err:
                raise BlockIOError(err.errno or errno.EIO) from err
            finally:
                opened.source.inline = False

        image = opened.image
        resync = opened.graph and not image.read_only

        def call() -> T:
            try:
                return fn(image)
            except (Qcow2Error, QMPError, ValueError) as err:
                raise BlockIOError(errno.EIO, str(err)) from err
            except OSError as err:
                raise BlockIOError(err.errno or errno.EIO) from err

        def work() -> T:
            if not resync:
                return call()
            refs = image.refcounts
            allocate = refs.allocate
            allocated: list[tuple[int, int]] = []

            def tracked(count: int) -> int:
                offset = allocate(count)
                allocated.append((offset, count))
                return offset

            refs.allocate = tracked  # type: ignore[method-assign]
            try:
                return call()
            except BlockIOError:
                # A child's request failed midway (blkdebug, a full raw
                # window): the library's tables may be ahead of the file,
                # and clusters it allocated may be linked nowhere.
                if graphfile.resync_tables(image, node):
                    graphfile.free_unlinked(image, allocated)
                else:
                    opened.key = ()  # stale: rebuilt on the next request
                raise
            finally:
                del refs.allocate

        return await opened.runner.run(opened.lock, work)

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        if (
            in_job()
            and not _through_graph(node)
            and await self._call(
                node, lambda img: _holds_data(img, offset, length), own_only=True, disk=False
            )
        ):
            # Only clusters this layer holds are read from its file; the rest
            # comes from the backing chain or reads as zeros without I/O.
            await disk_wait()
        backing = node.backing
        if backing is None or backing.child is None:
            return await self._call(node, lambda img: img.read(offset, length), disk=False)

        def own_read(img: Qcow2Image) -> bytes | None:
            # In the trio thread (idle image), only a range this layer holds
            # whole is read here; None sends the read to a worker thread.
            # An overlay export otherwise paid two thread hand-offs for every
            # read (tools/bench/README.md has the figures).
            source = img.backing_source
            inline = isinstance(source, _BackingSource) and source.inline
            if inline and not _own_range(img, offset, length):
                return None
            return img.read(offset, length)

        data = await self._call(node, own_read, own_only=True, disk=False)
        if data is None:
            data = await self._call(node, lambda img: img.read(offset, length), disk=False)
        return data

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        backing = node.backing
        if backing is None or backing.child is None:
            await self._call(node, lambda img: img.write(offset, data))
            return

        def own_write(img: Qcow2Image) -> bool:
            # As own_read: in the trio thread only a write that copies
            # nothing from the backing chain (see _own_write).
            source = img.backing_source
            inline = isinstance(source, _BackingSource) and source.inline
            if inline and not _own_write(img, offset, len(data)):
                return False
            img.write(offset, data)
            return True

        if not await self._call(node, own_write, own_only=True):
            await self._call(node, lambda img: img.write(offset, data))

    async def write_zeroes(self, node: Node, offset: int, length: int, flags: int) -> None:
        unmap = bool(flags & REQ_MAY_UNMAP)
        # Clusters a zeroing with unmap frees are guest discards (QCOW2_DISCARD_REQUEST).
        graph = not graphfile.plain_file(node.file)
        passed = passed_types(node, graph=graph) if unmap else frozenset()
        await self._call(node, lambda img: freeing(img, passed, DiscardType.REQUEST, lambda: (
            img.write_zeroes(offset, length, may_unmap=unmap))), disk=False)  # fmt: skip

    async def discard(self, node: Node, offset: int, length: int) -> None:
        passed = passed_types(node, graph=not graphfile.plain_file(node.file))
        await self._call(node, lambda img: freeing(img, passed, DiscardType.REQUEST, lambda: (
            img.discard(offset, length))), disk=False)  # fmt: skip

    # flush: the inherited no-op.  Nothing is cached above the descriptors
    # (metadata is write-through), and flush_node then syncs the file and
    # data-file children, honouring their cache.no-flush.

    async def own_runs(
        self, node: Node, offset: int, length: int, first_only: bool = False
    ) -> list[tuple[int, int, int, int]]:
        """This layer's cluster runs ``(kind, guest offset, length, host)`` over a range
        inside the image, backing chain left out (``qcow2_read.GuestMapping._runs``);
        with ``first_only`` just the first run."""
        return await self._call(
            node, lambda img: img._runs(offset, length, first_only), own_only=True, disk=False
        )

    async def block_status(self, node: Node, offset: int, length: int) -> tuple[int, int]:
        extents = await self._call(node, lambda img: img.block_status(offset, length), disk=False)
        return _first_status(extents, length, offset_valid=True)

    # -- internal snapshots (qmpgraph's snapshot-access option) ------------

    async def read_snapshot(self, node: Node, snap_id: str, offset: int, length: int) -> bytes:
        """Guest data of internal snapshot ``snap_id`` of ``node``'s image."""
        return await self._call(node, lambda img: img.snapshot(snap_id).read(offset, length))

    async def block_status_snapshot(
        self, node: Node, snap_id: str, offset: int, length: int
    ) -> tuple[int, int]:
        """Status of the first extent of internal snapshot ``snap_id`` at ``offset``.

        No OFFSET_VALID: a host offset means nothing to the snapshot's readers.
        """
        extents = await self._call(
            node, lambda img: img.snapshot(snap_id).block_status(offset, length), disk=False
        )
        return _first_status(extents, length, offset_valid=False)


def _through_graph(node: Node) -> bool:
    """Whether ``node``'s image reaches its file or data file through the graph."""
    data_edge = _edge(node, "data-file")
    plain = graphfile.plain_file
    return not plain(node.file) or (data_edge is not None and not plain(data_edge))


def _own_range(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether reading the range needs nothing from the backing chain (a
    range outside the image counts as own: ``read`` refuses it anyway)."""
    if offset < 0 or length < 0 or offset + length > img.size:
        return True
    return all(run[0] != UNALLOCATED for run in img._runs(offset, length))


def _holds_data(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether this layer holds data clusters in the range (read from its file)."""
    if offset < 0 or length < 0 or offset + length > img.size:
        return False
    return any(run[0] in (NORMAL, COMPRESSED) for run in img._runs(offset, length))


def _own_write(img: Qcow2Image, offset: int, length: int) -> bool:
    """Whether a write of the range copies nothing from the backing chain:
    only a partial cluster this layer does not hold is filled from there
    (``Qcow2Image.write``'s copy-on-write).  Outside the image: True."""
    if offset < 0 or length < 0 or offset + length > img.size:
        return True
    cs = img.cluster_size
    end = offset + length
    for start, partial in ((offset - offset % cs, offset % cs), (end - end % cs, end % cs)):
        if partial and start < img.size:
            piece = min(cs, img.size - start)
            if any(run[0] == UNALLOCATED for run in img._runs(start, piece)):
                return False
    return True


def _first_status(extents: list[Extent], length: int, *, offset_valid: bool) -> tuple[int, int]:
    """BDRV_BLOCK_* flags of the first extent, and its length."""
    if not extents:
        return DATA | ALLOCATED, length
    first = extents[0]
    flags = 0
    if first.flags & Status.DATA:
        flags |= DATA | OFFSET_VALID if first.depth == 1 and offset_valid else DATA
    if first.flags & Status.ZERO:
        flags |= ZERO
    if first.flags & Status.ALLOCATED:
        flags |= ALLOCATED
    return flags, max(1, first.length)


QCOW2_IO = Qcow2IO()
register_hook("qcow2", QCOW2_IO)
