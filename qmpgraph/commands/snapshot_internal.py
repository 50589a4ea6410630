"""Internal (qcow2) snapshots: ``blockdev-snapshot-internal-sync`` (command and
transaction action) and ``blockdev-snapshot-delete-internal-sync``.

Both follow QEMU 7.2's blockdev.c in its order: the root node lookup
(qmp_get_root_bs), then for create the completion mode (first, in the
action's prepare), the INTERNAL_SNAPSHOT op blocker, the read-only check,
bdrv_can_snapshot, the empty name and the name already in use; for delete
the missing id and name, the INTERNAL_SNAPSHOT_DELETE op blocker and the
lookup by id and/or name.  The snapshot functions fall back to the primary
child as block/snapshot.c does (a filter over a qcow2 node snapshots that
node); qcow2 is the only driver with internal snapshots.

The image file is changed in place by ``qmpgraph.drivers.qcow2_snapshot_write``
through a journal (``ImageUndo``): a failed command puts every byte back.
A transaction aborted after the snapshot was taken deletes it as QEMU's
internal_snapshot_abort does (``DeleteOnAbort``), so the file keeps its
grown length and its freed clusters, as in qsd.  The node's
``Qcow2State`` is replaced with the new header and snapshot list, so
queries list the snapshot and the data path rebuilds its image (the
clusters the snapshot shares lost their COPIED flags: later guest writes
copy them).

Where QEMU drains the node first, these commands refuse with EBUSY while
the data path has a call on the image in a worker thread (a synchronous
command cannot wait for it).

qmpgraph's own rule: a snapshot that a ``snapshot-access`` node exports
(its ``__org.qmpgraph_snapshot`` option) cannot be deleted while that node
exists ("Snapshot '%s' on device '%s' is in use by node '%s'").

What does not live here: the qcow2 snapshot format (``qcow2_snapshot*``),
external snapshots (``snapshot.py``), the transaction machinery.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import (
    ImageUndo,
    MarkingWriter,
    mark_discard,
    mark_metadata_writes,
)
from qmpgraph.commands.transaction import BlkAction, action, lookup_bs, single_action
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State, read_snapshots
from qmpgraph.drivers.qcow2_discard import DiscardType, FreedClusters, passed_types
from qmpgraph.drivers.qcow2_snapshot import SnapshotEntry
from qmpgraph.drivers.qcow2_snapshot_write import (
    SnapshotFailed,
    create_snapshot,
    delete_snapshot,
)
from qmpgraph.drivers.qcow2_storage import Qcow2Error
from qmpgraph.drivers.snapshot_access import exported_snapshot
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Node, ParentKind
from qmpgraph.graph.perms import OpenFlag, Role
from qmpgraph.transactions.actions import set_runtime
from qmpgraph.transactions.engine import Action, Transaction

_NAME_MAX = 255  # QEMUSnapshotInfo.name is a 256-byte C string
_CHILD_ROLES = Role.DATA | Role.METADATA | Role.FILTERED


class JournalFile:
    """``HostFile`` over a ``MarkingWriter``: every write can be undone, and
    marks the image file node's dirty bitmaps (``mark_metadata_writes``)."""

    def __init__(self, io: MarkingWriter) -> None:
        self.io = io

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (zeros past the end)."""
        return self.io.read(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write, journaling the old bytes."""
        self.io.write(offset, bytes(data))

    def size(self) -> int:
        """The file's current length."""
        return self.io.length

    def flush(self) -> None:
        """fdatasync the image file."""
        os.fdatasync(self.io.fd)

    def truncate(self, size: int) -> None:
        """Set the length, journaling a cut-off tail."""
        self.io.truncate(size)


def _fallback(node: Node) -> Node | None:
    """bdrv_snapshot_fallback: the primary child (file or backing), when no other
    child holds data or metadata."""
    primary = next((e for e in node.children if e.role & Role.PRIMARY), None)
    if primary is None or primary.child is None:
        return None
    if primary is not node.file and primary is not node.backing:
        return None
    if any(e is not primary and e.role & _CHILD_ROLES for e in node.children):
        return None
    return primary.child


def snapshot_node(node: Node) -> Node | None:
    """The node whose driver takes ``node``'s snapshot calls (qcow2), or None."""
    cur: Node | None = node
    while cur is not None:
        if cur.format_name == "qcow2":
            return cur
        cur = _fallback(cur)
    return None


def _can_snapshot(node: Node) -> bool:
    """bdrv_can_snapshot: writable, and qcow2 itself or through the fallback."""
    cur: Node | None = node
    while cur is not None:
        if cur.driver is None or cur.read_only or not cur.open_flags & OpenFlag.RDWR:
            return False
        if cur.format_name == "qcow2":
            return True
        cur = _fallback(cur)
    return False


def _snapshot_list(node: Node) -> tuple[Node, Qcow2State]:
    """bdrv_snapshot_list through the fallback; errors as bdrv_snapshot_find_by_id_and_name."""
    target = snapshot_node(node)
    state = target.state if target is not None else None
    if target is None or not isinstance(state, Qcow2State) or state.header.has_data_file:
        raise GenericError(f"Failed to get a snapshot list: {os.strerror(errno.ENOTSUP)}")
    return target, state


def _blocked(node: Node, op: str, device: str) -> None:
    reasons = node.op_blockers.get(op)
    if reasons:
        raise GenericError(f"Node '{device}' is busy: {reasons[0]}")


def _data_path_busy(node: Node) -> bool:
    """Whether the data path has a call on ``node``'s image in a worker thread.

    QEMU drains the node first; a synchronous command cannot wait for a
    worker (which may itself wait for the event loop), so the snapshot
    commands refuse with EBUSY rather than change metadata under it.  The
    hook is looked up in ``sys.modules``: when the data path was never
    loaded nothing can be in flight, and the command imports no trio.
    """
    hook = sys.modules.get("qmpgraph.io.qcow2_hook")
    return hook is not None and bool(hook.QCOW2_IO.busy(node))


def _image_file(target: Node) -> Node | None:
    """The node of ``target``'s image file (its ``file`` child)."""
    return target.file.child if target.file is not None else None


def _journal(tran: Transaction, target: Node) -> JournalFile:
    """A journaled view of ``target``'s image file (its ``file`` child)."""
    image = _image_file(target)
    state = image.state if image is not None else None
    if not isinstance(state, FileState) or state.lock.closed:
        raise SnapshotFailed(errno.ENOTSUP)
    if _data_path_busy(target):
        raise SnapshotFailed(errno.EBUSY)
    fd = state.lock.fd
    io = MarkingWriter(fd, os.fstat(fd).st_size)
    tran.add(ImageUndo(io))
    return JournalFile(io)


def _reread(target: Node, host: JournalFile) -> Qcow2State:
    """``target``'s state with the header fields and snapshot list now on disk."""
    state = target.state
    assert isinstance(state, Qcow2State)
    head = host.pread(60, 12)
    count = int.from_bytes(head[:4], "big")
    offset = int.from_bytes(head[4:], "big")
    header = replace(state.header, nb_snapshots=count, snapshots_offset=offset)
    snapshots = read_snapshots(host.pread, offset, count)
    return replace(state, header=header, snapshots=snapshots)


def _refresh(tran: Transaction, target: Node, host: JournalFile) -> None:
    """Install the new header fields and snapshot list in ``target``'s state."""
    set_runtime(tran, target, state=_reread(target, host))


@dataclass(frozen=True, slots=True)
class DeleteOnAbort(Action):
    """internal_snapshot_abort: delete the snapshot just taken (bdrv_snapshot_delete).

    Registered after the create's journal and before the node's new state, so
    it aborts after the state went back and before the journal: it deletes the
    snapshot for real, leaves the journal nothing to put back, and installs
    the header and snapshot list the deletion wrote.  A failed deletion is only
    reported by QEMU (on stderr): the snapshot then stays.
    """

    name = "internal-snapshot-delete-on-abort"
    target: Node
    journal: MarkingWriter
    ident: str
    discards: FreedClusters | None

    def abort(self) -> None:
        io = self.journal
        host = JournalFile(MarkingWriter(io.fd, os.fstat(io.fd).st_size))
        try:
            delete_snapshot(host, self.ident, None, discards=self.discards)
            if self.discards is not None:
                self.discards.process()
        except (Qcow2Error, OSError) as err:
            print(
                f"qmpgraph: Failed to delete snapshot with id '{self.ident}': {err}",
                file=sys.stderr,
            )
        mark_metadata_writes(_image_file(self.target), host.io)
        io.journal.clear()
        io.length = io.original_length = os.fstat(io.fd).st_size
        self.target.state = _reread(self.target, host)


def _truncate_name(name: str) -> bytes:
    """What pstrcpy keeps of ``name`` in a 256-byte buffer (bytes: it may end
    inside a character, as in QEMU)."""
    return name.encode()[:_NAME_MAX]


@action("blockdev-snapshot-internal-sync")
class InternalSnapshot(BlkAction):
    """internal_snapshot_prepare: take the snapshot at once; abort undoes it."""

    def prepare(self, tran: Transaction) -> None:
        """QEMU's checks in QEMU's order, then the snapshot itself."""
        self.check_completion_mode()
        device = str(self.data["device"])
        name = str(self.data["name"])
        node = _root(self.graph, device)
        _blocked(node, "internal-snapshot", device)
        if node.read_only:
            raise GenericError(f"Device '{device}' is read only")
        if not _can_snapshot(node):
            raise GenericError(
                f"Block format '{node.format_name}' used by device '{device}' "
                "does not support internal snapshots"
            )
        if not name:
            raise GenericError("Name is empty")
        target, state = _snapshot_list(node)
        if any(sn.name == name for sn in state.snapshots):
            raise GenericError(f"Snapshot with name '{name}' already exists on device '{device}'")
        # qemu-storage-daemon's virtual clock is the host clock (microseconds).
        now = time.time_ns() // 1000 * 1000
        host: JournalFile | None = None
        try:
            host = _journal(tran, target)
            discards = _snapshot_discards(tran, target, host)
            entry = create_snapshot(
                host,
                _truncate_name(name),
                date_sec=now // 1_000_000_000,
                date_nsec=now % 1_000_000_000,
                vm_clock_nsec=now,
                discards=discards,
            )
        except SnapshotFailed as err:
            raise GenericError(
                f"Failed to create snapshot '{name}' on device '{device}': {os.strerror(err.errno)}"
            ) from err
        except (Qcow2Error, OSError) as err:
            code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
            raise GenericError(
                f"Failed to create snapshot '{name}' on device '{device}': {os.strerror(code)}"
            ) from err
        finally:
            if host is not None:
                mark_metadata_writes(_image_file(target), host.io)
        tran.add(DeleteOnAbort(target, host.io, entry.id, discards))
        _refresh(tran, target, host)


def _root(graph: BlockGraph, device: str) -> Node:
    """qmp_get_root_bs: a node whose parents are all BlockBackends."""
    node = lookup_bs(graph, device, device)
    if any(e.kind is not ParentKind.BLOCK_BACKEND for e in node.parents):
        raise GenericError("Need a root block node")
    if node.driver is None:
        raise GenericError("Device has no medium")
    return node


@command("blockdev-snapshot-internal-sync")
def blockdev_snapshot_internal_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Take an internal snapshot of a root node (a one-action transaction)."""
    single_action(ctx, "blockdev-snapshot-internal-sync", args)


def _refuse_exported(target: Node, ident: str, device: str) -> None:
    """qmpgraph's rule: an exported snapshot stays while its snapshot-access node does."""
    for edge in target.parents:
        user = edge.parent
        if not isinstance(user, Node) or user.format_name != "snapshot-access":
            continue
        exported = exported_snapshot(user)
        if exported is not None and exported.id == ident:
            raise GenericError(
                f"Snapshot '{exported.name}' on device '{device}' is in use by node "
                f"'{user.node_name}'"
            )


def _snapshot_info(entry: SnapshotEntry) -> dict[str, Any]:
    """SnapshotInfo, in QAPI member order."""
    info: dict[str, Any] = {
        "id": entry.id,
        "name": entry.name,
        "vm-state-size": entry.vm_state_size,
        "date-sec": entry.date_sec,
        "date-nsec": entry.date_nsec,
        "vm-clock-sec": entry.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": entry.vm_clock_nsec % 1_000_000_000,
    }
    if entry.icount is not None:
        info["icount"] = entry.icount
    return info


@command("blockdev-snapshot-delete-internal-sync")
def blockdev_snapshot_delete_internal_sync(
    ctx: CommandContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Delete an internal snapshot by id and/or name; returns what it was."""
    device = str(args["device"])
    ident = args.get("id")
    name = args.get("name")
    daemon = ctx.daemon
    with daemon.graph_transaction("blockdev-snapshot-delete-internal-sync", args) as tran:
        node = _root(daemon.graph, device)
        if ident is None and name is None:
            raise GenericError("Name or id must be provided")
        _blocked(node, "internal-snapshot-delete", device)
        target, state = _snapshot_list(node)
        found = next(
            (
                sn
                for sn in state.snapshots
                if (ident is None or sn.id == ident) and (name is None or sn.name == name)
            ),
            None,
        )
        if found is None:
            raise GenericError(
                f"Snapshot with id '{'null' if ident is None else ident}' and name "
                f"'{'null' if name is None else name}' does not exist on device '{device}'"
            )
        _refuse_exported(target, found.id, device)
        if target.read_only:
            # QEMU's first write (the new table's allocation) fails with EPERM.
            raise GenericError(
                f"Failed to remove snapshot from snapshot list: {os.strerror(errno.EPERM)}"
            )
        host = _journal_or_error(tran, target)
        discards = _snapshot_discards(tran, target, host)
        try:
            entry = delete_snapshot(host, ident, name, discards=discards)
        except (Qcow2Error, OSError) as err:
            code = getattr(err, "errno", None) or errno.EIO
            raise GenericError(f"Failed to remove snapshot from snapshot list: "
                               f"{os.strerror(code)}") from err  # fmt: skip
        finally:
            mark_metadata_writes(_image_file(target), host.io)
        _refresh(tran, target, host)
    return _snapshot_info(entry)


def _snapshot_discards(tran: Transaction, target: Node, host: JournalFile) -> FreedClusters | None:
    """Where the clusters a snapshot operation frees go (QCOW2_DISCARD_SNAPSHOT):
    discarded in the file once the transaction commits (an abort puts the
    bytes back)."""
    if DiscardType.SNAPSHOT not in passed_types(target):
        return None
    state = target.state
    assert isinstance(state, Qcow2State)
    discards = FreedClusters(
        host.io.fd, state.header.cluster_bits, passed_types(target), DiscardType.SNAPSHOT
    )
    image = _image_file(target)
    if image is not None:
        discards.on_discard = lambda offset, length: mark_discard(image, offset, length)
    tran.on_commit(discards.process)
    return discards


def _journal_or_error(tran: Transaction, target: Node) -> JournalFile:
    try:
        return _journal(tran, target)
    except SnapshotFailed as err:
        what = "remove snapshot from" if err.errno == errno.EBUSY else "get a"
        raise GenericError(f"Failed to {what} snapshot list: {os.strerror(err.errno)}") from err
