"""``x-blockdev-amend`` (QEMU 7.2's blockdev-amend.c): the "amend" job.

The checks, in QEMU's order: the node (bdrv_lookup_bs by node name), the
driver named in ``options`` must be the node's ("x-blockdev-amend doesn't
support changing the block driver") and one that can amend ("Driver does
not support x-blockdev-amend": of QEMU's drivers only qcow2 and luks); then
the job (ID checks, manual dismiss) holds a reference on the node until it
is dismissed, and runs the driver's amend as one unit of progress.

qcow2 (qcow2_co_amend): without ``encrypt`` there is nothing to change and
the job concludes; ``encrypt`` on an image that is not encrypted fails the
job ("image is not encrypted, can't amend"), as does a format change away
from (or an image not using) LUKS encryption.

luks (block_crypto_co_amend_luks): before the job starts, the node takes
exclusive write access to its file (a refusal fails the command, the job
created and gone again); the key slots are added or erased by
``qmpgraph.io.luks_amend``; the access is given back when the job is
cleaned.

Not implemented (refused before the job with a qmpgraph message): changing
the LUKS key slots of a qcow2 image encrypted with LUKS.

What does not live here: the job core (``qmpgraph.jobs.core``).
"""

from __future__ import annotations

import errno
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import lookup_bs
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.errors import GenericError, QMPError
from qmpgraph.graph.model import Node
from qmpgraph.io.luks_amend import amend_luks_node, set_updating_keys
from qmpgraph.jobs.core import Job, JobFailed
from qmpgraph.objects import tree_for
from qmpgraph.transactions.actions import ref_node, unref_node

# qcow2's crypt_method header values.
CRYPT_NONE = 0
CRYPT_LUKS = 2

NOT_YET = "x-blockdev-amend of LUKS key slots is not supported by qmpgraph yet"


class AmendJob(Job):
    """The amend job: the driver's amend, one unit of progress."""

    job_type = "amend"

    def __init__(
        self,
        ctx: CommandContext,
        job_id: str,
        node: Node,
        options: dict[str, Any],
        force: bool = False,
    ):
        super().__init__(ctx.daemon, job_id, auto_dismiss=False)
        self.node = node
        self.options = options
        self.force = force
        self.holds = False

    def hold(self) -> None:
        """bdrv_ref: the node stays until the job is dismissed."""
        with self.daemon.graph_transaction("amend-ref", {"id": self.id}) as tran:
            ref_node(tran, self.node)
        self.holds = True

    async def run(self) -> None:
        """blockdev_amend_run."""
        self.progress_set_remaining(1)
        try:
            if self.node.format_name == "luks":
                tree = tree_for(self.daemon.graph)
                await amend_luks_node(tree, self.node, self.options, self.force, self.io_point)
            else:
                _qcow2_amend(self.node, self.options)
        finally:
            self.progress_update(1)

    def clean(self) -> None:
        """blockdev_amend_clean: the driver gives back its update permissions."""
        if self.node.format_name == "luks":
            set_updating_keys(self.daemon, self.node, False)

    def free(self) -> None:
        """blockdev_amend_free: drop the node reference."""
        if self.holds:
            self.holds = False
            with self.daemon.graph_transaction("amend-unref", {"id": self.id}) as tran:
                unref_node(tran, self.daemon.graph, self.node)


def _crypt_method(node: Node) -> int:
    state = node.state
    return state.header.crypt_method if isinstance(state, Qcow2State) else CRYPT_NONE


def _qcow2_amend(node: Node, options: dict[str, Any]) -> None:
    """qcow2_co_amend: only the encryption can be amended."""
    encrypt = options.get("encrypt")
    if encrypt is None:
        return
    crypt = _crypt_method(node)
    if crypt == CRYPT_NONE:
        raise JobFailed(errno.EOPNOTSUPP, "image is not encrypted, can't amend")
    if encrypt.get("format") != "luks" or crypt != CRYPT_LUKS:
        raise JobFailed(
            errno.EOPNOTSUPP, "Amend can't be used to change the qcow2 encryption format"
        )
    # LUKS key slots: refused before the job (NOT_YET).


@command("x-blockdev-amend")
def x_blockdev_amend(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_x_blockdev_amend: check the node and driver, then start the job."""
    daemon = ctx.daemon
    node = lookup_bs(daemon.graph, None, str(args["node-name"]))
    options = dict(args["options"])
    driver = str(options["driver"])
    if node.format_name != driver:
        raise GenericError("x-blockdev-amend doesn't support changing the block driver")
    if driver not in ("qcow2", "luks"):
        raise GenericError("Driver does not support x-blockdev-amend")
    encrypt = options.get("encrypt")
    if (
        encrypt is not None
        and encrypt.get("format") == "luks"
        and _crypt_method(node) == CRYPT_LUKS
    ):
        raise GenericError(NOT_YET)
    job = AmendJob(ctx, str(args["job-id"]), node, options, bool(args.get("force", False)))
    job.hold()
    if driver == "luks":
        # blockdev_amend_pre_run (block_crypto_amend_prepare): the write
        # permission for the update is taken before the job starts.
        try:
            set_updating_keys(daemon, node, True)
        except QMPError:
            job.early_fail()
            raise
    job.start()
