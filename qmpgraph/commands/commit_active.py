"""Active commit: block-commit of the active layer, a mirror job into the base.

QEMU 7.2's commit_active_start is mirror_start_job with the base as target
(``target_is_backing``), no zeroing of the target, the backing chain left as
it is, and a job of type ``commit``.  On top of the mirror job
(``qmpgraph.jobs.mirror.MirrorJob``) this adds what mirror_start_job does
for a target in the source's chain: every node between the source and the
base held as "intermediate node" (sharing WRITE and WRITE_UNCHANGED, and
CONSISTENT_READ from the base's filters on), and the chain frozen from the
``mirror_top`` filter down to the base (unfrozen when the job exits).  The
dirty map starts with what is allocated above the base; the job goes
``ready`` and ``job-complete`` puts the base in the source's place.  A
read-only base is reopened read-write first and stays writable whatever
the job's end (verified against qsd 7.2: after a cancel too); only a job
that fails to start undoes the reopen.

What does not live here: intermediate commit (``commit``), the mirror job.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.snapshot import reopen_read_only
from qmpgraph.commands.stream import (
    find_overlay,
    freeze_chain,
    next_in_chain,
    unfreeze_chain,
)
from qmpgraph.drivers.job_filters import mark_commit
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import cow_child
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Perm
from qmpgraph.jobs.mirror import (
    DEFAULT_BUF_SIZE,
    MirrorJob,
    MirrorParams,
    check_job_id,
    default_granularity,
)
from qmpgraph.jobs.mirror_graph import insert_mirror_top
from qmpgraph.transactions.actions import unref_node
from qmpgraph.transactions.engine import Transaction


class ActiveCommitJob(MirrorJob):
    """commit_active_job_driver: a mirror job of type ``commit``."""

    job_type = "commit"
    chain_frozen = False

    def setup(self, tran: Transaction, target_is_backing: bool) -> None:
        """The mirror setup, then the intermediate nodes and the frozen chain."""
        super().setup(tran, target_is_backing)
        overlay = find_overlay(self.source, self.target)
        cow = cow_child(overlay) if overlay is not None else None
        filtered_target = cow.child if cow is not None else None
        shared = int(Perm.WRITE_UNCHANGED | Perm.WRITE)
        it = next_in_chain(self.source)
        while it is not None and it is not self.target:
            if it is filtered_target:
                shared |= int(Perm.CONSISTENT_READ)
            self.add_node(tran, "intermediate node", it, 0, shared)
            it = next_in_chain(it)
        freeze_chain(tran, self.top, self.target)
        self.chain_frozen = True

    def _exit(self, *, abort: bool) -> None:
        """mirror_exit_common begins by unfreezing the chain down to the target."""
        if self.chain_frozen and not self.exited:
            self.chain_frozen = False
            with self.daemon.graph_transaction("commit-unfreeze", {"id": self.id}) as tran:
                unfreeze_chain(tran, self.top, self.target)
        super()._exit(abort=abort)


def commit_active_start(ctx: CommandContext, args: dict[str, Any], top: Node, base: Node) -> None:
    """commit_active_start + mirror_start_job, in one graph transaction; starts the job."""
    daemon = ctx.daemon
    graph = daemon.graph
    on_error = str(args.get("on-error", "report"))
    params = MirrorParams(
        sync="full",
        backing_mode="leave",
        zero_target=False,
        speed=int(args.get("speed", 0)),
        granularity=default_granularity(base),
        buf_size=DEFAULT_BUF_SIZE,
        on_source_error=on_error,
        on_target_error=on_error,
        filter_node_name=args.get("filter-node-name"),
        auto_finalize=bool(args.get("auto-finalize", True)),
        auto_dismiss=bool(args.get("auto-dismiss", True)),
    )
    base_ro = base.read_only
    with daemon.graph_transaction("block-commit", args) as tran:
        if base_ro:
            # commit_active_start: the base becomes writable before the
            # mirror job is set up (the transaction's abort undoes it).
            reopen_read_only(tran, graph, base, False)
        mirror_top = insert_mirror_top(tran, graph, top, params.filter_node_name)
        mark_commit(mirror_top)
        job_id = check_job_id(daemon, args.get("job-id"), mirror_top)
        job = ActiveCommitJob(
            daemon, job_id, tran, top=mirror_top, source=top, target=base, params=params
        )
        unref_node(tran, graph, mirror_top)  # the job's edge holds the filter now
        job.base = base
        try:
            job.setup(tran, True)
        except GenericError:
            job.early_fail()
            raise
        job.creating = False
    job.start()
