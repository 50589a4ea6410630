"""Block queries: ``query-named-block-nodes``, ``x-debug-query-block-graph``, ``query-block``.

Replies are built as QEMU 7.2 builds them (dicts in QAPI member order, so
that ``qjson`` reproduces QDict's iteration order, bucket collisions
included):

* filenames follow ``bdrv_refresh_filename``: a node's ``exact_filename``
  comes from a protocol child when the user set no strong option and did not
  override the backing file; otherwise the filename is ``json:`` plus the
  node's full open options (driver, ``filename``, the driver's strong
  options, children's options, ``"backing": null`` for a suppressed backing
  file), truncated as QEMU's 4096-byte buffer truncates it;
* ``image`` follows ``bdrv_query_image_info`` (virtual size in whole
  sectors, allocated size summed over data/metadata/filtered children,
  ``bdrv_get_info`` delegating through raw and filters, qcow2's
  format-specific data from the header), nested along filter-or-COW children
  as ``backing-image`` unless ``flat``.

Per-node static facts (a file's ``stat``, a qcow2 header's feature bits) are
read once per node state and cached; filenames and image infos are memoized
within one query, so the reply costs O(nodes) (plus the size of nested
chains, as in QEMU).

What does not live here: graph-changing commands (``block.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import write_threshold
from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.qcow2 import Qcow2State, Snapshot
from qmpgraph.graph.graph import BlockGraph, cow_child, filter_child, filter_or_cow_child
from qmpgraph.graph.model import BlockBackend, Edge, Job, Node
from qmpgraph.graph.perms import OpenFlag, Role, perm_qapi_names
from qmpgraph.protocol.qjson import RawJSON, dumps
from qmpgraph.transactions.engine import mutation_epoch

_PATH_MAX = 4096  # sizeof(bs->filename): QEMU truncates longer names
_SECTOR = 512
# Drivers whose node is a protocol (bdrv_file_open): their exact filename can
# stand for a format node above them.
_PROTOCOLS = frozenset({"file", "null-co", "null-aio", "blkdebug", "blkverify"})
# BlockDriver.strong_runtime_opts in 7.2 (options that change what a filename means).
_STRONG = {
    "null-co": ("size", "read-zeroes"),
    "null-aio": ("size", "read-zeroes"),
    "raw": ("offset", "size"),
    "throttle": ("throttle-group",),
    "copy-on-read": ("bottom",),
    "copy-before-write": ("bitmap", "on-cbw-error", "cbw-timeout"),
}
# Drivers whose .bdrv_refresh_filename copies the file child's exact filename.
_COPY_CHILD_FILENAME = frozenset({"copy-before-write", "snapshot-access"})
# Drivers whose .bdrv_get_info succeeds on their own (others delegate or fail).
# Plain ints: IntFlag arithmetic costs microseconds per use, times every node.
_NOCACHE = int(OpenFlag.NOCACHE)
_NO_FLUSH = int(OpenFlag.NO_FLUSH)
_NO_IO = int(OpenFlag.NO_IO)
_PRIMARY = int(Role.PRIMARY)
_ALLOCATED_ROLES = int(Role.DATA | Role.METADATA | Role.FILTERED)
_QCOW2_COMPAT_LAZY = 1
_QCOW2_INCOMPAT_DIRTY = 1
_QCOW2_INCOMPAT_CORRUPT = 2
_QCOW2_INCOMPAT_EXTL2 = 16
_QCOW2_AUTOCLEAR_RAW = 2


# -- static per-node facts, cached by node state -------------------------------


@dataclass(frozen=True, slots=True)
class _FileFacts:
    size: int
    allocated: int


@dataclass(frozen=True, slots=True)
class _Qcow2Facts:
    compat: str
    lazy_refcounts: bool
    corrupt: bool
    dirty: bool
    extended_l2: bool
    refcount_bits: int
    compression_type: str
    data_file_raw: bool


_static: dict[int, tuple[object, Any]] = {}


# A file's size and allocation are read again by every query (QEMU stats the
# file each time; another process may have written to it). Within one query
# they are read once per file node, and remembered so that a repeated query on
# an unchanged graph can check, file by file, that its cached reply still holds.
_stats_this_query: dict[int, tuple[Node, _FileFacts]] = {}


def _file_facts_now(node: Node) -> _FileFacts:
    """The file node's stat facts, read once per query."""
    hit = _stats_this_query.get(node.id)
    if hit is not None and hit[0] is node:
        return hit[1]
    facts = _file_facts(node)
    _stats_this_query[node.id] = (node, facts)
    return facts


def _cached(node: Node, compute: Any) -> Any:
    """``compute(node)``, cached until the node's driver state object changes."""
    hit = _static.get(node.id)
    if hit is not None and hit[0] is node.state:
        return hit[1]
    value = compute(node)
    _static[node.id] = (node.state, value)
    return value


# The serialized BlockDeviceInfo of each node (per ``flat``), reused while the
# freshly built info compares equal: a dict comparison is far cheaper than
# writing QEMU's JSON again for thousands of unchanged nodes.
_texts: dict[tuple[int, bool], RawJSON] = {}


def _prune_static(graph: BlockGraph) -> None:
    """Forget facts and texts of deleted nodes once the caches outgrow the graph."""
    if len(_static) > 2 * len(graph) + 64 or len(_texts) > 4 * len(graph) + 64:
        live = {n.id for n in graph.named_nodes_oldest_first()}
        for key in [k for k in _static if k not in live]:
            del _static[key]
        for tkey in [k for k in _texts if k[0] not in live]:
            del _texts[tkey]


def _file_facts(node: Node) -> _FileFacts:
    state = node.state
    assert isinstance(state, FileState)
    try:
        st = os.stat(state.filename)
    except OSError:
        return _FileFacts(state.size, 0)
    return _FileFacts(st.st_size, st.st_blocks * 512)


def _qcow2_facts(node: Node) -> _Qcow2Facts:
    state = node.state
    assert isinstance(state, Qcow2State)
    header = state.header
    incompat = header.incompatible_features
    return _Qcow2Facts(
        "1.1" if header.version >= 3 else "0.10",
        bool(header.compatible_features & _QCOW2_COMPAT_LAZY),
        bool(incompat & _QCOW2_INCOMPAT_CORRUPT),
        bool(incompat & _QCOW2_INCOMPAT_DIRTY),
        bool(incompat & _QCOW2_INCOMPAT_EXTL2),
        1 << header.refcount_order,
        header.compression,
        bool(header.autoclear_features & _QCOW2_AUTOCLEAR_RAW),
    )


# -- bdrv_refresh_filename ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Names:
    exact: str
    filename: str
    full_options: dict[str, Any]


def _child_edges(node: Node) -> list[Edge]:
    return [e for e in node.children if e.child is not None]


def _implicit_backing(node: Node, edge: Edge) -> bool:
    """Whether the backing child was opened from the image header (no ``backing`` key)."""
    child = edge.child
    return (
        child is not None
        # change-backing-file rewrote the name: QEMU's auto_backing_file is that name now.
        and not getattr(node.state, "backing_changed", False)
        and child.node_name.startswith("#")
        and child.inherits_from is node
        and isinstance(node.state, Qcow2State)
        and bool(node.state.header.backing_file)
    )


class _Query:
    """Memo tables for one query: filenames and image infos by node id."""

    def __init__(self) -> None:
        self.names: dict[int, _Names] = {}
        self.images: dict[tuple[int, bool], dict[str, Any]] = {}

    def refresh(self, node: Node) -> _Names:
        """The node's filenames, computing children first without recursion."""
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
        """bdrv_backing_overridden: the backing child is not what the header names."""
        state = node.state
        header_name = ""
        if isinstance(state, Qcow2State):
            header_name = state.header.backing_file or ""
        edge = node.backing
        if edge is not None and edge.child is not None:
            if _implicit_backing(node, edge):
                return False
            return header_name != self.names[edge.child.id].filename
        return bool(header_name)

    def _refresh_one(self, node: Node) -> _Names:
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
        strong = False
        driver_strong = getattr(node.driver, "strong_options", None)
        if driver_strong is not None:
            # Drivers with prefix options (blkdebug's ``inject-error.``) list their own.
            found = driver_strong(node)
            opts.update(found)
            strong = bool(found)
        for key in _STRONG.get(drv, ()):
            if key in node.options:
                opts[key] = node.options[key]
                strong = True
        generate_json = strong or overridden
        gather = getattr(node.driver, "gather_child_options", None)
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
        own_exact = getattr(node.driver, "refresh_exact_filename", None)
        if own_exact is not None:
            # The driver's .bdrv_refresh_filename (blkdebug:, blkverify:).
            exact = own_exact(node, lambda child: self.names[child.id].exact, opts)
        elif drv == "file":
            state = node.state
            exact = state.filename if isinstance(state, FileState) else ""
        elif drv in ("null-co", "null-aio"):
            if all(k in ("filename", "driver", "latency-ns") for k in opts):
                exact = f"{drv}://"
        elif drv in _COPY_CHILD_FILENAME:
            if node.file is not None and node.file.child is not None:
                exact = self.names[node.file.child.id].exact
        else:
            primary = _primary_child(node)
            if primary is not None and not generate_json:
                child_names = self.names[primary.id]
                is_filter = node.driver is not None and node.driver.is_filter
                if child_names.exact and primary.format_name in _PROTOCOLS and not is_filter:
                    exact = child_names.exact
        exact = exact[: _PATH_MAX - 1]
        filename = exact or ("json:" + dumps(opts))[: _PATH_MAX - 1]
        return _Names(exact, filename, opts)

    # -- bdrv_query_image_info ------------------------------------------------

    def image(self, node: Node, flat: bool) -> dict[str, Any]:
        """ImageInfo of ``node``, with the nested chain unless ``flat``."""
        key = (node.id, flat)
        done = self.images.get(key)
        if done is not None:
            return done
        if flat:
            info = self.images[key] = self._image_one(node)
            return info
        chain = [node]
        below: dict[str, Any] | None = None
        cur = node
        while (edge := filter_or_cow_child(cur)) is not None and edge.child is not None:
            cur = edge.child
            below = self.images.get((cur.id, False))
            if below is not None:
                break
            chain.append(cur)
        for cur in reversed(chain):
            info = self._image_one(cur)
            if below is not None:
                info = _with_backing_image(info, below)
            self.images[(cur.id, False)] = info
            below = info
        return self.images[key]

    def _image_one(self, node: Node) -> dict[str, Any]:
        names = self.refresh(node)
        info: dict[str, Any] = {"filename": names.filename, "format": node.format_name}
        got = _get_info(node)
        if got is not None:
            info["dirty-flag"] = got[1]
        allocated = _allocated(node)
        if allocated is not None:
            info["actual-size"] = allocated
        info["virtual-size"] = _length(node)
        if got is not None and got[0]:
            info["cluster-size"] = got[0]
        state = node.state
        if isinstance(state, Qcow2State) and state.header.backing_file:
            backing_name = state.header.backing_file
            info["backing-filename"] = backing_name
            full = _full_backing_filename(node, backing_name, self)
            if full is not None:
                info["full-backing-filename"] = full
            if state.header.backing_format:
                info["backing-filename-format"] = state.header.backing_format
        snapshots = _snapshots(node)
        if snapshots:
            info["snapshots"] = [_snapshot_info(sn) for sn in snapshots]
        if isinstance(state, Qcow2State):
            info["format-specific"] = _qcow2_specific(node, state)
        return info


def _snapshots(node: Node) -> tuple[Snapshot, ...]:
    """bdrv_snapshot_list: qcow2's table, else through the only storage child (the primary)."""
    cur: Node | None = node
    while cur is not None:
        if isinstance(cur.state, Qcow2State):
            return cur.state.snapshots
        primary = next((e for e in cur.children if int(e.role) & _PRIMARY), None)
        if primary is None or any(
            e is not primary and int(e.role) & _ALLOCATED_ROLES for e in cur.children
        ):
            return ()
        cur = primary.child
    return ()


def _snapshot_info(sn: Snapshot) -> dict[str, Any]:
    """SnapshotInfo, in QAPI member order."""
    info: dict[str, Any] = {
        "id": sn.id,
        "name": sn.name,
        "vm-state-size": sn.vm_state_size,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
    }
    if sn.icount is not None:
        info["icount"] = sn.icount
    return info


def _with_backing_image(info: dict[str, Any], below: dict[str, Any]) -> dict[str, Any]:
    # ImageInfo member order: backing-image comes before format-specific.
    out: dict[str, Any] = {}
    for key, value in info.items():
        if key == "format-specific":
            out["backing-image"] = below
        out[key] = value
    out.setdefault("backing-image", below)
    return out


def _primary_child(node: Node) -> Node | None:
    """bdrv_primary_bs: the child of the PRIMARY edge."""
    for edge in node.children:
        if int(edge.role) & _PRIMARY:
            return edge.child
    return None


def _length(node: Node) -> int:
    """bdrv_getlength: the size rounded up to whole sectors."""
    if node.format_name == "file":
        size = _file_facts_now(node).size
    elif node.state is None and node.file is not None and node.file.child is not None:
        size = _length(node.file.child)
    elif node.driver is not None:
        size = node.driver.size(node)
    else:
        size = 0
    return (size + _SECTOR - 1) // _SECTOR * _SECTOR


def _allocated(node: Node) -> int | None:
    """bdrv_get_allocated_file_size, or None where QEMU reports ENOTSUP."""
    total = 0
    stack = [node]
    while stack:
        cur = stack.pop()
        drv = cur.format_name
        if drv == "file":
            total += _file_facts_now(cur).allocated
        elif drv in ("null-co", "null-aio"):
            continue
        elif drv in _PROTOCOLS or cur.driver is None:
            return None
        elif cur.driver.is_filter:
            edge = filter_child(cur)
            if edge is not None and edge.child is not None:
                stack.append(edge.child)
        else:
            stack.extend(
                e.child for e in cur.children if e.child is not None and e.role & _ALLOCATED_ROLES
            )
    return total


def _get_info(node: Node) -> tuple[int, bool] | None:
    """bdrv_get_info as (cluster size, dirty), or None where it fails."""
    cur: Node | None = node
    while cur is not None:
        drv = cur.format_name
        if drv == "file":
            return 0, False
        if drv == "qcow2":
            state = cur.state
            assert isinstance(state, Qcow2State)
            facts: _Qcow2Facts = _cached(cur, _qcow2_facts)
            return state.header.cluster_size, facts.dirty
        if drv == "raw":
            cur = cur.file.child if cur.file is not None else None
        elif cur.driver is not None and cur.driver.is_filter:
            edge = filter_child(cur)
            cur = edge.child if edge is not None else None
        else:
            return None
    return None


def _dirname(node: Node, query: _Query) -> str | None:
    """bdrv_dirname: the directory prefix of the node's exact filename (with '/')."""
    cur: Node | None = node
    while cur is not None:
        primary = _primary_child(cur)
        if primary is None:
            exact = query.refresh(cur).exact
            if not exact:
                return None
            return exact[: exact.rfind("/") + 1]
        cur = primary
    return None


def _full_backing_filename(node: Node, name: str, query: _Query) -> str | None:
    """bdrv_get_full_backing_filename: ``name`` made absolute against the image's dir."""
    if name.startswith("/") or ":" in name.split("/", 1)[0]:
        return name
    base = _dirname(node, query)
    return None if base is None else base + name


def _qcow2_specific(node: Node, state: Qcow2State) -> dict[str, Any]:
    facts: _Qcow2Facts = _cached(node, _qcow2_facts)
    data: dict[str, Any] = {"compat": facts.compat}
    if state.header.version >= 3:
        if state.header.data_file is not None:
            data["data-file"] = state.header.data_file
        if state.header.has_data_file:
            data["data-file-raw"] = facts.data_file_raw
        data["extended-l2"] = facts.extended_l2
        data["lazy-refcounts"] = facts.lazy_refcounts
        data["corrupt"] = facts.corrupt
    data["refcount-bits"] = facts.refcount_bits
    data["compression-type"] = facts.compression_type
    return {"type": "qcow2", "data": data}


# -- BlockDeviceInfo ------------------------------------------------------------


def block_device_info(node: Node, flat: bool, query: _Query) -> dict[str, Any]:
    """bdrv_block_device_info for a node (named-node queries: no BlockBackend)."""
    names = query.refresh(node)
    info: dict[str, Any] = {
        "file": names.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.format_name,
    }
    cow = cow_child(node)
    if cow is not None and cow.child is not None:
        info["backing_file"] = query.refresh(cow.child).filename
    depth = 0
    if not flat:
        cur = node
        while (edge := filter_or_cow_child(cur)) is not None and edge.child is not None:
            depth += 1
            cur = edge.child
    info["backing_file_depth"] = depth
    info["encrypted"] = False
    info["detect_zeroes"] = node.detect_zeroes
    info["bps"] = info["bps_rd"] = info["bps_wr"] = 0
    info["iops"] = info["iops_rd"] = info["iops_wr"] = 0
    info["image"] = query.image(node, flat)
    flags = int(node.open_flags)
    info["cache"] = {
        "writeback": True,
        "direct": bool(flags & _NOCACHE),
        "no-flush": bool(flags & _NO_FLUSH),
    }
    info["write_threshold"] = write_threshold(node)
    bitmaps = _dirty_bitmaps(node)
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


def _bitmap(count: int, granularity: int) -> dict[str, Any]:
    """BlockDirtyInfo of an anonymous, disabled internal bitmap."""
    count = (count + granularity - 1) // granularity * granularity
    return {
        "count": count,
        "granularity": granularity,
        "recording": False,
        "busy": False,
        "persistent": False,
    }


def _cbw_granularity(cbw: Node) -> int:
    """block_copy_calculate_cluster_size: at least 64 KiB, else the target's cluster."""
    for edge in cbw.children:
        if edge.name == "target" and edge.child is not None:
            got = _get_info(edge.child)
            if got is not None and got[0]:
                return max(65536, got[0])
    return 65536


def _dirty_bitmaps(node: Node) -> list[dict[str, Any]]:
    """The internal bitmaps copy-before-write creates (newest first, as QEMU lists them).

    A cbw node holds its access bitmap (all set) and its done bitmap (empty);
    its source (``file``) holds block-copy's copy bitmap (all set).  Without a
    data path the counts stay at their values after open.
    """
    out: list[dict[str, Any]] = []
    if node.format_name == "copy-before-write":
        gran = _cbw_granularity(node)
        size = _length(node)
        out += [_bitmap(size, gran), _bitmap(0, gran)]
    for edge in node.parents:
        parent = edge.parent
        is_cbw = isinstance(parent, Node) and parent.format_name == "copy-before-write"
        if is_cbw and edge.name == "file":
            assert isinstance(parent, Node)
            out.append(_bitmap(_length(node), _cbw_granularity(parent)))
    return out


@command("query-named-block-nodes")
def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> list[RawJSON]:
    """One BlockDeviceInfo per named node, newest first (each as cached ``RawJSON``)."""
    graph = ctx.daemon.graph
    flat = bool(args.get("flat", False))
    reply_key = (id(graph), flat)
    cached = _replies.get(reply_key)
    if (
        cached is not None
        and cached.graph is graph
        and cached.epoch == mutation_epoch()
        and all(_file_facts(node) == facts for node, facts in cached.files)
    ):
        # Nothing that the reply is made of changed since it was built.
        return cached.reply
    _stats_this_query.clear()
    query = _Query()
    out: list[RawJSON] = []
    for node in graph.named_nodes_newest_first():
        info = block_device_info(node, flat, query)
        key = (node.id, flat)
        raw = _texts.get(key)
        if raw is None or raw.value != info:
            raw = _texts[key] = RawJSON(info)
        out.append(raw)
    _prune_static(graph)
    files = tuple(_stats_this_query.values())
    _stats_this_query.clear()
    _replies[reply_key] = _Reply(graph, mutation_epoch(), files, out)
    return out


@dataclass(frozen=True, slots=True)
class _Reply:
    """A built query-named-block-nodes reply and what it depends on."""

    graph: BlockGraph
    #: ``mutation_epoch()`` when it was built: any graph change since
    #: invalidates it.
    epoch: int
    #: Every file node read while building it, with the facts read then.
    files: tuple[tuple[Node, _FileFacts], ...]
    reply: list[RawJSON]


_replies: dict[tuple[int, bool], _Reply] = {}


# -- x-debug-query-block-graph ----------------------------------------------------


class _GraphDump:
    """XDbgBlockGraph under construction: ids on first encounter, lists prepended."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []

    def node_id(self, obj: Node | BlockBackend | Job) -> int:
        key = id(obj)
        got = self.ids.get(key)
        if got is None:
            got = self.ids[key] = len(self.ids) + 1
        return got

    def add_node(self, obj: Node | BlockBackend | Job, kind: str, name: str) -> None:
        self.nodes.append({"id": self.node_id(obj), "type": kind, "name": name})

    def add_edge(self, parent: Node | BlockBackend | Job, edge: Edge) -> None:
        assert edge.child is not None
        self.edges.append(
            {
                "parent": self.node_id(parent),
                "child": self.node_id(edge.child),
                "name": edge.name,
                "perm": perm_qapi_names(edge.perm),
                "shared-perm": perm_qapi_names(edge.shared),
            }
        )


@command("x-debug-query-block-graph")
def x_debug_query_block_graph(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """The whole graph: BlockBackends, jobs and named nodes, with every edge."""
    graph = ctx.daemon.graph
    dump = _GraphDump()
    for bb in graph.backends:
        dump.add_node(bb, "block-backend", bb.name or bb.device or "")
        if bb.root is not None and bb.root.child is not None:
            dump.add_edge(bb, bb.root)
    for job in graph.jobs:
        dump.add_node(job, "block-job", job.job_id)
        for edge in job.edges:
            if edge.child is not None:
                dump.add_edge(job, edge)
    for node in graph.named_nodes_oldest_first():
        dump.add_node(node, "block-driver", node.node_name)
        for edge in node.children:
            if edge.child is not None:
                dump.add_edge(node, edge)
    # QEMU prepends to both lists.
    dump.nodes.reverse()
    dump.edges.reverse()
    return {"nodes": dump.nodes, "edges": dump.edges}


# -- query-block ------------------------------------------------------------------


@command("query-block")
def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """BlockBackends with a name or a device (none in a storage daemon)."""
    query = _Query()
    out: list[dict[str, Any]] = []
    for bb in ctx.daemon.graph.backends:
        if not bb.name and not bb.device:
            continue
        info: dict[str, Any] = {"device": bb.name}
        if bb.device:
            info["qdev"] = bb.device
        info["type"] = "unknown"
        info["removable"] = False
        info["locked"] = False
        if bb.root is not None and bb.root.child is not None:
            info["inserted"] = block_device_info(bb.root.child, False, query)
        out.append(info)
    return out
