"""``blockdev-backup`` and ``drive-backup``: the QMP commands and the
transaction actions (QEMU 7.2's blockdev.c).

Both commands are one-action transactions (blockdev_do_action), as in QEMU.
An action's prepare looks up the source and the target, drains the source
(below), runs do_backup_common's checks in QEMU's order and creates the job
(``qmpgraph.jobs.backup``); commit starts it; abort cancels it; with
``completion-mode=grouped`` the backup jobs of one transaction share a job
transaction (one failing cancels the others).

Each action drains its source from prepare to the transaction's last clean
(``qmpgraph.jobs.drain.Drain``: jobs holding it pause and resume, a new job
pauses right after it starts); the transaction's own bdrv_drain_all is
replayed by ``run_actions``.

What does not live here: the job (``qmpgraph.jobs.backup``), the
transaction machinery (``qmpgraph.commands.transaction``).
"""

from __future__ import annotations

import os
from typing import Any

from qmpgraph.bitmaps import registry as bitmap_registry
from qmpgraph.bitmaps.checks import ALLOW_RO, check
from qmpgraph.commands.block import device_or_node_name
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.query import Query, node_length
from qmpgraph.commands.registry import command
from qmpgraph.commands.snapshot import QEMU_FORMATS, img_create_checks
from qmpgraph.commands.transaction import BlkAction, action, lookup_bs, run_actions
from qmpgraph.drivers import REGISTRY
from qmpgraph.drivers.open import TreeOpenContext, open_one
from qmpgraph.drivers.qcow2_image import create_image
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, cow_child, skip_filters, skip_implicit_filters
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.jobs.backup import BackupJob, BackupParams, start_backup
from qmpgraph.jobs.core import JobTxn
from qmpgraph.jobs.drain import transaction_drain
from qmpgraph.transactions.actions import unref_node
from qmpgraph.transactions.composite import set_backing
from qmpgraph.transactions.engine import Transaction

# -- do_backup_common ------------------------------------------------------------------


def backup_params(data: dict[str, Any], source: Node) -> BackupParams:
    """do_backup_common's checks, in QEMU's order, and the job's parameters."""
    sync = str(data["sync"])
    perf = data.get("x-perf") or {}
    params = BackupParams(
        sync=sync,
        speed=int(data.get("speed", 0)),
        compress=bool(data.get("compress", False)),
        filter_node_name=data.get("filter-node-name"),
        max_workers=int(perf.get("max-workers", 64)),
        max_chunk=int(perf.get("max-chunk", 0)),
        on_source_error=str(data.get("on-source-error", "report")),
        on_target_error=str(data.get("on-target-error", "report")),
        auto_finalize=bool(data.get("auto-finalize", True)),
        auto_dismiss=bool(data.get("auto-dismiss", True)),
    )
    name = data.get("bitmap")
    mode = data.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and name is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        mode = "on-success"
        sync = params.sync = "bitmap"
    if name is not None:
        bitmap = bitmap_registry.find(source, str(name))
        if bitmap is None:
            raise GenericError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        _check_allow_ro(bitmap)
        if sync == "none":
            raise GenericError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(
                f"Bitmap sync mode '{mode}' has no meaningful effect when combined "
                f"with sync mode '{sync}'"
            )
        params.bitmap = bitmap
        params.bitmap_mode = str(mode)
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return params


def _check_allow_ro(bitmap: Any) -> None:
    """bdrv_dirty_bitmap_check(BDRV_BITMAP_ALLOW_RO): busy or inconsistent fail."""
    check(bitmap, ALLOW_RO)


# -- the transaction actions -------------------------------------------------------------


class BackupAction(BlkAction):
    """blockdev-backup (and the base of drive-backup) as a transaction action."""

    grouped_ok = True
    job: BackupJob | None = None
    drained = False

    def lookup(self, tran: Transaction) -> tuple[Node, Node]:
        """The source and the target nodes."""
        del tran
        device = str(self.data["device"])
        source = lookup_bs(self.graph, device, device)
        name = str(self.data["target"])
        target = lookup_bs(self.graph, name, name)
        return source, target

    def prepare(self, tran: Transaction) -> None:
        """blockdev_backup_prepare: look up, drain the source, create the job."""
        source, target = self.lookup(tran)
        drain = transaction_drain(tran)
        drain.begin(self.daemon, source)
        self.drained = True
        txn: JobTxn | None = None
        if self.mode == "grouped":
            if drain.txn is None:
                drain.txn = JobTxn()
            txn = drain.txn
        params = backup_params(self.data, source)
        self.job = start_backup(
            self.daemon,
            tran,
            self.data.get("job-id"),
            source=source,
            target=target,
            params=params,
            txn=txn,
        )

    def commit(self, tran: Transaction) -> None:
        """Start the job (it pauses at once: its nodes are drained)."""
        job = self.job
        assert job is not None

        def created() -> None:
            job.creating = False

        tran.on_commit(created)
        job.start()
        transaction_drain(tran).started(job)

    def abort(self, tran: Transaction) -> None:
        """Cancel a job that was created (job_cancel_sync), then end the drain."""
        if self.job is not None:
            self.job.cancel(True)
        self._end_drain(tran)

    def clean(self, tran: Transaction) -> None:
        """End the drain of the source."""
        self._end_drain(tran)

    def _end_drain(self, tran: Transaction) -> None:
        if self.drained:
            self.drained = False
            transaction_drain(tran).end()


action("blockdev-backup")(BackupAction)


class DriveBackupAction(BackupAction):
    """drive-backup: the target image is created (unless mode=existing) and opened
    with discard=unmap and detect-zeroes=unmap; with sync=none its backing is the
    source."""

    target: Node | None = None

    def prepare(self, tran: Transaction) -> None:
        """drive_backup_prepare, QEMU 7.2's order."""
        data = self.data
        mode = str(data.get("mode", "absolute-paths"))
        device = str(data["device"])
        source_bs = lookup_bs(self.graph, device, device)
        if source_bs.driver is None:
            raise GenericError("Device has no medium")
        drain = transaction_drain(tran)
        drain.begin(self.daemon, source_bs)
        self.drained = True
        fmt = data.get("format")
        if fmt is None and mode != "existing":
            fmt = source_bs.format_name
        blocked_backup_source(source_bs)
        flags = int(source_bs.open_flags | OpenFlag.RDWR)
        sync = str(data["sync"])
        backing: Node | None = None
        if sync == "top":
            unfiltered = skip_filters(source_bs)
            edge = cow_child(unfiltered) if unfiltered is not None else None
            backing = edge.child if edge is not None else None
            if backing is None:
                sync = "full"
        if sync == "none":
            backing = source_bs
            flags |= OpenFlag.NO_BACKING
        path = str(data["target"])
        if mode != "existing":
            assert fmt is not None
            no_backing = bool(flags & OpenFlag.NO_BACKING)
            size = node_length(source_bs)
            create_target(self.graph, path, str(fmt), size, backing, no_backing=no_backing)
        target = self.target = open_target(tran, self.graph, path, fmt, flags)
        if sync == "none":
            set_backing(tran, self.graph, target, backing)
        txn: JobTxn | None = None
        if self.mode == "grouped":
            if drain.txn is None:
                drain.txn = JobTxn()
            txn = drain.txn
        params = backup_params({**data, "sync": sync}, source_bs)
        self.job = start_backup(
            self.daemon,
            tran,
            data.get("job-id"),
            source=source_bs,
            target=target,
            params=params,
            txn=txn,
        )
        # The job and the filter hold the target now (bdrv_unref).
        unref_node(tran, self.graph, target)
        self.target = None


def blocked_backup_source(node: Node) -> None:
    """The early backup-source op blocker check of drive-backup."""
    reasons = node.op_blockers.get("backup-source")
    if reasons:
        raise GenericError(f"Node '{device_or_node_name(node)}' is busy: {reasons[0]}")


def _tree_size(node: Node) -> int:
    """How many nodes opening ``node``'s image again opens (it, file, backing)."""
    total = 1
    for edge in (node.file, node.backing):
        if edge is not None and edge.child is not None:
            total += _tree_size(edge.child)
    return total


def create_target(
    graph: BlockGraph, path: str, fmt: str, size: int, backing: Node | None, *, no_backing: bool
) -> None:
    """bdrv_img_create for the target: qcow2 (with a backing file name) or raw."""
    if backing is not None:
        explicit = skip_implicit_filters(backing) or backing
        backing_file = Query().refresh(explicit).filename
        backing_fmt = explicit.format_name or ""
        img_create_checks(path, fmt, backing_file, backing_fmt)
        if not no_backing:
            # bdrv_img_create opens the backing file (each node takes a name).
            for _ in range(_tree_size(explicit)):
                graph.names.generate()
        create_image(
            path.removeprefix("file:"), size, backing_file, backing_fmt,
            opened=graph.names.generate,
        )  # fmt: skip
        return
    if fmt not in QEMU_FORMATS:
        raise GenericError(f"Unknown file format '{fmt}'")
    if fmt == "qcow2":
        create_image(path.removeprefix("file:"), size, opened=graph.names.generate)
        return
    if fmt != "raw":
        raise GenericError(f"Creating '{fmt}' images is not supported by qmpgraph yet")
    name = path.removeprefix("file:")
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise GenericError(f"Could not create '{name}': {os.strerror(err.errno or 0)}") from err
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def open_target(
    tran: Transaction,
    graph: BlockGraph,
    path: str,
    fmt: str | None,
    flags: int,
    *,
    opts: dict[str, Any] | None = None,
) -> Node:
    """bdrv_open(target, NULL, options[, driver], flags); drive-backup's options
    are discard=unmap and detect-zeroes=unmap."""
    if opts is None:
        opts = {"discard": "unmap", "detect-zeroes": "unmap"}
    if fmt is not None:
        if REGISTRY.get(fmt) is None:
            raise GenericError(f"Unknown driver '{fmt}'")
        opts["driver"] = fmt
    else:
        opts["driver"] = probe_format(graph, path)
    drv = REGISTRY[str(opts["driver"])]
    opts["read-only"] = not flags & OpenFlag.RDWR
    opts["cache"] = {
        "direct": bool(flags & OpenFlag.NOCACHE),
        "no-flush": bool(flags & OpenFlag.NO_FLUSH),
    }
    if drv.protocol:
        opts["filename"] = path
    else:
        opts["file"] = {"driver": "file", "filename": path.removeprefix("file:")}
    if drv.supports_backing and flags & OpenFlag.NO_BACKING:
        opts["backing"] = None
    return open_one(TreeOpenContext(graph, tran), opts, None)


def probe_format(graph: BlockGraph, path: str) -> str:
    """The format of an existing image (qcow2 by its magic, else raw)."""
    name = path.removeprefix("file:")
    try:
        with open(name, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        graph.names.generate()  # the protocol node was named before its open failed
        raise GenericError(f"Could not open '{name}': {os.strerror(err.errno or 0)}") from err
    return "qcow2" if magic == b"QFI\xfb" else "raw"


action("drive-backup")(DriveBackupAction)


@command("drive-backup")
def drive_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Back ``device`` up into a new (or existing) image file."""
    daemon = ctx.daemon
    with daemon.graph_transaction("drive-backup", args) as tran:
        run_actions(daemon, tran, [{"type": "drive-backup", "data": args}])


@command("blockdev-backup")
def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Start a backup job from ``device`` to the existing node ``target``."""
    daemon = ctx.daemon
    with daemon.graph_transaction("blockdev-backup", args) as tran:
        run_actions(daemon, tran, [{"type": "blockdev-backup", "data": args}])
