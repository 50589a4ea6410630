"""``bdrv_query_image_info``: the ``image`` member of the block queries.

Virtual size in whole sectors; allocated size summed over data, metadata and
filtered children; ``bdrv_get_info`` delegating through raw and filters
(luks reports its file's cluster size); ``encrypted`` for luks;
format-specific data (qcow2's header features, luks's header and key
slots); qcow2's header backing names; nested along filter-or-COW children as
``backing-image`` unless ``flat``.

Lives here: ``Query`` (filename and image memo tables for one query),
``node_length``, ``get_info``.  What does not: the BlockDeviceInfo around it
(``device_info.py``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.query.facts import cached, file_facts_now, qcow2_facts
from qmpgraph.commands.query.filenames import PROTOCOLS, Filenames, primary_child
from qmpgraph.drivers import qcow2_bitmaps
from qmpgraph.drivers.luks import LuksHeader, LuksState
from qmpgraph.drivers.qcow2 import Qcow2State, Snapshot
from qmpgraph.graph.graph import filter_child, filter_or_cow_child
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role

_SECTOR = 512
_PRIMARY = int(Role.PRIMARY)
_ALLOCATED_ROLES = int(Role.DATA | Role.METADATA | Role.FILTERED)
_LUKS_SLOT_ENABLED = 0x00AC71F3


class Query(Filenames):
    """Memo tables for one query: filenames, and image infos by (node id, flat)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[tuple[int, bool], dict[str, Any]] = {}

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
        got = get_info(node)
        if got is not None:
            info["dirty-flag"] = got[1]
        allocated = _allocated(node)
        if allocated is not None:
            info["actual-size"] = allocated
        info["virtual-size"] = node_length(node)
        if got is not None and got[0]:
            info["cluster-size"] = got[0]
        state = node.state
        if is_encrypted(node):
            info["encrypted"] = True
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
        elif isinstance(state, LuksState):
            info["format-specific"] = {"type": "luks", "data": _luks_specific(state.header)}
        return info


def is_encrypted(node: Node) -> bool:
    """bs->encrypted: set by the luks driver (qmpgraph opens no encrypted qcow2)."""
    return isinstance(node.state, LuksState)


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


def node_length(node: Node) -> int:
    """bdrv_getlength: the node's size rounded up to whole sectors."""
    if node.format_name == "file":
        size = file_facts_now(node).size
    elif node.state is None and node.file is not None and node.file.child is not None:
        size = node_length(node.file.child)
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
            total += file_facts_now(cur).allocated
        elif drv in ("null-co", "null-aio"):
            continue
        elif drv in PROTOCOLS or cur.driver is None:
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


def get_info(node: Node) -> tuple[int, bool] | None:
    """bdrv_get_info as (cluster size, dirty), or None where it fails."""
    cur: Node | None = node
    while cur is not None:
        drv = cur.format_name
        if drv == "file":
            return 0, False
        if drv == "qcow2":
            state = cur.state
            assert isinstance(state, Qcow2State)
            return state.header.cluster_size, cached(cur, qcow2_facts).dirty
        if drv == "luks":
            # block_crypto_get_info_luks: the file's cluster size, never dirty.
            below = get_info(cur.file.child) if cur.file and cur.file.child else None
            return None if below is None else (below[0], False)
        if drv == "raw":
            cur = cur.file.child if cur.file is not None else None
        elif cur.driver is not None and cur.driver.is_filter:
            edge = filter_child(cur)
            cur = edge.child if edge is not None else None
        else:
            return None
    return None


def _dirname(node: Node, query: Filenames) -> str | None:
    """bdrv_dirname: the directory prefix of the node's exact filename (with '/')."""
    cur: Node | None = node
    while cur is not None:
        primary = primary_child(cur)
        if primary is None:
            exact = query.refresh(cur).exact
            if not exact:
                return None
            return exact[: exact.rfind("/") + 1]
        cur = primary
    return None


def _full_backing_filename(node: Node, name: str, query: Filenames) -> str | None:
    """bdrv_get_full_backing_filename: ``name`` made absolute against the image's dir."""
    if name.startswith("/") or ":" in name.split("/", 1)[0]:
        return name
    base = _dirname(node, query)
    return None if base is None else base + name


def _qcow2_specific(node: Node, state: Qcow2State) -> dict[str, Any]:
    facts = cached(node, qcow2_facts)
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
    bitmaps = qcow2_bitmaps.image_bitmaps(node)
    if bitmaps is not None:
        data["bitmaps"] = bitmaps
    data["compression-type"] = facts.compression_type
    return {"type": "qcow2", "data": data}


def _luks_specific(header: LuksHeader) -> dict[str, Any]:
    """QCryptoBlockInfoLUKS, in QAPI member order."""
    key_bytes = header.master_key_len // 2 if header.cipher_mode == "xts" else header.master_key_len
    data: dict[str, Any] = {
        "cipher-alg": f"{header.cipher_name}-{key_bytes * 8}",
        "cipher-mode": header.cipher_mode,
        "ivgen-alg": header.ivgen,
    }
    # ivgen-hash-alg belongs to essiv only, and qmpgraph opens no essiv volume.
    data["hash-alg"] = header.hash_spec
    data["payload-offset"] = header.payload_offset_sector * _SECTOR
    data["master-key-iters"] = header.master_key_iterations
    data["uuid"] = header.uuid
    slots: list[dict[str, Any]] = []
    for slot in header.slots:
        active = slot.active == _LUKS_SLOT_ENABLED
        info: dict[str, Any] = {"active": active}
        if active:
            info["iters"] = slot.iterations
            info["stripes"] = slot.stripes
        info["key-offset"] = slot.key_offset_sector * _SECTOR
        slots.append(info)
    data["slots"] = slots
    return data
