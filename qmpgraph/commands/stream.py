"""``block-stream``: copy a backing chain's data into its top, then cut the chain.

As QEMU 7.2's qmp_block_stream and block/stream.c: the argument checks in
QEMU's order, the STREAM blockers on the chain, then in one graph
transaction the frozen chain, a copy-on-read filter inserted above the top
(``bottom`` = the base's overlay; implicit unless ``filter-node-name``), the
job on the filter, its BlockBackend for reading, the top held as "active node"
and every node being dropped as "intermediate node".  The job copies each
chunk that is allocated below the top but above the base, at the job's
speed; on success ``prepare`` drops the filter, sets the top's backing to
the base and rewrites the image header's backing file name.

A read-only top (a backing image opened read-only) is reopened read-write
for the job (``snapshot.reopen_read_only``, which block-commit uses for its base
too) and back to read-only when the job is cleaned up or fails to start.

What does not live here: the job core (``qmpgraph.jobs``).
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.query.filenames import Filenames, auto_backing_file
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import lookup_bs
from qmpgraph.commands.snapshot import reopen_read_only, set_node_state
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.open import TreeOpenContext, dirname, open_one, protocol_prefix
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.drivers.qcow2_image import rewrite_backing
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import cow_child, filter_child, filter_or_cow_child, skip_filters
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io.cor_io import COR_IO
from qmpgraph.io.hooks import child_read
from qmpgraph.io.request import BlockIOError
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import JobFailed
from qmpgraph.jobs.dataplane import allocated_above, layer_allocated, node_size, write_back
from qmpgraph.jobs.drain import drain_node_bounce
from qmpgraph.transactions.actions import (
    add_root_parent,
    ref_node,
    remove_root_parent,
    set_frozen,
    unref_node,
)
from qmpgraph.transactions.composite import (
    detach_child,
    drop_filter,
    insert_node,
    root_attach,
    set_backing,
)
from qmpgraph.transactions.engine import Transaction

STREAM_CHUNK = 512 * 1024
_BASIC = int(Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


def blocked(node: Node, op: str) -> None:
    """bdrv_op_is_blocked: "Node '%s' is busy: <first reason>"."""
    reasons = node.op_blockers.get(op)
    if reasons:
        raise GenericError(f"Node '{node.node_name}' is busy: {reasons[0]}")


def next_in_chain(node: Node) -> Node | None:
    """bdrv_filter_or_cow_bs."""
    edge = filter_or_cow_child(node)
    return edge.child if edge is not None else None


def chain_contains(top: Node, target: Node | None) -> bool:
    """bdrv_chain_contains (``None`` is in every chain)."""
    cur: Node | None = top
    while cur is not None:
        if cur is target:
            return True
        cur = next_in_chain(cur)
    return target is None


def backing_chain_next(node: Node) -> Node | None:
    """bdrv_backing_chain_next: the next non-filter node below the COW child."""
    edge = cow_child(skip_filters(node) or node)
    return skip_filters(edge.child) if edge is not None else None


def find_overlay(active: Node, base: Node | None) -> Node | None:
    """bdrv_find_overlay: the node right above ``base`` in ``active``'s chain."""
    base = skip_filters(base)
    cur = skip_filters(active)
    while cur is not None:
        nxt = backing_chain_next(cur)
        if nxt is base:
            return cur
        cur = nxt
    return None


def image_filename(node: Node) -> str:
    """bs->filename after bdrv_refresh_filename."""
    return Filenames().refresh(node).filename


def _strict_realpath(path: str | None) -> str | None:
    """realpath(3): None when the path (or a directory on it) does not exist."""
    if not path:
        return None
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


def _backing_overridden(node: Node, names: Filenames) -> bool:
    """bdrv_backing_overridden: the backing is not the one the header names."""
    auto = auto_backing_file(node)
    edge = node.backing
    if edge is not None and edge.child is not None:
        return auto != names.refresh(edge.child).filename
    return bool(auto)


def _absolute_name(node: Node, name: str) -> str | None:
    """bdrv_make_absolute_filename: ``name`` against the image's directory
    (None when the image has none)."""
    if not name:
        return None
    if name.startswith("/") or protocol_prefix(name) is not None:
        return name
    try:
        return dirname(node) + name
    except GenericError:
        return None


def find_backing_image(bs: Node, name: str) -> Node | None:
    """bdrv_find_backing_image: the chain node ``name`` designates (legacy file names).

    Filters are skipped.  Where a node's backing was overridden (opened from
    a node reference or options rather than from the header), only the
    backing node's filename, compared as text, can match; else a protocol
    name is compared as text with the header's name and its absolute form,
    and a plain path must resolve (it and the header's name made absolute
    against the image's directory) to the same existing file.
    """
    names = Filenames()
    is_protocol = protocol_prefix(name) is not None
    cur = skip_filters(bs)
    while cur is not None and cow_child(cur) is not None:
        below = backing_chain_next(cur)
        if below is None:
            return None
        state = cur.state
        written = state.header.backing_file if isinstance(state, Qcow2State) else ""
        written = written or ""
        if _backing_overridden(cur, names):
            if name == names.refresh(below).filename:
                return below
        elif is_protocol or protocol_prefix(written) is not None:
            if name == written or name == _absolute_name(cur, written):
                return below
        else:
            wanted = _strict_realpath(_absolute_name(cur, name))
            if wanted is not None:
                header = _strict_realpath(_absolute_name(cur, written))
                if header is not None and header == wanted:
                    return below
        cur = below
    return None


def freeze_chain(tran: Transaction, top: Node, base: Node | None) -> None:
    """bdrv_freeze_backing_chain: freeze every link from ``top`` down to ``base``."""
    cur: Node | None = top
    while cur is not None and cur is not base:
        edge = filter_or_cow_child(cur)
        if edge is not None and edge.frozen:
            assert edge.child is not None
            raise GenericError(
                f"Cannot change '{edge.name}' link from '{cur.node_name}' "
                f"to '{edge.child.node_name}'"
            )
        cur = edge.child if edge is not None else None
    cur = top
    while cur is not None and cur is not base:
        edge = filter_or_cow_child(cur)
        if edge is not None:
            set_frozen(tran, edge, True)
        cur = edge.child if edge is not None else None


def unfreeze_chain(tran: Transaction, top: Node, base: Node | None) -> None:
    """bdrv_unfreeze_backing_chain."""
    cur: Node | None = top
    while cur is not None and cur is not base:
        edge = filter_or_cow_child(cur)
        if edge is not None and edge.frozen:
            set_frozen(tran, edge, False)
        cur = edge.child if edge is not None else None


def restore_read_only(daemon: Any, node: Node, what: str) -> None:
    """Make ``node`` read-only again after a job; errors are ignored, as QEMU does."""
    if node.refcnt <= 0 or node.read_only:
        return
    try:
        with daemon.graph_transaction(what, {"node": node.node_name}) as tran:
            reopen_read_only(tran, daemon.graph, node, True)
    except GenericError:
        pass


def change_backing_file(tran: Transaction, node: Node, name: str | None, fmt: str | None) -> None:
    """bdrv_change_backing_file: rewrite a qcow2 header's backing name and format."""
    state = node.state
    if not isinstance(state, Qcow2State):
        return
    file_edge = node.file
    file_node = file_edge.child if file_edge is not None else None
    if file_node is None or not isinstance(file_node.state, FileState):
        return
    header = rewrite_backing(file_node.state.filename, state.header, name, fmt)
    set_node_state(tran, node, replace(state, header=header, auto_backing_file=name or ""))


class StreamJob(BlockJob):
    """The stream job (block/stream.c)."""

    job_type = "stream"
    target: Node
    cor: Node | None
    copy_edge: Edge
    base_overlay: Node
    above_base: Node
    backing_file: str | None
    data_blk: BlockBackend
    bs_read_only: bool = False

    async def run(self) -> None:
        top = skip_filters(self.target)
        assert top is not None
        if top is self.base_overlay:
            return
        length = node_size(self.target)
        self.progress_set_remaining(length)
        cow = cow_child(top)
        below = cow.child if cow is not None else None
        offset, delay, error = 0, 0, 0
        first = True
        while offset < length:
            await self.sleep_ns(delay)
            if self.is_cancelled():
                break
            if first:
                # QEMU's first look at the top's L2 table is real I/O.
                await self.io_point()
                first = False
            copy = False
            try:
                chunk = min(STREAM_CHUNK, length - offset)
                allocated, n = await layer_allocated(top, offset, chunk)
                if not allocated:
                    copy, n = await allocated_above(below, self.base_overlay, True, offset, n)
                    if not copy and n == 0:
                        n = length - offset
                if copy:
                    # A read that fails fails at once (no real I/O): its
                    # events come before the reply of the command that
                    # entered the job; real I/O lets the reply go first.
                    if self.cor is not None:
                        # stream_populate: a prefetch read through the filter,
                        # whose copy is the driver's own write (no dirty
                        # bitmap of the top sees it, as in QEMU).
                        await COR_IO.populate(self.cor, offset, n)
                        await self.io_point()
                    else:
                        data = await child_read(self.copy_edge, offset, n)
                        await self.io_point()
                        await write_back(self.copy_edge, offset, data)
            except (BlockIOError, OSError) as exc:
                code = exc.errno or errno.EIO
                action = self.error_action(True, code)
                if action == "stop":
                    continue
                error = error or code
                if action == "report":
                    break
            self.progress_update(n)
            delay = self.ratelimit_delay(n) if copy else 0
            offset += n
        if error:
            raise JobFailed(error)

    def _drop_filter(self, tran: Transaction) -> None:
        cor = self.cor
        if cor is None:
            return
        # bdrv_cor_filter_drop's drained sections, as qsd 7.2 shows them to
        # a job above (three: the first pauses it, the second's poll runs
        # it on to its next pause point, the third's to the next or its end).
        drain_node_bounce(self.daemon, cor, times=3)
        self.cor = None
        if self.data_blk.root is not None:
            detach_child(tran, self.daemon.graph, self.data_blk.root)
        if self.data_blk in self.daemon.graph.backends:
            remove_root_parent(tran, self.daemon.graph, self.data_blk)
        drop_filter(tran, self.daemon.graph, cor)
        unref_node(tran, self.daemon.graph, cor)

    def prepare(self) -> None:
        graph = self.daemon.graph
        with self.daemon.graph_transaction("block-stream-prepare", {"id": self.id}) as tran:
            assert self.cor is not None
            unfreeze_chain(tran, self.cor, self.above_base)
            self._drop_filter(tran)
            top = skip_filters(self.target)
            assert top is not None
            base = next_in_chain(self.above_base)
            unfiltered_base = skip_filters(base)
            if cow_child(top) is not None:
                base_id = base_fmt = None
                if unfiltered_base is not None:
                    base_id = self.backing_file or image_filename(unfiltered_base)
                    base_fmt = unfiltered_base.format_name
                # QEMU drops the old backing's reference only when the change
                # commits: a base that already is the backing (nothing to
                # stream) must survive being detached and attached again.
                if base is not None:
                    ref_node(tran, base)
                try:
                    set_backing(tran, graph, top, base)
                except GenericError as err:
                    raise JobFailed(errno.EPERM, err.desc) from err
                if base is not None:
                    unref_node(tran, graph, base)
                change_backing_file(tran, top, base_id, base_fmt)

    def abort(self) -> None:
        if self.cor is not None:
            with self.daemon.graph_transaction("block-stream-abort", {"id": self.id}) as tran:
                unfreeze_chain(tran, self.cor, self.above_base)

    def clean(self) -> None:
        if self.cor is not None:
            with self.daemon.graph_transaction("block-stream-clean", {"id": self.id}) as tran:
                self._drop_filter(tran)
        if self.bs_read_only:
            # stream_clean: the top goes back to read-only (QEMU gives up the
            # job's write permission first; here the filter is gone already).
            restore_read_only(self.daemon, self.target, "block-stream-read-only")


def _check_args(args: dict[str, Any]) -> None:
    pairs = (("base", "base-node"), ("base", "bottom"), ("bottom", "base-node"))
    for a, b in pairs:
        if a in args and b in args:
            raise GenericError(f"'{a}' and '{b}' cannot be specified at the same time")


@command("block-stream")
def block_stream(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_block_stream + stream_start."""
    daemon = ctx.daemon
    graph = daemon.graph
    _check_args(args)
    device = str(args["device"])
    bs = lookup_bs(graph, device, device)
    base_bs: Node | None = None
    bottom_bs: Node | None = None
    if "base" in args:
        base_bs = find_backing_image(bs, str(args["base"]))
        if base_bs is None:
            raise GenericError(f"Can't find '{args['base']}' in the backing chain")
    if "base-node" in args:
        name = str(args["base-node"])
        base_bs = lookup_bs(graph, None, name)
        if base_bs is bs or not chain_contains(bs, base_bs):
            raise GenericError(f"Node '{name}' is not a backing image of '{device}'")
    if "bottom" in args:
        name = str(args["bottom"])
        bottom_bs = lookup_bs(graph, None, name)
        if bottom_bs.driver is not None and bottom_bs.driver.is_filter:
            raise GenericError(f"Node '{name}' is a filter, use a non-filter node as 'bottom'")
        if not chain_contains(bs, bottom_bs):
            raise GenericError(f"Node '{name}' is not in a chain starting from '{device}'")
    iter_end = next_in_chain(bottom_bs) if bottom_bs is not None else base_bs
    cur: Node | None = bs
    while cur is not None and cur is not iter_end:
        blocked(cur, "stream")
        cur = next_in_chain(cur)
    if base_bs is None and "backing-file" in args:
        raise GenericError("backing file specified, but streaming the entire chain")

    if bottom_bs is not None:
        base_overlay = above_base = bottom_bs
    else:
        found = find_overlay(bs, base_bs)
        if found is None:
            assert base_bs is not None
            raise GenericError(
                f"'{base_bs.node_name}' is not in the backing chain of '{bs.node_name}'"
            )
        base_overlay = above_base = found
        cow = cow_child(above_base)
        if (cow.child if cow is not None else None) is not base_bs:
            assert cow is not None and cow.child is not None
            above_base = cow.child
            while True:
                edge = filter_child(above_base)
                if edge is None or edge.child is base_bs:
                    break
                assert edge.child is not None
                above_base = edge.child

    with daemon.graph_transaction("block-stream", args) as tran:
        freeze_chain(tran, bs, above_base)
        bs_read_only = bs.read_only
        if bs_read_only:
            # stream_start: the top becomes writable for the job (the frozen
            # chain holds it during the reopen); the transaction's abort
            # makes it read-only again if the job does not start.
            reopen_read_only(tran, graph, bs, False)
        opts: dict[str, Any] = {
            "driver": "copy-on-read",
            "file": bs.node_name,
            "bottom": base_overlay.node_name,
            "read-only": False,
            "cache": {"direct": False, "no-flush": False},
        }
        if "filter-node-name" in args:
            opts["node-name"] = args["filter-node-name"]
        try:
            cor = open_one(TreeOpenContext(graph, tran), opts, None)
        except GenericError as err:
            raise GenericError(f"Could not create node: {err.desc}") from err
        # bdrv_insert_node drains ``bs``: a job above it pauses and goes on.
        drain_node_bounce(daemon, bs)
        insert_node(tran, graph, bs, cor)
        if "filter-node-name" not in args:
            cor.implicit = True
        job = StreamJob(
            daemon,
            args.get("job-id", ""),
            tran,
            cor,
            perm=0,
            shared=PERM_ALL,
            speed=int(args.get("speed", 0)),
            on_error=str(args.get("on-error", "report")),
            auto_finalize=bool(args.get("auto-finalize", True)),
            auto_dismiss=bool(args.get("auto-dismiss", True)),
        )
        try:
            # s->blk: how the job reads through the filter.
            job.data_blk = BlockBackend()
            add_root_parent(tran, graph, job.data_blk)
            root_attach(
                tran, graph, job.data_blk, cor, "root", role=Role.FILTERED | Role.PRIMARY,
                perm=int(Perm.CONSISTENT_READ), shared=_BASIC | int(Perm.WRITE),
            )  # fmt: skip
            job.add_node(tran, "active node", bs, 0, _BASIC | int(Perm.WRITE))
            base = next_in_chain(above_base)
            it = next_in_chain(bs)
            while it is not None and it is not base:
                job.add_node(tran, "intermediate node", it, 0, _BASIC)
                it = next_in_chain(it)
        except GenericError:
            job.early_fail()
            raise
        file_edge = cor.file
        assert file_edge is not None
        job.copy_edge = file_edge
        job.target = bs
        job.cor = cor
        job.base_overlay = base_overlay
        job.above_base = above_base
        job.backing_file = args.get("backing-file")
        job.bs_read_only = bs_read_only
    job.start()
