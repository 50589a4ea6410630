"""The ``snapshot-access`` driver: reads the snapshot a copy-before-write node keeps.

Not a filter: its one child ``file`` (the cbw node) is DATA|PRIMARY; it takes
nothing on it and shares everything.  Not reopenable.

qmpgraph's downstream option ``__org.qmpgraph_snapshot`` (see
``qmpgraph/schema/data/downstream.json``) is the step QEMU's snapshot-access
commit message names and QEMU has not taken: over a qcow2 node, it selects
one of the image's internal snapshots, by id first, then by name (as
``qemu-img convert -l`` does).  The node then has the snapshot's own virtual
size, and its reads and block status go through the snapshot's L1 table
(``qmpgraph.io.cbw_hook``); writes fail as snapshot-access writes do, and
discard is not supported.  The snapshot is resolved to its id at open; while
the node exists, ``blockdev-snapshot-delete-internal-sync`` refuses to delete
it.  Without the option nothing changes: QEMU 7.2's behaviour (over a qcow2
node every read fails with ENOTSUP).

Its exact filename is its ``file`` child's filename
(snapshot_access_refresh_filename).  No data path lives here.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import ChildSpec, OpenContext, node_size
from qmpgraph.drivers.copy_before_write import file_child_filename
from qmpgraph.drivers.filter_base import TakesNothing
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role

_ROLE = Role.DATA | Role.PRIMARY
SNAPSHOT_OPTION = "__org.qmpgraph_snapshot"


@dataclass(frozen=True, slots=True)
class InternalSnapshotState:
    """A snapshot-access node exporting a qcow2 internal snapshot."""

    id: str
    name: str
    size: int  # the snapshot's virtual size, whole sectors


def _choose(child: Node, wanted: str) -> InternalSnapshotState:
    """The snapshot of ``child`` (a qcow2 node) with id, else name, ``wanted``."""
    state = child.state
    if child.format_name != "qcow2" or not isinstance(state, Qcow2State):
        raise GenericError(
            f"'{SNAPSHOT_OPTION}' needs a qcow2 node as 'file', not '{child.format_name}'"
        )
    if state.header.has_data_file:
        raise GenericError(f"Failed to get a snapshot list: {os.strerror(errno.ENOTSUP)}")
    snaps = state.snapshots
    found = next((s for s in snaps if s.id == wanted), None)
    found = found or next((s for s in snaps if s.name == wanted), None)
    if found is None:
        raise GenericError(f"Can't find snapshot '{wanted}' on node '{child.node_name}'")
    size = found.disk_size if found.disk_size is not None else state.size
    return InternalSnapshotState(found.id, found.name, size // 512 * 512)


class SnapshotAccess(TakesNothing):
    """snapshot-access: reads a cbw node's snapshot (or a qcow2 internal one); not a filter."""

    format_name = "snapshot-access"
    supports_reopen = False
    options = frozenset({SNAPSHOT_OPTION})
    children = (ChildSpec("file", _ROLE),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file`` with DATA|PRIMARY; with the option, pick the snapshot."""
        self.reject_unknown(options)
        edge = ctx.open_child(node, options, "file", _ROLE)
        wanted = options.get(SNAPSHOT_OPTION)
        if wanted is not None and edge is not None and edge.child is not None:
            node.state = _choose(edge.child, str(wanted))

    def refresh_exact_filename(
        self, node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
    ) -> str:
        """snapshot_access_refresh_filename: the ``file`` child's filename."""
        return file_child_filename(node, exact, full_options)

    def size(self, node: Node) -> int:
        """The chosen snapshot's size, else the ``file`` child's size."""
        if isinstance(node.state, InternalSnapshotState):
            return node.state.size
        edge = node.file
        return node_size(edge.child if edge is not None else None)


def exported_snapshot(node: Node) -> InternalSnapshotState | None:
    """The internal snapshot a snapshot-access node exports, if it has the option."""
    state = node.state
    return state if isinstance(state, InternalSnapshotState) else None


DRIVERS = (SnapshotAccess(),)
