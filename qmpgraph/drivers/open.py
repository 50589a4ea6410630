"""The generic open path: a node tree from blockdev-add options, in one transaction.

``open_node_tree(graph, options, tran)`` opens the top node and every child
given inline, by reference or implied by an image header, the way QEMU 7.2's
``bdrv_open_inherit`` does:

* the top level needs ``node-name`` ("'node-name' must be specified for the
  root node"), checked before anything is opened;
* children opened by a parent inherit flags and options (section 1.3);
* file-first rule: a non-protocol driver whose options contain ``file`` (inline
  or a reference) opens that child (and names it) before its own name is
  assigned; the driver then attaches it by reference;
* checks in bdrv_open_common's order: force-share, discard, detect-zeroes,
  node name (validity, BB clash, duplicate, length), then the driver's open;
* backing (drivers that support it): ``null`` sets NO_BACKING, a string is a
  reference, a dict is inline, no key opens the header's backing file
  (auto-named, read-only, owned by the overlay); errors get the prefix
  "Could not open backing file: ";
* references: a child given by name gains one reference; an inline child ends
  with only its edge's reference; the top node's creator reference becomes
  the monitor's.

Any error propagates; the caller aborts the transaction and nothing survives
(the ``#block`` counter is not rolled back, as in QEMU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers import get_driver
from qmpgraph.errors import GenericError
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.names import check_node_name
from qmpgraph.graph.perms import OpenFlag, Role
from qmpgraph.protocol.qjson import qdict_order
from qmpgraph.transactions.actions import (
    add_node,
    ref_node,
    set_inherits_from,
    set_monitor_owned,
    set_options,
    set_runtime,
    unref_node,
)
from qmpgraph.transactions.composite import attach_child, set_backing
from qmpgraph.transactions.engine import Transaction

_GENERIC = ("node-name", "driver", "read-only", "auto-read-only", "detect-zeroes", "discard",
            "force-share", "cache.direct", "cache.no-flush")  # fmt: skip
_QCOW2_MAGIC = b"QFI\xfb"
_PATH_MAX = 4096  # sizeof(bs->filename)


@dataclass(frozen=True, slots=True)
class Inheritance:
    """What a child opened by a parent inherits: the parent, its role, flags, options."""

    parent: Node
    role: Role
    flags: int
    options: dict[str, Any]
    parent_is_format: bool


def _flatten_generic(options: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in options.items() if k != "cache"}
    cache = options.get("cache")
    if isinstance(cache, dict):
        for key in ("direct", "no-flush"):
            if key in cache:
                out[f"cache.{key}"] = cache[key]
    return out


def inherit_options(opts: dict[str, Any], inh: Inheritance) -> int:
    """Apply section 1.3 to ``opts`` (in place); return the inherited flags."""
    role = inh.role
    flags = inh.flags
    if not inh.parent_is_format and role & Role.DATA and not role & (Role.METADATA | Role.FILTERED):
        flags &= ~OpenFlag.PROTOCOL
    if inh.parent_is_format and (not role & Role.COW or role & Role.METADATA):
        flags |= OpenFlag.PROTOCOL
    for key in ("cache.direct", "cache.no-flush", "force-share"):
        if key not in opts and key in inh.options:
            opts[key] = inh.options[key]
    if role & Role.COW:
        opts.setdefault("read-only", True)
        opts.setdefault("auto-read-only", False)
    else:
        for key in ("read-only", "auto-read-only"):
            if key not in opts and key in inh.options:
                opts[key] = inh.options[key]
    opts.setdefault("discard", "unmap")
    flags &= ~(OpenFlag.SNAPSHOT | OpenFlag.NO_BACKING | OpenFlag.COPY_ON_READ)
    if role & Role.METADATA:
        flags &= ~OpenFlag.NO_IO
    if role & Role.COW:
        flags &= ~OpenFlag.TEMPORARY
    return int(flags)


def _flags_from_options(flags: int, opts: dict[str, Any]) -> int:
    keep = ~(OpenFlag.RDWR | OpenFlag.ALLOW_RDWR | OpenFlag.AUTO_RDONLY)
    flags &= keep & ~(OpenFlag.NOCACHE | OpenFlag.NO_FLUSH)
    if not opts.get("read-only", False):
        flags |= OpenFlag.RDWR | OpenFlag.ALLOW_RDWR
    if opts.get("auto-read-only", False):
        flags |= OpenFlag.AUTO_RDONLY
    if opts.get("cache.direct", False):
        flags |= OpenFlag.NOCACHE
    if opts.get("cache.no-flush", False):
        flags |= OpenFlag.NO_FLUSH
    return int(flags)


class TreeOpenContext:
    """The ``OpenContext`` handed to drivers: children inside the same transaction.

    Also what ``open_one`` takes: commands that open a node outside
    blockdev-add (snapshot overlays) make one for their transaction.
    """

    def __init__(self, graph: BlockGraph, tran: Transaction) -> None:
        self.graph = graph
        self.tran = tran

    def open_child(
        self,
        parent: Node,
        options: dict[str, Any],
        name: str,
        role: int,
        *,
        required: bool = True,
        implicit: dict[str, Any] | None = None,
    ) -> Edge | None:
        """Open (inline), look up (string) or skip (absent) child ``name``; attach it."""
        value = options.get(name, implicit)
        if value is None:
            if required:
                raise GenericError(f'A block device must be specified for "{name}"')
            return None
        child = self.resolve(parent, value, Role(role))
        edge = attach_child(self.tran, self.graph, parent, child, name, role=role)
        unref_node(self.tran, self.graph, child)  # the edge now owns it
        return edge

    def resolve(self, parent: Node, value: Any, role: Role) -> Node:
        """A referenced node (+1 reference) or a freshly opened inline one (refcount 1)."""
        if isinstance(value, str):
            node = self.graph.lookup(value)
            if node is None:
                bb = self.graph.backend_by_name(value)
                node = bb.root.child if bb is not None and bb.root is not None else None
            if node is None:
                raise GenericError(f"Cannot find device='{value}' nor node-name='{value}'")
            ref_node(self.tran, node)
            return node
        drv = parent.driver
        inh = Inheritance(
            parent, role, parent.open_flags, parent.options, drv is not None and drv.is_format
        )
        return open_one(self, dict(value), inh)


def _probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return "raw"
    return "qcow2" if head == _QCOW2_MAGIC else "raw"


def protocol_prefix(filename: str) -> str | None:
    """path_has_protocol: the ``proto`` of ``proto:...`` when ':' comes before any '/'."""
    cut = len(filename)
    for sep in ":/":
        at = filename.find(sep)
        if at >= 0:
            cut = min(cut, at)
    return filename[:cut] if cut < len(filename) and filename[cut] == ":" else None


def _exact_filename(node: Node) -> str:
    """A protocol node's exact filename (what bdrv_dirname falls back to)."""
    drv = node.driver
    if drv is None:
        return ""
    if drv.format_name in ("null-co", "null-aio"):
        strong = any(k in node.options for k in ("size", "read-zeroes"))
        return "" if strong else drv.filename(node)
    return drv.filename(node) if drv.protocol else ""


def dirname(node: Node) -> str:
    """bdrv_dirname: the directory (with its '/') of the primary chain's protocol node."""
    cur = node
    while True:
        primary = next((e.child for e in cur.children if e.role & Role.PRIMARY), None)
        if primary is None:
            break
        cur = primary
    exact = _exact_filename(cur)
    if not exact:
        assert cur.driver is not None
        raise GenericError(f"Cannot generate a base directory for {cur.driver.format_name} nodes")
    # path_combine(exact, ""): keep everything up to the last '/', or the protocol prefix.
    proto = protocol_prefix(exact)
    keep = len(proto) + 1 if proto is not None else 0
    return exact[: max(keep, exact.rfind("/") + 1)]


def _protocol_options(filename: str) -> dict[str, Any]:
    """The protocol node that bdrv_find_protocol picks for ``filename``."""
    proto = protocol_prefix(filename)
    if proto is None:
        return {"driver": "file", "filename": filename}
    if proto == "file":
        return {"driver": "file", "filename": filename[len("file:") :]}
    if proto in ("null-co", "null-aio"):
        if filename != f"{proto}://":
            raise GenericError(f"The only allowed filename for this driver is '{proto}://'")
        return {"driver": proto}
    raise GenericError(f"Unknown protocol '{proto}'")


def _open_backing(ctx: TreeOpenContext, node: Node, options: dict[str, Any]) -> None:
    drv = node.driver
    assert drv is not None
    if "backing" in options:
        value = options["backing"]
        if value is None or value == "":
            return  # NO_BACKING was set before the driver opened
    else:
        header = getattr(drv, "header_backing", None)
        found = header(node) if header is not None else None
        if found is None:
            return
        filename, fmt = found
        if not filename.startswith("/") and protocol_prefix(filename) is None:
            # bdrv_get_full_backing_filename: relative to the image's directory.
            filename = dirname(node) + filename
        value = None
    implicit = value is None
    try:
        if value is None:
            file_opts = _protocol_options(filename)
            if fmt is None:
                fmt = _probe_format(filename) if file_opts["driver"] == "file" else "raw"
            value = {"driver": fmt, "file": file_opts}
        child = ctx.resolve(node, value, Role.COW)
        set_backing(ctx.tran, ctx.graph, node, child)
    except GenericError as err:
        raise GenericError(f"Could not open backing file: {err.desc}") from err
    unref_node(ctx.tran, ctx.graph, child)
    record = getattr(drv, "set_auto_backing_file", None)
    if implicit and record is not None:
        # bdrv_open_backing_file: the implicitly opened node's filename becomes
        # auto_backing_file, so filenames count this backing as not overridden.
        record(node, implicit_filename(child))


def implicit_filename(node: Node) -> str:
    """The refreshed filename of a node just opened from an image header.

    Such a node has no strong options and an implicit (or no) backing of its
    own, so bdrv_refresh_filename gives its primary chain's protocol filename.
    """
    cur = node
    while True:
        primary = next((e.child for e in cur.children if e.role & Role.PRIMARY), None)
        if primary is None:
            break
        cur = primary
    return _exact_filename(cur)[: _PATH_MAX - 1]


# BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB.
_MAX_LENGTH = ((1 << 63) - 1) // (1 << 30) * (1 << 30)


def _check_length(node: Node) -> None:
    """bdrv_open_driver's refresh of the sector count: sizes past QEMU's limit fail."""
    drv = node.driver
    assert drv is not None
    size = drv.size(node)
    if (size + 511) // 512 * 512 > _MAX_LENGTH:
        raise GenericError("Could not refresh total sector count: File too large")


def _empty_options(options: dict[str, Any]) -> list[str]:
    """Keys whose value is an empty object or array, in QDict order.

    QEMU flattens a node's options into dotted keys before the driver and the
    generic code take theirs; an empty object or array has nothing to
    flatten and stays behind under its own key, which nobody takes: once the
    node is open it is the leftover option QEMU refuses (``"cache": {}``,
    blkdebug's ``"inject-error": []``).
    """
    return qdict_order([k for k, v in options.items() if v in ({}, [])])


def open_one(
    ctx: TreeOpenContext,
    options: dict[str, Any],
    inh: Inheritance | None,
    empty: list[str] | None = None,
) -> Node:
    """Open one node (and, through its driver, its children); refcount 1 on return.

    ``empty``: the keys left over after flattening (default: computed from
    ``options``; see ``_empty_options``).
    """
    tran, graph = ctx.tran, ctx.graph
    if empty is None:
        empty = _empty_options(options)
    opts = _flatten_generic(options)
    explicit = dict(opts)
    flags = inherit_options(opts, inh) if inh is not None else 0
    flags = _flags_from_options(flags, opts)
    drv = get_driver(str(opts["driver"]))
    if "backing" in opts and (opts["backing"] is None or opts["backing"] == ""):
        flags |= OpenFlag.NO_BACKING
    node = Node("", drv, flags)
    if inh is not None:
        node.inherits_from = inh.parent
    node.options = opts
    node.explicit_options = explicit
    # File-first: a format's inline ``file`` is opened (and named) before the parent.
    driver_opts = {k: v for k, v in opts.items() if k not in _GENERIC}
    probe: Node | None = None
    if not drv.protocol and isinstance(driver_opts.get("file"), (dict, str)):
        probe = ctx.resolve(node, driver_opts["file"], Role.IMAGE)
        driver_opts["file"] = probe.node_name
    force_share = bool(opts.get("force-share", False))
    if force_share and flags & OpenFlag.RDWR:
        raise GenericError("force-share=on can only be used with read-only images")
    discard = opts.get("discard", "ignore")
    if discard in ("unmap", "on"):
        flags |= OpenFlag.UNMAP
    elif discard in ("ignore", "off"):
        flags &= ~OpenFlag.UNMAP
    else:
        raise GenericError("Invalid discard option")
    detect_zeroes = str(opts.get("detect-zeroes", "off"))
    if detect_zeroes == "unmap" and not flags & OpenFlag.UNMAP:
        raise GenericError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    name = opts.get("node-name")
    if name is None:
        name = graph.names.generate()
    else:
        check_node_name(
            str(name),
            is_node_name=graph.__contains__,
            is_backend_name=lambda n: graph.backend_by_name(n) is not None,
        )
    node.node_name = str(name)
    node.open_flags = flags
    add_node(tran, graph, node)
    if inh is not None:
        node.inherits_from = None
        set_inherits_from(tran, node, inh.parent)
    set_runtime(tran, node, force_share=force_share, detect_zeroes=detect_zeroes)
    drv.open(ctx, node, driver_opts)
    _check_length(node)
    if probe is not None:
        unref_node(tran, graph, probe)  # the driver's edge holds it now
    if drv.supports_backing and not node.open_flags & OpenFlag.NO_BACKING:
        _open_backing(ctx, node, driver_opts)
    children = {c.name for c in drv.children} | {"backing"}
    leftover = [k for k in empty if k not in children]
    if leftover:
        raise drv.leftover_option(leftover[0])
    set_options(
        tran,
        node,
        {k: v for k, v in node.options.items() if k not in children},
        {k: v for k, v in explicit.items() if k not in children},
    )
    return node


def open_node_tree(graph: BlockGraph, options: dict[str, Any], tran: Transaction) -> Node:
    """blockdev-add's open: the new top node, monitor-owned, all in ``tran``."""
    if "node-name" not in options:
        raise GenericError("'node-name' must be specified for the root node")
    opts = dict(options)
    empty = _empty_options(options)
    cache = dict(opts.get("cache") or {})
    cache.setdefault("direct", False)
    cache.setdefault("no-flush", False)
    opts["cache"] = cache
    opts.setdefault("read-only", False)
    ctx = TreeOpenContext(graph, tran)
    node = open_one(ctx, opts, None, empty)
    set_monitor_owned(tran, node, True)
    return node
