"""``block-commit``: merge a chain's upper images into a lower one.

As QEMU 7.2's qmp_block_commit: the device must be a root node ("Device
'%s' not found", DeviceNotFound, when it is no node at all), the
COMMIT_SOURCE blocker, ``top``/``top-node`` and ``base``/``base-node``
resolution, the COMMIT_TARGET blockers from top down to base, then:

* intermediate commit (``top`` below the active layer, without writers):
  block/commit.c's commit_start.  In one graph transaction: the job on the
  active layer (its BlockBackend takes nothing), a ``commit_top`` filter
  appended above ``top`` (implicit unless ``filter-node-name``), every node
  from ``top`` down to (not including) ``base`` held as "intermediate node",
  the chain frozen from the filter to the base, the base held as "base",
  and BlockBackends on the base (CONSISTENT_READ, WRITE, RESIZE if it must
  grow) and on ``top``.  The job copies what is allocated above the base;
  ``prepare`` unfreezes the chain and drops the intermediate nodes
  (bdrv_drop_intermediate: the filter's parents move to the base and their
  image headers name the base), ``abort`` drops the filter.
* active commit (``top`` is the active layer, or has a writer): mirror.c's
  commit_active_start, a mirror job of type ``commit`` whose target is the
  base (``ActiveCommitJob`` on ``qmpgraph.jobs.mirror.MirrorJob``): it
  goes ``ready``, and ``job-complete`` puts the base in the top's place.

A read-only base (a backing image opened read-only, libvirt's usual chain)
is reopened read-write for the job and back to read-only when the job is
cleaned up (commit_clean; the active commit: when it is aborted).

What does not live here: the job core, the mirror job.
"""

from __future__ import annotations

import errno
from typing import Any

from qmpgraph.commands.commit_active import commit_active_start
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.mirror import root_bs
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import lookup_bs, truncate
from qmpgraph.commands.snapshot import reopen_read_only
from qmpgraph.commands.stream import (
    blocked,
    chain_contains,
    change_backing_file,
    find_backing_image,
    find_overlay,
    freeze_chain,
    image_filename,
    next_in_chain,
    restore_read_only,
    unfreeze_chain,
)
from qmpgraph.drivers import INTERNAL
from qmpgraph.errors import DeviceNotFound, GenericError
from qmpgraph.graph.graph import cow_child, skip_filters, skip_implicit_filters
from qmpgraph.graph.model import BlockBackend, Edge, Node
from qmpgraph.graph.names import check_node_name
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io.hooks import PassThroughIO, child_read, child_write, register_hook
from qmpgraph.io.request import BlockIOError
from qmpgraph.jobs.blockjob import BlockJob
from qmpgraph.jobs.core import JobFailed
from qmpgraph.jobs.dataplane import allocated_above, node_size
from qmpgraph.transactions.actions import (
    add_node,
    add_root_parent,
    ref_node,
    remove_root_parent,
    set_inherits_from,
    unref_node,
)
from qmpgraph.transactions.composite import append, detach_child, replace_node, root_attach
from qmpgraph.transactions.engine import Transaction

COMMIT_BUFFER_SIZE = 512 * 1024

# Reads through a commit_top filter (e.g. the overlay's backing) reach ``top``.
register_hook("commit_top", PassThroughIO())


def _detach_backend(tran: Transaction, daemon: Any, edge: Edge | None) -> None:
    if edge is None:
        return
    parent = edge.parent
    detach_child(tran, daemon.graph, edge)
    if isinstance(parent, BlockBackend) and parent in daemon.graph.backends:
        remove_root_parent(tran, daemon.graph, parent)


class CommitJob(BlockJob):
    """The intermediate commit job (block/commit.c)."""

    job_type = "commit"
    commit_top: Node
    top_node: Node
    base_node: Node
    base_overlay: Node
    base_edge: Edge | None
    top_edge: Edge | None
    backing_file: str | None
    chain_frozen: bool = False
    base_read_only: bool = False

    async def run(self) -> None:
        top_edge, base_edge = self.top_edge, self.base_edge
        assert top_edge is not None and base_edge is not None
        length = node_size(self.top_node)
        self.progress_set_remaining(length)
        if node_size(self.base_node) < length:
            # blk_truncate(s->base, len): the base grows to the top's size.
            try:
                with self.daemon.graph_transaction("block-commit-grow", {"id": self.id}) as tran:
                    truncate(tran, self.base_node, length)
            except GenericError as err:
                raise JobFailed(errno.EIO, err.desc) from err
        offset, delay = 0, 0
        first = True
        while offset < length:
            await self.sleep_ns(delay)
            if self.is_cancelled():
                break
            if first:
                await self.io_point()  # the first allocation lookup reads L2 tables
                first = False
            chunk = min(COMMIT_BUFFER_SIZE, length - offset)
            copy, n = await allocated_above(self.top_node, self.base_overlay, True, offset, chunk)
            if copy:
                in_source = True
                try:
                    data = await child_read(top_edge, offset, n)
                    in_source = False
                    await self.io_point()  # after the read: see StreamJob.run
                    await child_write(base_edge, offset, data)
                except (BlockIOError, OSError) as exc:
                    code = exc.errno or errno.EIO
                    if self.error_action(in_source, code) == "report":
                        raise JobFailed(code) from exc
                    continue
            self.progress_update(n)
            delay = self.ratelimit_delay(n) if copy else 0
            offset += n

    def prepare(self) -> None:
        daemon = self.daemon
        with daemon.graph_transaction("block-commit-prepare", {"id": self.id}) as tran:
            unfreeze_chain(tran, self.commit_top, self.base_node)
            self.chain_frozen = False
            _detach_backend(tran, daemon, self.base_edge)
            self.base_edge = None
            failure = self._drop_intermediate(tran)
        if failure is not None:
            raise JobFailed(errno.EIO, failure)

    def _drop_intermediate(self, tran: Transaction) -> str | None:
        """bdrv_drop_intermediate(commit_top, base, backing_file)."""
        graph = self.daemon.graph
        top, base = self.commit_top, self.base_node
        explicit_top = skip_implicit_filters(top) or top
        update_inherits = _inherits_recursive(base, explicit_top)
        name = self.backing_file or image_filename(base)
        parents = [e for e in top.parents]
        ref_node(tran, top)
        try:
            replace_node(tran, graph, top, base, auto_skip=False)
        except GenericError as err:
            return err.desc
        for edge in parents:
            parent = edge.parent
            if isinstance(parent, Node) and edge.role & Role.COW:
                change_backing_file(tran, parent, name, base.format_name)
        if update_inherits:
            set_inherits_from(tran, base, explicit_top.inherits_from)
        unref_node(tran, graph, top)
        return None

    def abort(self) -> None:
        daemon = self.daemon
        with daemon.graph_transaction("block-commit-abort", {"id": self.id}) as tran:
            if self.chain_frozen:
                unfreeze_chain(tran, self.commit_top, self.base_node)
                self.chain_frozen = False
            _detach_backend(tran, daemon, self.base_edge)
            self.base_edge = None
            self.remove_all_nodes(tran)
            if self.commit_top.refcnt > 0 and self.commit_top.backing is not None:
                ref_node(tran, self.commit_top)
                backing = self.commit_top.backing.child
                assert backing is not None
                replace_node(tran, daemon.graph, self.commit_top, backing, detach_subchain=True)
                unref_node(tran, daemon.graph, self.commit_top)

    def clean(self) -> None:
        daemon = self.daemon
        with daemon.graph_transaction("block-commit-clean", {"id": self.id}) as tran:
            _detach_backend(tran, daemon, self.top_edge)
            self.top_edge = None
        if self.base_read_only:
            restore_read_only(daemon, self.base_node, "block-commit-read-only")


def _inherits_recursive(child: Node, parent: Node) -> bool:
    cur: Node | None = child
    while cur is not None and cur is not parent:
        cur = cur.inherits_from
    return cur is parent


def _new_commit_top(tran: Transaction, daemon: Any, name: str | None) -> Node:
    """bdrv_new_open_driver(commit_top, filter-node-name)."""
    graph = daemon.graph
    if name is not None:
        check_node_name(
            name,
            is_node_name=graph.__contains__,
            is_backend_name=lambda n: graph.backend_by_name(n) is not None,
        )
    node = Node(name if name is not None else graph.names.generate(), INTERNAL["commit_top"], 0)
    node.implicit = name is None
    add_node(tran, graph, node)
    return node


def commit_start(
    ctx: CommandContext, args: dict[str, Any], bs: Node, base: Node, top: Node
) -> CommitJob:
    """commit_start, inside one graph transaction; the job is created, not started."""
    daemon = ctx.daemon
    graph = daemon.graph
    if skip_filters(top) is skip_filters(base):
        raise GenericError("Invalid files for merge: top and base are the same")
    base_perms = int(Perm.CONSISTENT_READ | Perm.WRITE)
    if node_size(base) < node_size(top):
        base_perms |= int(Perm.RESIZE)
    with daemon.graph_transaction("block-commit", args) as tran:
        job = CommitJob(
            daemon,
            args.get("job-id", ""),
            tran,
            bs,
            perm=0,
            shared=PERM_ALL,
            speed=int(args.get("speed", 0)),
            on_error=str(args.get("on-error", "report")),
            auto_finalize=bool(args.get("auto-finalize", True)),
            auto_dismiss=bool(args.get("auto-dismiss", True)),
        )
        try:
            if base.read_only:
                # The base becomes writable for the job (commit_start).
                reopen_read_only(tran, graph, base, False)
                job.base_read_only = True
            commit_top = _new_commit_top(tran, daemon, args.get("filter-node-name"))
            append(tran, graph, commit_top, top)
            unref_node(tran, graph, commit_top)  # its parents hold it now
            job.commit_top = commit_top
            overlay = find_overlay(top, base)
            assert overlay is not None
            cow = cow_child(overlay)
            filtered_base = cow.child if cow is not None else None
            shared = int(Perm.WRITE_UNCHANGED | Perm.WRITE)
            it: Node | None = top
            while it is not None and it is not base:
                if it is filtered_base:
                    shared |= int(Perm.CONSISTENT_READ)
                job.add_node(tran, "intermediate node", it, 0, shared)
                it = next_in_chain(it)
            freeze_chain(tran, commit_top, base)
            job.chain_frozen = True
            job.add_node(tran, "base", base, 0, PERM_ALL)
            base_bb = BlockBackend()
            add_root_parent(tran, graph, base_bb)
            job.base_edge = root_attach(
                tran, graph, base_bb, base, "root", role=Role.FILTERED | Role.PRIMARY,
                perm=base_perms, shared=int(Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED),
            )  # fmt: skip
            top_bb = BlockBackend()
            add_root_parent(tran, graph, top_bb)
            job.top_edge = root_attach(
                tran, graph, top_bb, top, "root", role=Role.FILTERED | Role.PRIMARY,
                perm=0, shared=PERM_ALL,
            )  # fmt: skip
        except GenericError:
            job.early_fail()
            raise
        job.top_node = top
        job.base_node = base
        job.base_overlay = overlay
        job.backing_file = args.get("backing-file")
    return job


def _has_writers(node: Node) -> bool:
    return any(e.perm & Perm.WRITE for e in node.parents)


@command("block-commit")
def block_commit(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_block_commit."""
    graph = ctx.daemon.graph
    device = str(args["device"])
    try:
        bs = root_bs(graph, device)
    except GenericError:
        if graph.lookup(device) is None and graph.backend_by_name(device) is None:
            raise DeviceNotFound(f"Device '{device}' not found") from None
        raise
    blocked(bs, "commit-source")
    top_bs: Node | None = bs
    if "top-node" in args and "top" in args:
        raise GenericError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args:
        name = str(args["top-node"])
        top_bs = lookup_bs(graph, None, name)
        if not chain_contains(bs, top_bs):
            raise GenericError(f"'{name}' is not in this backing file chain")
    elif args.get("top"):
        top = str(args["top"])
        if image_filename(bs) != top:
            top_bs = find_backing_image(bs, top)
    if top_bs is None:
        raise GenericError(f"Top image file {args.get('top') or 'NULL'} not found")
    if "base-node" in args and "base" in args:
        raise GenericError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        name = str(args["base-node"])
        base_bs = lookup_bs(graph, None, name)
        if not chain_contains(top_bs, base_bs):
            raise GenericError(f"'{name}' is not in this backing file chain")
    elif args.get("base"):
        found = find_backing_image(top_bs, str(args["base"]))
        if found is None:
            raise GenericError(f"Can't find '{args['base']}' in the backing chain")
        base_bs = found
    else:
        found = find_overlay(top_bs, None)  # bdrv_find_base
        if found is None:
            raise GenericError("There is no backimg image")
        base_bs = found
    it: Node | None = top_bs
    stop = next_in_chain(base_bs)
    while it is not None and it is not stop:
        blocked(it, "commit-target")
        it = next_in_chain(it)
    if top_bs is base_bs:
        raise GenericError("cannot commit an image into itself")
    if skip_filters(top_bs) is skip_filters(bs) or _has_writers(top_bs):
        if "backing-file" in args:
            if skip_filters(top_bs) is skip_filters(bs):
                raise GenericError("'backing-file' specified, but 'top' is the active layer")
            raise GenericError("'backing-file' specified, but 'top' has a writer on it")
        commit_active_start(ctx, args, top_bs, base_bs)
        return
    overlay = find_overlay(bs, top_bs)
    if overlay is not None:
        blocked(overlay, "commit-target")
    job = commit_start(ctx, args, bs, base_bs, top_bs)
    job.start()
