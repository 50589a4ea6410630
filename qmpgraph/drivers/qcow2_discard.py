"""qcow2 freed clusters passed down to the image file as discards.

QEMU's qcow2 remembers every cluster whose refcount drops to 0 (the
``s->discards`` list, filled by ``update_refcount``) when the kind of
freeing is passed through, coalescing adjacent regions, and discards them
in the file once the operation's refcount updates are done
(``qcow2_process_discards``); on a file node that is a hole punched with
the file's size kept, so ``actual-size`` shrinks.  Failures are ignored,
and a failed operation drops its list without discarding.

Which kinds pass (``discard_passthrough``), from the qcow2 node's options:

* ``NEVER``: never (e.g. a compressed cluster replaced by a write);
* ``ALWAYS``: always (resize's cut-off clusters, bitmap data clusters);
* ``REQUEST``: ``pass-discard-request``, default the node's own
  ``discard=unmap`` (guest discards, write-zeroes with unmap);
* ``SNAPSHOT``: ``pass-discard-snapshot``, default on (internal snapshot
  deletion: data clusters, L2 tables, L1 table, old snapshot table);
* ``OTHER``: ``pass-discard-other``, default off (old metadata: bitmap
  tables and directory, replaced L1/L2 tables).

Below that, ``bdrv_co_pdiscard`` on the file node does nothing unless the
file node itself has ``discard=unmap`` (a format's inline ``file`` gets it
by default).  The control plane discards only into ``file`` nodes; the data
path also discards through other children (blkdebug, raw, throttle...) with
the graph's ``child_discard`` (a ``discard`` method of the image's host file,
``qmpgraph.io.qcow2_graphfile``), which checks that flag itself.

A cluster freed and allocated again within one operation is never
punched after its new contents were written: the pending regions are
discarded before each allocation (QEMU writes its cached tables back after
discarding, with the same end result).

Who records what: the data path's guest discards and unmapping zero
writes (``qmpgraph.io.qcow2_hook`` through ``freeing``), internal snapshot
create/delete and ``block_resize`` (recorded during the command, discarded
when its transaction commits, since an abort puts the journaled bytes back),
persistent bitmap removal and storing (``qcow2_bitmaps``).

What does not live here: the refcounts themselves (``qcow2_refcount``,
``qcow2_resize``), the L1/L2 walks that free clusters (``qcow2_io``,
``qcow2_snapshot_write``, ``qcow2_resize``, ``qcow2_bitmaps``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

from qmpgraph.graph.perms import OpenFlag

if TYPE_CHECKING:
    from qmpgraph.drivers.qcow2_refcount import Refcounts
    from qmpgraph.graph.model import Node

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class DiscardType(enum.Enum):
    """enum qcow2_discard_type: why clusters are freed."""

    NEVER = "never"
    ALWAYS = "always"
    REQUEST = "pass-discard-request"
    SNAPSHOT = "pass-discard-snapshot"
    OTHER = "pass-discard-other"


_DEFAULTS = {DiscardType.SNAPSHOT: True, DiscardType.OTHER: False}


def _bool(value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value in ("on", "true", "yes")
    return bool(value)


def passed_types(
    node: Node, *, graph: bool = False, file_node: Node | None = None
) -> frozenset[DiscardType]:
    """The kinds of freed clusters that reach ``node``'s image file as discards
    (empty where the file child is not a ``file`` node with discard=unmap;
    ``graph``: discards go through the graph, which checks the child;
    ``file_node``: the image file when the ``file`` edge is already gone, as
    when a closing node stores its bitmaps)."""
    edge = node.file
    if edge is not None:
        file_node = edge.child
    if not graph and (
        file_node is None
        or file_node.driver is None
        or file_node.driver.format_name != "file"
        or not file_node.open_flags & OpenFlag.UNMAP
    ):
        return frozenset()
    opts = node.options
    passed = {DiscardType.ALWAYS}
    default_request = bool(node.open_flags & OpenFlag.UNMAP)
    if _bool(opts.get(DiscardType.REQUEST.value), default_request):
        passed.add(DiscardType.REQUEST)
    for kind, default in _DEFAULTS.items():
        if _bool(opts.get(kind.value), default):
            passed.add(kind)
    return frozenset(passed)


def punch(fd: int, offset: int, length: int) -> None:
    """Discard [offset, offset + length) of a file (hole, size kept); best effort."""
    _libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(_PUNCH_HOLE_KEEP_SIZE),
        ctypes.c_int64(offset),
        ctypes.c_int64(length),
    )


class FreedClusters:
    """``s->discards``: freed regions of one operation, waiting to be discarded."""

    def __init__(
        self,
        fd: int,
        cluster_bits: int,
        passed: frozenset[DiscardType] = frozenset(DiscardType),
        kind: DiscardType = DiscardType.ALWAYS,
    ) -> None:
        self.fd = fd
        self.cluster_bits = cluster_bits
        self.passed = passed
        #: Why clusters are being freed now; only passed kinds are recorded.
        self.kind = kind
        # [start, end) cluster ranges; adjacent ones are merged.
        self.regions: list[list[int]] = []
        #: Told each discarded byte range (the file node's dirty bitmaps).
        self.on_discard: Callable[[int, int], None] | None = None
        #: Discards a byte range instead of punching a hole in ``fd``.
        self.discard: Callable[[int, int], None] | None = None

    def freed(self, cluster: int) -> None:
        """update_refcount_discard: one cluster's refcount reached 0."""
        if self.kind not in self.passed:
            return
        regions = self.regions
        if regions and regions[-1][1] == cluster:
            regions[-1][1] += 1
        elif regions and regions[-1][0] == cluster + 1:
            regions[-1][0] = cluster
        else:
            regions.append([cluster, cluster + 1])

    def reused(self, first: int, count: int) -> None:
        """Clusters [first, first + count) were allocated again: not discarded."""
        end = first + count
        kept: list[list[int]] = []
        for start, stop in self.regions:
            if stop <= first or start >= end:
                kept.append([start, stop])
                continue
            if start < first:
                kept.append([start, first])
            if stop > end:
                kept.append([end, stop])
        self.regions = kept

    def process(self) -> None:
        """qcow2_process_discards: discard every pending region, coalesced."""
        if not self.regions:
            return
        regions = sorted(self.regions)
        self.regions = []
        merged: list[list[int]] = []
        for start, end in regions:
            if merged and merged[-1][1] >= start:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        cb = self.cluster_bits
        for start, end in merged:
            if self.discard is not None:
                with contextlib.suppress(Exception):  # failures are ignored, as QEMU's
                    self.discard(start << cb, (end - start) << cb)
            else:
                punch(self.fd, start << cb, (end - start) << cb)
            if self.on_discard is not None:
                self.on_discard(start << cb, (end - start) << cb)


@contextlib.contextmanager
def discarding(
    refcounts: Refcounts,
    fd: int,
    passed: frozenset[DiscardType],
    kind: DiscardType,
    on_discard: Callable[[int, int], None] | None = None,
    *,
    discard: Callable[[int, int], None] | None = None,
) -> Iterator[None]:
    """Within the block, clusters ``refcounts`` frees are discarded in the file
    (fd, or by ``discard``) when ``kind`` is passed; at the end if it
    succeeds, dropped if not."""
    if kind not in passed or refcounts.discards is not None:
        yield
        return
    queue = FreedClusters(fd, refcounts.cluster_bits, passed, kind)
    queue.on_discard = on_discard
    queue.discard = discard
    refcounts.discards = queue
    try:
        yield
    finally:
        refcounts.discards = None
    queue.process()


class _Image(Protocol):
    @property
    def refcounts(self) -> Refcounts: ...

    @property
    def host(self) -> object: ...


def freeing(
    img: _Image, passed: frozenset[DiscardType], kind: DiscardType, fn: Callable[[], T]
) -> T:
    """Run ``fn`` (a data-path call on ``img``) with the clusters it frees
    discarded in the image file when ``kind`` is passed."""
    discard = getattr(img.host, "discard", None)
    if callable(discard):
        # A file reached through the graph: its child_discard marks bitmaps.
        with discarding(img.refcounts, -1, passed, kind, discard=discard):
            return fn()
    fd = getattr(img.host, "fd", None)
    if not isinstance(fd, int):
        return fn()
    # A WatchedFdFile's on_write marks the file node's bitmaps: discards too
    # (through its ``discarded``, which counts them as discards, not writes).
    on_write = getattr(img.host, "on_write", None)
    with discarding(img.refcounts, fd, passed, kind, getattr(on_write, "discarded", on_write)):
        return fn()
