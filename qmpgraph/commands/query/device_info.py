"""``query-named-block-nodes`` and ``query-block``: BlockDeviceInfo per node.

Replies are built as QEMU 7.2 builds them (dicts in QAPI member order, so
that ``qjson`` reproduces QDict's iteration order, bucket collisions
included).  Filenames and image infos are memoized within one query
(``Query``), so a reply costs O(nodes) (plus the size of nested chains, as
in QEMU); the serialized info of each node is reused while it compares
equal, and a whole reply is reused while neither the graph nor any file it
read changed.

What does not live here: the filename refresh (``filenames.py``), the image
info (``image_info.py``), the graph dump (``graph_dump.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.bitmaps.registry import bitmaps_of
from qmpgraph.bitmaps.registry import generation as bitmap_generation
from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.query.facts import FileFacts, begin_query, end_query, file_facts, prune
from qmpgraph.commands.query.image_info import Query, get_info, is_encrypted, node_length
from qmpgraph.commands.registry import command
from qmpgraph.commands.resize import write_threshold
from qmpgraph.drivers.copy_before_write import bitmaps_seq as cbw_bitmaps_seq
from qmpgraph.drivers.copy_before_write import initial_bitmap as cbw_initial_bitmap
from qmpgraph.graph.graph import BlockGraph, cow_child, filter_or_cow_child
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.io.cbw_hook import CBW_IO
from qmpgraph.protocol.qjson import RawJSON
from qmpgraph.transactions.engine import mutation_epoch

_NOCACHE = int(OpenFlag.NOCACHE)
_NO_FLUSH = int(OpenFlag.NO_FLUSH)


def block_device_info(node: Node, flat: bool, query: Query) -> dict[str, Any]:
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
    info["encrypted"] = is_encrypted(node)
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


def _named_bitmap(bm: Any) -> dict[str, Any]:
    """BlockDirtyInfo of a bitmap of ``qmpgraph.bitmaps``."""
    info: dict[str, Any] = {}
    if bm.name is not None:
        info["name"] = bm.name
    info["count"] = bm.count()
    info["granularity"] = bm.granularity
    info["recording"] = bm.recording
    info["busy"] = bm.busy
    info["persistent"] = bm.persistent
    if bm.inconsistent:
        info["inconsistent"] = True
    return info


def _cbw_granularity(cbw: Node) -> int:
    """block_copy_calculate_cluster_size: at least 64 KiB, else the target's cluster."""
    for edge in cbw.children:
        if edge.name == "target" and edge.child is not None:
            got = get_info(edge.child)
            if got is not None and got[0]:
                return max(65536, got[0])
    return 65536


def _dirty_bitmaps(node: Node) -> list[dict[str, Any]]:
    """The node's bitmaps and the internal ones copy-before-write creates, newest first.

    A cbw node holds its access bitmap and its done bitmap (the clusters
    guest writes went through); its
    source (``file``) holds block-copy's copy bitmap: all set, or what the
    user ``bitmap`` marked at open, per cluster.  Without a data path the
    counts stay at their values after open.
    """
    listed: list[tuple[int, dict[str, Any]]] = [
        (bm.seq, _named_bitmap(bm)) for bm in bitmaps_of(node)
    ]
    if node.format_name == "copy-before-write":
        gran = _cbw_granularity(node)
        seq = cbw_bitmaps_seq(node)
        access = _cbw_copy_count(node, gran, access=True)
        live = CBW_IO.peek(node)
        done = len(live.written) * live.cluster if live is not None else 0
        listed += [(seq, _bitmap(access, gran)), (seq, _bitmap(done, gran))]
    for edge in node.parents:
        parent = edge.parent
        is_cbw = isinstance(parent, Node) and parent.format_name == "copy-before-write"
        if is_cbw and edge.name == "file":
            assert isinstance(parent, Node)
            gran = _cbw_granularity(parent)
            listed.append((cbw_bitmaps_seq(parent), _bitmap(_cbw_copy_count(parent, gran), gran)))
    # Stable: equal sequence numbers keep the order above.
    listed.sort(key=lambda pair: -pair[0])
    return [info for _, info in listed]


def _cbw_copy_count(cbw: Node, gran: int, *, access: bool = False) -> int:
    """Bytes the copy bitmap (or with ``access``, the access bitmap) marks:
    what is left once requests (or a backup job) started on the filter, else
    at open: all, or the user bitmap's clusters."""
    live = CBW_IO.peek(cbw)
    if live is not None:
        return sum(live.access if access else live.to_copy) * live.cluster
    user = cbw_initial_bitmap(cbw)
    if user is None:
        source = cbw.file.child if cbw.file is not None else None
        return node_length(source) if source is not None else 0
    count, last = 0, -1
    for lo, hi in user.dirty_ranges():  # sorted: count each cluster once
        first, end = max(lo // gran, last + 1), (hi - 1) // gran
        if end >= first:
            count, last = count + end - first + 1, end
    return count * gran


@dataclass(frozen=True, slots=True)
class _Reply:
    """A built query-named-block-nodes reply and what it depends on."""

    graph: BlockGraph
    #: ``mutation_epoch()`` when it was built: any graph change since
    #: invalidates it.
    epoch: int
    #: ``bitmap_generation()`` when it was built (dirty counts move on writes).
    bitmaps: int
    #: ``CBW_IO.fingerprint()`` then (copy-before-write's counts).
    cbw: tuple[tuple[int, int, int, int], ...]
    #: Every file node read while building it, with the facts read then.
    files: tuple[tuple[Node, FileFacts], ...]
    reply: list[RawJSON]


_replies: dict[tuple[int, bool], _Reply] = {}
# The serialized BlockDeviceInfo of each node (per ``flat``), reused while the
# freshly built info compares equal: a dict comparison is far cheaper than
# writing QEMU's JSON again for thousands of unchanged nodes.
_texts: dict[tuple[int, bool], RawJSON] = {}


@command("query-named-block-nodes")
def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> list[RawJSON]:
    """One BlockDeviceInfo per named node, newest first (each as cached ``RawJSON``)."""
    graph = ctx.daemon.graph
    flat = bool(args.get("flat", False))
    reply_key = (id(graph), flat)
    cached_reply = _replies.get(reply_key)
    if (
        cached_reply is not None
        and cached_reply.graph is graph
        and cached_reply.epoch == mutation_epoch()
        and cached_reply.bitmaps == bitmap_generation()
        and cached_reply.cbw == CBW_IO.fingerprint()
        and all(file_facts(node) == facts for node, facts in cached_reply.files)
    ):
        # Nothing that the reply is made of changed since it was built.
        return cached_reply.reply
    begin_query()
    query = Query()
    out: list[RawJSON] = []
    for node in graph.named_nodes_newest_first():
        info = block_device_info(node, flat, query)
        key = (node.id, flat)
        raw = _texts.get(key)
        if raw is None or raw.value != info:
            raw = _texts[key] = RawJSON(info)
        out.append(raw)
    prune(graph, _texts)
    _replies[reply_key] = _Reply(
        graph, mutation_epoch(), bitmap_generation(), CBW_IO.fingerprint(), end_query(), out
    )
    return out


@command("query-block")
def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    """BlockBackends with a name or a device (none in a storage daemon)."""
    query = Query()
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
