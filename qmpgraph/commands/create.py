"""``blockdev-create``: make an image as a job (QEMU 7.2's block/create.c).

The command checks the driver ("Driver does not support blockdev-create"
for drivers without a create function, such as ``raw``), then creates a job
of type ``create`` that must be dismissed by hand.  The job's run is the
driver's create function; its failure is the job's error (query-jobs):

* ``file``: raw_co_create: the file is created (O_CREAT) or reused, its image
  locks checked for WRITE and RESIZE, emptied, then set to its size with the
  preallocation asked for (off, falloc, full).
* ``qcow2``: qcow2_co_create: the ``file`` node is looked up (an inline
  reference is opened for the job's duration, as is ``data-file``), the options
  checked in QEMU's order (``create_qcow2.validate``), WRITE and RESIZE taken
  on the file node through a temporary BlockBackend (so a parent that does
  not share them refuses with the permission system's message), then the
  image written through the node's descriptor as QEMU leaves it
  (``create_qcow2.image_writes``, equal to ``qemu-img create``'s bytes).  QEMU
  opens the new image twice, which takes two automatic node names.
* ``luks``: block_crypto_co_create_luks: the ``file`` node (or inline
  reference), WRITE and RESIZE taken as for qcow2, then the LUKS1 volume
  (``qmpgraph.io.luks_create``).

What does not live here: the job core (``qmpgraph.jobs``).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.create_qcow2 import (
    Qcow2Layout,
    bare_image,
    encryption_refusal,
    image_writes,
    validate,
)
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import lookup_bs
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.filelock import ImageLock, ofd_supported
from qmpgraph.drivers.open import TreeOpenContext, open_one
from qmpgraph.drivers.raw import RawState
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import PERM_ALL, Perm, Role
from qmpgraph.io.luks_create import truncate_file, write_volume
from qmpgraph.io.stats import record_fd_write
from qmpgraph.jobs.core import Job, JobFailed
from qmpgraph.objects import tree_for
from qmpgraph.transactions.actions import add_root_parent
from qmpgraph.transactions.composite import root_attach
from qmpgraph.transactions.engine import Transaction

_CREATORS = frozenset({"file", "qcow2", "luks"})
# Drivers of 7.2's BlockdevCreateOptions that have a create function qmpgraph lacks.
_NOT_YET = frozenset(
    {"gluster", "nfs", "parallels", "qcow", "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk",
     "vpc"}
)  # fmt: skip


def _fail(err: GenericError) -> JobFailed:
    return JobFailed(errno.EINVAL, err.desc)


def open_for_create(path: str) -> ImageLock:
    """raw_co_create's first half: create or open the file, take and check its locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        code = err.errno or errno.EIO
        raise JobFailed(code, f"Could not create '{path}': {os.strerror(code)}") from err
    lock = ImageLock(fd, path, use_lock=ofd_supported())
    try:
        lock.prepare(Perm.WRITE | Perm.RESIZE, PERM_ALL & ~Perm.RESIZE)
    except GenericError as err:
        lock.close()
        raise JobFailed(errno.EAGAIN, err.desc) from err
    return lock


def size_file(fd: int, size: int, prealloc: str) -> None:
    """raw_co_create's second half: empty the file, then grow it with ``prealloc``."""
    truncate_file(fd, 0, "off")
    # The size is a uint64 that file-posix takes as an int64.
    truncate_file(fd, size - (1 << 64) if size >= 1 << 63 else size, prealloc)


class CreateJob(Job):
    """The blockdev-create job: one unit of progress, the driver's create function."""

    job_type = "create"

    def __init__(self, ctx: CommandContext, job_id: str, options: dict[str, Any]) -> None:
        super().__init__(ctx.daemon, job_id, auto_dismiss=False)
        self.options = options

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            if self.options["driver"] == "file":
                if int(self.options.get("extent-size-hint", 0)) > 0xFFFFFFFF:
                    raise JobFailed(errno.EINVAL, "Extent size hint is too large")
                lock = open_for_create(str(self.options["filename"]))
                try:
                    await self.io_point()
                    size_file(
                        lock.fd, int(self.options["size"]), self.options.get("preallocation", "off")
                    )
                finally:
                    lock.close()
            elif self.options["driver"] == "luks":
                await self._create_luks()
            else:
                await self._create_qcow2()
        finally:
            self.progress_update(1)

    def _take_file(self, node: Node) -> None:
        """blk_new_with_bs(file, WRITE|RESIZE, ALL): only the permission check matters.

        The BlockBackend is dropped at once (an aborted transaction): the
        image is then written through the node's descriptor.
        """
        graph = self.daemon.graph
        tran = Transaction()
        try:
            bb = BlockBackend()
            add_root_parent(tran, graph, bb)
            root_attach(
                tran, graph, bb, node, "root", role=Role.FILTERED | Role.PRIMARY,
                perm=int(Perm.WRITE | Perm.RESIZE), shared=PERM_ALL,
            )  # fmt: skip
        finally:
            tran.abort()

    async def _create_luks(self) -> None:
        """block_crypto_co_create_luks: the file node, WRITE and RESIZE on it, the volume."""
        graph = self.daemon.graph
        temp = Transaction()
        try:
            ref = self.options["file"]
            if isinstance(ref, dict):
                await self.io_point()
            try:
                if isinstance(ref, dict):
                    node = open_one(TreeOpenContext(graph, temp), {"read-only": False, **ref}, None)
                else:
                    node = lookup_bs(graph, str(ref), str(ref))
            except GenericError as err:
                raise JobFailed(errno.EIO, err.desc) from err
            try:
                self._take_file(node)
            except GenericError as err:
                raise JobFailed(errno.EPERM, err.desc) from err
            await self.io_point()
            await write_volume(tree_for(graph), node, self.options)
        finally:
            temp.abort()

    async def _create_qcow2(self) -> None:
        # Nodes opened from inline references live until the image is written
        # (bdrv_open_blockdev_ref ... bdrv_unref): this transaction is aborted.
        temp = Transaction()
        try:
            await self._write_qcow2(temp)
        finally:
            temp.abort()

    async def _write_qcow2(self, temp: Transaction) -> None:
        opts = self.options
        graph = self.daemon.graph
        data_nodes: list[Node] = []

        def resolve(ref: Any) -> Node:
            if not isinstance(ref, dict):
                return lookup_bs(graph, str(ref), str(ref))
            options = {"read-only": False, **ref}
            try:
                return open_one(TreeOpenContext(graph, temp), options, None)
            except GenericError as err:
                raise JobFailed(errno.EIO, err.desc) from err

        def data_file_name(data_ref: Any) -> str:
            data = resolve(data_ref)
            data_nodes.append(data)
            return _file_state(data).filename

        if isinstance(opts["file"], dict):
            await self.io_point()  # opening a file is I/O: the reply goes out first
        try:
            node = resolve(opts["file"])
            layout = validate(opts, data_file_name)
        except GenericError as err:
            raise _fail(err) from err
        try:
            self._take_file(node)
        except GenericError as err:
            raise JobFailed(errno.EPERM, err.desc) from err
        state = _file_state(node)
        await self.io_point()
        try:
            # The data file is taken when the new image is opened, after
            # the bare header is written (which then stays).
            for taken in data_nodes:
                self._take_file(taken)
        except GenericError as err:
            _write(state.lock.fd, 0, bare_image(layout))
            graph.names.generate()
            raise JobFailed(errno.EPERM, err.desc) from err
        try:
            plan = image_writes(layout)
        except GenericError as err:
            raise _fail(err) from err
        graph.names.generate()  # blk_new_open of the image (refcounts, header, size)
        fd = state.lock.fd
        try:
            for offset, data in plan.writes:
                _write(fd, offset, data)
            if plan.error is not None:
                raise JobFailed(errno.EINVAL, plan.error)
            if os.fstat(fd).st_size < plan.length:
                # Preallocated data clusters: the file grows over them.
                os.ftruncate(fd, plan.length)
            if plan.fill is not None:
                start, length = plan.fill
                if layout.preallocation == "falloc":
                    os.posix_fallocate(fd, start, length)
                else:
                    chunk = bytes(min(length, 1 << 20))
                    for offset in range(start, start + length, len(chunk)):
                        _write(fd, offset, chunk[: start + length - offset])
            for data_node in data_nodes:
                _size_data_file(_file_state(data_node).lock.fd, layout)
        except OSError as err:
            raise JobFailed(err.errno or errno.EIO) from err
        if layout.encrypt is not None:
            raise JobFailed(errno.ENOTSUP, encryption_refusal(layout.encrypt, tree_for(graph)))
        graph.names.generate()  # blk_new_open again, to flush


def _size_data_file(fd: int, layout: Qcow2Layout) -> None:
    """The data file after the image's truncate to its size.

    Without preallocation it is resized exactly.  With preallocation,
    copy-on-write writes zeros from an unaligned end to the (sub)cluster's end,
    else the file grows (only) to the size (with falloc and full, the new
    part allocated).  A file that was empty gets its first block written
    (allocate_first_block).
    """
    size = layout.size
    old_length = os.fstat(fd).st_size
    if layout.preallocation != "off":
        cow = (-size) % layout.cow_size
        if cow:
            _write(fd, size, bytes(cow))
            return
        if old_length >= size:
            return
    if layout.preallocation in ("falloc", "full"):
        # preallocate_co grows the data file with the mode asked for.
        truncate_file(fd, size, layout.preallocation)
        return
    os.ftruncate(fd, size)
    if old_length == 0 and size > 0:
        record_fd_write(fd, 0, os.pwrite(fd, bytes(512 if size < 4096 else 4096), 0))


def _write(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], offset + pos)
    record_fd_write(fd, offset, pos)


def _file_state(node: Node) -> FileState:
    # Writes through a throttle filter or a raw node without offset or size
    # land at the same offsets of its file: the image is written there.
    while (node.format_name == "throttle" or _whole_raw(node)) and node.file is not None:
        child = node.file.child
        assert isinstance(child, Node)
        node = child
    state = node.state
    if not isinstance(state, FileState) or state.lock.closed:
        raise JobFailed(errno.ENOTSUP, "qcow2 images can be created on 'file' nodes only")
    return state


def _whole_raw(node: Node) -> bool:
    state = node.state
    return isinstance(state, RawState) and not state.offset and not state.has_size


@command("blockdev-create")
def blockdev_create(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_blockdev_create: check the driver, then start the create job."""
    options = dict(args["options"])
    driver = str(options["driver"])
    if driver not in _CREATORS:
        if driver in _NOT_YET:
            raise GenericError(f"blockdev-create for '{driver}' is not supported by qmpgraph yet")
        raise GenericError("Driver does not support blockdev-create")
    job = CreateJob(ctx, str(args["job-id"]), options)
    job.start()
