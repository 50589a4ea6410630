"""Reopening several nodes at once, atomically (QEMU 7.2's bdrv_reopen_multiple).

Lives here: ``ReopenRequest`` (one queue entry, already merged by the caller:
the node, its future flags, its new flattened options and explicit options,
whether ``backing`` was left out) and ``reopen_multiple``, which runs, in the
caller's transaction:

1. **prepare**, entry by entry in queue order (section 5.3): the generic
   options (``discard``, ``detect-zeroes``, the read-only change), the
   driver's reopen support, options that cannot be reset to their default, the
   driver's own reopen check (``Driver.reopen_prepare``), a missing
   ``backing``, the ``backing`` then ``file`` switch (a real graph change, so
   later entries see it), and finally "every remaining option is unchanged";
2. one permission refresh over every queued node plus its old backing and
   old file, sorted as QEMU sorts them, with the queue's *future* flags;
3. **commit** in reverse queue order (children before parents): flags,
   options without child references, detect-zeroes and the driver's staged
   state (then ``Driver.reopen_commit``, e.g. throttle's group membership),
   each an undoable action, so a failure anywhere aborts the whole list.

A request built without ``options`` (``options=None``) is a graph-only
request: only its ``backing``/``file`` values and flags apply (tests and
internal callers use that).

What does not live here: building the queue (option merging, inheritance,
which children are reopened along with their parent): that is the
``blockdev-reopen`` command (``qmpgraph.commands.reopen``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph, recursive_has_child, skip_implicit_filters
from qmpgraph.graph.model import BlockBackend, Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.protocol.qjson import qdict_order
from qmpgraph.transactions.actions import set_open_flags, set_options, set_runtime
from qmpgraph.transactions.composite import set_file_or_backing_noperm
from qmpgraph.transactions.engine import Transaction
from qmpgraph.transactions.refresh import refresh_subtrees


class _Unchanged(enum.Enum):
    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED
ChildValue = str | None | _Unchanged

# bdrv_reset_options_allowed: generic options that may always be left out.
COMMON_RESETTABLE = frozenset(
    {"node-name", "discard", "cache.direct", "cache.no-flush", "read-only",
     "auto-read-only", "detect-zeroes"}
)  # fmt: skip
# Generic options bdrv_reopen_prepare consumes; node-name, driver and
# force-share go back into the dict (as QemuOpts strings) to be compared.
_CONSUMED = ("cache.direct", "cache.no-flush", "read-only", "auto-read-only")
_BACK_AS_STRINGS = ("node-name", "driver", "force-share")
_DETECT_ZEROES = ("off", "on", "unmap")


def qemu_opt_string(value: Any) -> Any:
    """The string a QemuOpts absorb-then-to-qdict round trip leaves for ``value``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    return value


def qobject_equal(a: Any, b: Any) -> bool:
    """qobject_is_equal: values of different QObject types never compare equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(qobject_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(qobject_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """qdict_flatten: nested dicts and lists become dotted keys (empty ones stay)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = prefix + key
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value:
            out.update(flatten({str(i): v for i, v in enumerate(value)}, name + "."))
        else:
            out[name] = value
    return out


def opt_bool(value: Any) -> bool:
    """A boolean option as QemuOpts reads it (typed, or the strings on/off)."""
    if isinstance(value, str):
        return value in ("on", "yes", "true", "y")
    return bool(value)


def _device_or_node_name(node: Node) -> str:
    for edge in node.parents:
        parent = edge.parent
        if isinstance(parent, BlockBackend) and parent.name:
            return parent.name
    return node.node_name


@dataclass(slots=True)
class ReopenRequest:
    """One merged reopen-queue entry."""

    node: Node
    flags: int
    options: dict[str, Any] | None = None
    explicit_options: dict[str, Any] | None = None
    backing: ChildValue = UNCHANGED
    file: ChildValue = UNCHANGED
    backing_missing: bool = False
    old_backing: Node | None = field(default=None, init=False)
    old_file: Node | None = field(default=None, init=False)
    detect_zeroes: str = field(default="off", init=False)
    state: Any = field(default=None, init=False)


def _parse_child(
    tran: Transaction, graph: BlockGraph, req: ReopenRequest, is_backing: bool, value: ChildValue
) -> None:
    """bdrv_reopen_parse_file_or_backing: switch ``backing`` or ``file`` to ``value``."""
    node = req.node
    if value is UNCHANGED:
        return
    child_name = "backing" if is_backing else "file"
    edge = node.backing if is_backing else node.file
    old = edge.child if edge is not None else None
    new: Node | None
    if value is None:
        assert is_backing, "the schema gives 'file' no null"
        new = None
    else:
        assert isinstance(value, str)
        new = graph.lookup(value)
        if new is None:
            raise GenericError(f"Cannot find device='' nor node-name='{value}'")
        if recursive_has_child(new, node):
            raise GenericError(
                f"Making '{value}' a {child_name} child of '{node.node_name}' would create a cycle"
            )
    if old is new:
        return
    if old is not None:
        if skip_implicit_filters(old) is new:
            return
        if old.implicit:
            raise GenericError(f"Cannot replace implicit {child_name} child of {node.node_name}")
    drv = node.driver
    assert drv is not None
    if drv.is_filter and old is None:
        raise GenericError(
            f"'{node.node_name}' is a {drv.format_name} filter node that does not "
            f"support a {child_name} child"
        )
    if is_backing:
        req.old_backing = old
    else:
        req.old_file = old
    set_file_or_backing_noperm(tran, graph, node, new, is_backing)


def _generic_options(req: ReopenRequest, opts: dict[str, Any]) -> None:
    """Absorb the generic options: discard, detect-zeroes, the read-only change."""
    node = req.node
    for key in _CONSUMED:
        opts.pop(key, None)
    discard = opts.pop("discard", None)
    if discard is not None:
        if discard in ("ignore", "off"):
            req.flags &= ~OpenFlag.UNMAP
        elif discard in ("unmap", "on"):
            req.flags |= OpenFlag.UNMAP
        else:
            raise GenericError("Invalid discard option")
    detect = opts.pop("detect-zeroes", "off")
    detect = detect if detect in _DETECT_ZEROES else "off"
    if detect == "unmap" and not req.flags & OpenFlag.UNMAP:
        raise GenericError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    req.detect_zeroes = str(detect)
    for key in _BACK_AS_STRINGS:
        if key in opts:
            opts[key] = qemu_opt_string(opts[key])
    read_only = not req.flags & OpenFlag.RDWR
    if read_only and not node.read_only and node.open_flags & OpenFlag.COPY_ON_READ:
        raise GenericError(
            f"Can't set node '{_device_or_node_name(node)}' to r/o with copy-on-read enabled"
        )


def _header_backing(node: Node) -> bool:
    drv = node.driver
    header = getattr(drv, "header_backing", None)
    return header is not None and header(node) is not None


def _follow_bitmaps(tran: Transaction, req: ReopenRequest) -> None:
    """qcow2's persistent bitmaps follow the access mode: stored and read-only
    in the driver's prepare of a reopen to read-only (so before the checks
    that follow it, which do not undo it), writable again after any reopen to
    read-write (qcow2_reopen_commit_post)."""
    follow = getattr(req.node.driver, "reopen_bitmaps", None)
    if follow is None:
        return
    if req.flags & OpenFlag.RDWR:
        follow(tran, req.node, read_only=False)
    elif req.node.open_flags & OpenFlag.RDWR:
        follow(tran, req.node, read_only=True)


def _prepare(tran: Transaction, graph: BlockGraph, req: ReopenRequest) -> None:
    """bdrv_reopen_prepare for one entry (section 5.3, steps 1 to 9)."""
    node = req.node
    drv = node.driver
    assert drv is not None and req.options is not None
    opts = dict(req.options)
    _generic_options(req, opts)
    if not drv.supports_reopen:
        raise GenericError(
            f"Block format '{drv.format_name}' used by node "
            f"'{_device_or_node_name(node)}' does not support reopening files"
        )
    old = flatten(node.options)
    for key in qdict_order(list(old)):
        resettable = key in COMMON_RESETTABLE or key.split(".", 1)[0] in drv.mutable_options
        if key not in req.options and not resettable:
            raise GenericError(f"Option '{key}' cannot be reset to its default value")
    req.state = drv.reopen_prepare(graph, node, opts)
    _follow_bitmaps(tran, req)
    has_backing = node.backing is not None or _header_backing(node)
    if drv.supports_backing and req.backing_missing and has_backing:
        raise GenericError(f"backing is missing for '{node.node_name}'")
    _parse_child(tran, graph, req, True, opts.pop("backing", UNCHANGED))
    value = opts.pop("file", UNCHANGED)
    # An inline ``file`` was flattened to file.* keys; only a reference switches.
    _parse_child(tran, graph, req, False, value if isinstance(value, str) else UNCHANGED)
    children = {e.name: e.child for e in node.children}
    for key in qdict_order(list(opts)):
        new = opts[key]
        if isinstance(new, str) and key in children:
            child = children[key]
            if child is not None and child.node_name == new:
                continue  # a reference to the current child changes nothing
        if key not in old or not qobject_equal(new, old[key]):
            raise GenericError(f"Cannot change the option '{key}'")


def _commit(tran: Transaction, req: ReopenRequest, flags: int) -> None:
    """bdrv_reopen_commit: install flags, options (no child references), state."""
    node = req.node
    set_open_flags(tran, node, flags)
    # The file driver switches its descriptor to the new access mode
    # (file-posix does it in its permission check with the reopen's flags).
    switch = getattr(node.driver, "reopen_access_mode", None)
    if switch is not None:
        switch(tran, node)
    if req.options is None:
        return
    drop = {e.name for e in node.children} | {"backing"}
    explicit = req.explicit_options if req.explicit_options is not None else req.options
    set_options(
        tran,
        node,
        {k: v for k, v in req.options.items() if k not in drop},
        {k: v for k, v in explicit.items() if k not in drop},
    )
    old_state = node.state
    set_runtime(tran, node, detect_zeroes=req.detect_zeroes, state=req.state)
    if req.state is not None:
        drv = node.driver
        assert drv is not None
        drv.reopen_commit(tran, node, old_state)


def reopen_multiple(tran: Transaction, graph: BlockGraph, requests: list[ReopenRequest]) -> None:
    """Prepare every entry, refresh perms with the future flags, commit in reverse."""
    queue: dict[Node, int] = {}
    for req in requests:
        queue[req.node] = req.flags
    # QEMU prepends (node, old backing, old file) per entry to its refresh
    # list, so the last entry's nodes come first.
    starts: list[Node | None] = []
    for req in requests:
        if req.options is not None:
            _prepare(tran, graph, req)
        else:
            _parse_child(tran, graph, req, True, req.backing)
            _parse_child(tran, graph, req, False, req.file)
        flags = req.flags
        if flags & OpenFlag.RDWR:
            flags |= OpenFlag.ALLOW_RDWR
        req.flags = queue[req.node] = flags
        if req.options is None:
            _follow_bitmaps(tran, req)
        starts = [req.old_file, req.old_backing, req.node, *starts]
    refresh_subtrees(tran, graph, starts, queue)
    # Children commit before parents in QEMU (reverse queue order).
    for req in reversed(requests):
        _commit(tran, req, queue[req.node])
