"""The block graph's objects: nodes, edges and the non-node parents of edges.

Lives here: ``Node`` (a BlockDriverState), ``Edge`` (a BdrvChild), the parent
kinds (``ParentKind``) and the two non-node parents, ``BlockBackend`` and
``Job``, with the descriptions QEMU uses for them in messages.

Rules (why these classes are almost behaviour-free):

* Every field here is changed only by a transaction action
  (``qmpgraph.transactions.actions``), so that every change has an undo record.
* ``Node.file`` and ``Node.backing`` are read-only properties.  The only code
  that assigns the underlying slots is ``qmpgraph.graph.attach`` (QEMU 7.2's
  ``child_of_bds`` attach/detach callbacks), which derives them from the
  edge's role.  A test greps the package to keep it that way.
* ``children`` and ``parents`` are newest first (QEMU inserts at the head).

What does not live here: the graph container and lookups (``graph.py``), the
permission rules, and anything that mutates.
"""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING, Any

from qmpgraph.graph.perms import OpenFlag, Role

if TYPE_CHECKING:
    from qmpgraph.drivers.base import Driver


class ParentKind(enum.Enum):
    """BdrvChildClass: who owns an edge."""

    NODE = "child_of_bds"
    BLOCK_BACKEND = "child_root"
    JOB = "child_job"


class BlockBackend:
    """A BlockBackend: the parent of ``root`` edges (exports, devices)."""

    __slots__ = ("device", "name", "root")

    kind = ParentKind.BLOCK_BACKEND

    def __init__(self, name: str = "", device: str | None = None) -> None:
        self.name = name
        self.device = device
        self.root: Edge | None = None

    def description(self) -> str:
        """How conflict messages name this parent."""
        if self.name:
            return f"block device '{self.name}'"
        if self.device:
            return f"block device '{self.device}'"
        return "an unnamed block device"

    def label(self) -> str:
        """A stable label for digests and logs."""
        return f"bb:{self.name or self.device or ''}"


class Job:
    """A block job as the parent of role-0 edges that stay at their node."""

    __slots__ = ("edges", "job_id", "job_type")

    kind = ParentKind.JOB

    def __init__(self, job_type: str, job_id: str) -> None:
        self.job_type = job_type
        self.job_id = job_id
        self.edges: list[Edge] = []

    def description(self) -> str:
        """How conflict messages name this parent, e.g. ``stream job 'st'``."""
        return f"{self.job_type} job '{self.job_id}'"

    def label(self) -> str:
        """A stable label for digests and logs."""
        return f"job:{self.job_id}"


_edge_ids = itertools.count(1)
_node_ids = itertools.count(1)


class Edge:
    """A BdrvChild: a named, role-carrying link from a parent to a child node."""

    __slots__ = ("child", "frozen", "id", "name", "parent", "perm", "role", "shared")

    def __init__(
        self,
        name: str,
        parent: Node | BlockBackend | Job,
        role: int,
        perm: int,
        shared: int,
    ) -> None:
        self.id = next(_edge_ids)
        self.name = name
        self.parent = parent
        self.role = Role(role)
        self.perm = perm
        self.shared = shared
        self.child: Node | None = None
        self.frozen = False

    @property
    def kind(self) -> ParentKind:
        """The parent kind (QEMU's ``klass``)."""
        return self.parent.kind

    @property
    def stay_at_node(self) -> bool:
        """Job edges are never moved by node replacement."""
        return self.parent.kind is ParentKind.JOB

    def parent_description(self) -> str:
        """The parent as conflict messages describe it."""
        return self.parent.description()

    def __repr__(self) -> str:
        child = self.child.node_name if self.child else None
        return f"<Edge {self.id} {self.parent.label()} -{self.name}-> {child}>"


class Node:
    """A BlockDriverState: the control-plane fields QEMU's graph code uses."""

    __slots__ = (
        "_backing",
        "_file",
        "backing_blocker",
        "children",
        "detect_zeroes",
        "driver",
        "explicit_options",
        "force_share",
        "id",
        "implicit",
        "inherits_from",
        "monitor_owned",
        "node_name",
        "op_blockers",
        "open_flags",
        "options",
        "parents",
        "refcnt",
        "state",
    )

    kind = ParentKind.NODE

    def __init__(self, node_name: str, driver: Driver | None, open_flags: int = 0) -> None:
        self.id = next(_node_ids)
        self.node_name = node_name
        self.driver = driver
        self.open_flags = open_flags
        self.options: dict[str, Any] = {}
        self.explicit_options: dict[str, Any] = {}
        self.children: list[Edge] = []
        self.parents: list[Edge] = []
        self._file: Edge | None = None
        self._backing: Edge | None = None
        self.inherits_from: Node | None = None
        self.refcnt = 1
        self.monitor_owned = False
        self.force_share = False
        self.detect_zeroes = "off"
        self.implicit = False
        self.backing_blocker: str | None = None
        self.op_blockers: dict[str, list[str]] = {}
        # Driver-private state (QEMU's ``opaque``): header fields, sizes, ...
        self.state: Any = None

    @property
    def file(self) -> Edge | None:
        """The PRIMARY (or non-backing filtered) child edge; derived on attach."""
        return self._file

    @property
    def backing(self) -> Edge | None:
        """The COW (or backing-filtered) child edge; derived on attach."""
        return self._backing

    @property
    def read_only(self) -> bool:
        """A node is read-only exactly when RDWR is not set."""
        return not self.open_flags & OpenFlag.RDWR

    @property
    def format_name(self) -> str | None:
        """The driver's name, or None for a node without a medium."""
        return self.driver.format_name if self.driver is not None else None

    def description(self) -> str:
        """How conflict messages name this node as a parent."""
        return f"node '{self.node_name}'"

    def label(self) -> str:
        """A stable label for digests and logs."""
        return f"node:{self.node_name}"

    def __repr__(self) -> str:
        return f"<Node {self.node_name} {self.format_name}>"
