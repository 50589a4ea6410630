"""``bdrv_refresh_filename``: the ``file`` and ``filename`` the queries report.

A node's exact filename comes from a protocol child when the user set no
strong option and did not override the backing file; otherwise its filename
is ``json:`` plus the node's full open options (driver, ``filename``, the
driver's strong options, the children's full options, ``"backing": null``
for a suppressed backing file), truncated as QEMU's 4096-byte buffer
truncates it.

The backing file counts as overridden (``bdrv_backing_overridden``) when the
node's ``auto_backing_file`` (the header's name, or the filename of the node
opened implicitly from it, or change-backing-file's name) differs from the
backing child's current filename, or, without a backing child, when it is
not empty.

Lives here: ``Names`` and ``Filenames`` (a memo table for one query).  What
does not: image infos (``image_info.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.perms import OpenFlag, Role
from qmpgraph.protocol.qjson import dumps

PATH_MAX = 4096  # sizeof(bs->filename): QEMU truncates longer names
# Drivers whose node is a protocol (bdrv_file_open): their exact filename can
# stand for a format node above them.
PROTOCOLS = frozenset({"file", "null-co", "null-aio", "blkdebug", "blkverify"})
# BlockDriver.strong_runtime_opts in 7.2 of the drivers that do not declare
# theirs (``Driver.strong_runtime_options``) yet.
_STRONG = {
    "null-co": ("size", "read-zeroes"),
    "null-aio": ("size", "read-zeroes"),
    "raw": ("offset", "size"),
    "throttle": ("throttle-group",),
    "copy-before-write": ("bitmap", "on-cbw-error", "cbw-timeout"),
    "luks": ("key-secret",),
}
# Plain ints: IntFlag arithmetic costs microseconds per use, times every node.
_NO_IO = int(OpenFlag.NO_IO)
_PRIMARY = int(Role.PRIMARY)


@dataclass(frozen=True, slots=True)
class Names:
    """A node's refreshed names: ``exact_filename``, ``filename``, full options."""

    exact: str
    filename: str
    full_options: dict[str, Any]


def primary_child(node: Node) -> Node | None:
    """bdrv_primary_bs: the child of the PRIMARY edge."""
    for edge in node.children:
        if int(edge.role) & _PRIMARY:
            return edge.child
    return None


def auto_backing_file(node: Node) -> str:
    """bs->auto_backing_file ("" for drivers without backing files)."""
    state = node.state
    return state.auto_backing_file if isinstance(state, Qcow2State) else ""


def _child_edges(node: Node) -> list[Edge]:
    return [e for e in node.children if e.child is not None]


class Filenames:
    """Refreshed names by node id, for one query (children before parents)."""

    def __init__(self) -> None:
        self.names: dict[int, Names] = {}

    def refresh(self, node: Node) -> Names:
        """The node's names, computing its subtree first without recursion."""
        done = self.names.get(node.id)
        if done is not None:
            return done
        stack = [node]
        while stack:
            cur = stack[-1]
            pending = [
                e.child
                for e in _child_edges(cur)
                if e.child is not None and e.child.id not in self.names
            ]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if cur.id not in self.names:
                self.names[cur.id] = self._refresh_one(cur)
        return self.names[node.id]

    def _backing_overridden(self, node: Node) -> bool:
        """bdrv_backing_overridden (see the module docstring)."""
        auto = auto_backing_file(node)
        edge = node.backing
        if edge is not None and edge.child is not None:
            return auto != self.names[edge.child.id].filename
        return bool(auto)

    def _refresh_one(self, node: Node) -> Names:
        drv = node.format_name or ""
        if node.implicit and node.children:
            child = node.children[0].child
            assert child is not None
            return self.names[child.id]
        overridden = self._backing_overridden(node)
        if int(node.open_flags) & _NO_IO:
            overridden = False
        opts: dict[str, Any] = {"driver": drv}
        if "filename" in node.options:
            opts["filename"] = node.options["filename"]
        driver = node.driver
        strong = False
        if driver is not None:
            found = driver.strong_options(node)
            opts.update(found)
            strong = bool(found)
        for key in _STRONG.get(drv, ()):
            if key in node.options:
                opts[key] = node.options[key]
                strong = True
        generate_json = strong or overridden
        gather = driver.gather_child_options if driver is not None else None
        if gather is not None:
            opts.update(gather(node, lambda child: self.names[child.id].full_options))
        for edge in _child_edges(node) if gather is None else ():
            if edge is node.backing and not overridden:
                continue
            assert edge.child is not None
            opts[edge.name] = self.names[edge.child.id].full_options
        if overridden and node.backing is None and gather is None:
            opts["backing"] = None
        exact = ""
        own_exact = driver.refresh_exact_filename if driver is not None else None
        if own_exact is not None:
            # The driver's .bdrv_refresh_filename (blkdebug:, blkverify:).
            exact = own_exact(node, lambda child: self.names[child.id].exact, opts)
        elif drv == "file":
            state = node.state
            exact = state.filename if isinstance(state, FileState) else ""
        elif drv in ("null-co", "null-aio"):
            if all(k in ("filename", "driver", "latency-ns") for k in opts):
                exact = f"{drv}://"
        else:
            primary = primary_child(node)
            if primary is not None and not generate_json:
                child_names = self.names[primary.id]
                is_filter = driver is not None and driver.is_filter
                if child_names.exact and primary.format_name in PROTOCOLS and not is_filter:
                    exact = child_names.exact
        exact = exact[: PATH_MAX - 1]
        filename = exact or ("json:" + dumps(opts))[: PATH_MAX - 1]
        return Names(exact, filename, opts)
