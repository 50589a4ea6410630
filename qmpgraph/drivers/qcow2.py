"""The ``qcow2`` format driver: header parsing and children (control plane only).

Parses the header of images made by ``qemu-img create -f qcow2`` through the
``file`` child: version, virtual size, cluster size, the backing file name and
format (header extension), and the external data file name.  Children: ``file``
(IMAGE, or METADATA|PRIMARY with an external data file), ``data-file`` (DATA)
and ``backing`` (COW; opened by the generic open path, from the header when the
user gave no ``backing`` key).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role
from qmpgraph.transactions.actions import set_edge_role

MAGIC = 0x514649FB
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
_V2_HEADER_LEN = 72
_HEADER_READ = 4096


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The header fields the control plane needs."""

    version: int
    size: int
    cluster_bits: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    incompatible_features: int

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits

    @property
    def has_data_file(self) -> bool:
        """Whether guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)


def parse_header(raw: bytes) -> Qcow2Header:
    """Parse a qcow2 header; QEMU's messages for images it refuses."""
    if len(raw) < _V2_HEADER_LEN:
        raise GenericError("Image is not in qcow2 format")
    magic, version, bf_off, bf_size, cluster_bits, size = struct.unpack_from(">IIQIIQ", raw, 0)
    if magic != MAGIC:
        raise GenericError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise GenericError(f"Unsupported qcow2 version {version}")
    if cluster_bits < 9 or cluster_bits > 21:
        raise GenericError(f"Unsupported cluster size: 2^{cluster_bits}")
    incompat = 0
    header_len = _V2_HEADER_LEN
    if version >= 3:
        incompat = struct.unpack_from(">Q", raw, 72)[0]
        header_len = struct.unpack_from(">I", raw, 100)[0]
    backing_format = data_file = None
    pos = header_len
    end = bf_off if bf_off else len(raw)
    while pos + 8 <= min(end, len(raw)):
        ext_type, ext_len = struct.unpack_from(">II", raw, pos)
        pos += 8
        if ext_type == EXT_END:
            break
        data = raw[pos : pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "replace")
        elif ext_type == EXT_DATA_FILE:
            data_file = data.decode("utf-8", "replace")
        pos += (ext_len + 7) & ~7
    backing_file = None
    if bf_off:
        backing_file = raw[bf_off : bf_off + bf_size].decode("utf-8", "replace")
    return Qcow2Header(
        version, size, cluster_bits, backing_file, backing_format, data_file, incompat
    )


@dataclass(frozen=True, slots=True)
class Qcow2State:
    """Per-node state of a qcow2 node."""

    header: Qcow2Header

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.header.size


class Qcow2(Driver):
    """qcow2: QEMU's native format, with backing files and external data files."""

    format_name = "qcow2"
    is_format = True
    supports_backing = True
    options = frozenset(
        {
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
            "encrypt",
        }
    )
    mutable_options = options
    children = (
        ChildSpec("file", Role.IMAGE),
        ChildSpec("data-file", Role.DATA, required=False),
        ChildSpec("backing", Role.COW, required=False),
    )

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``file``, parse the header, then open ``data-file`` if the image has one."""
        rest = {k: v for k, v in options.items() if k != "backing"}
        self.reject_unknown(rest)
        edge = ctx.open_child(node, options, "file", Role.IMAGE)
        assert edge is not None and edge.child is not None
        child = edge.child
        assert child.driver is not None
        header = parse_header(child.driver.read(child, 0, _HEADER_READ))
        node.state = Qcow2State(header)
        if header.has_data_file:
            set_edge_role(ctx.tran, edge, Role.METADATA | Role.PRIMARY)
            if "data-file" not in options and header.data_file is None:
                raise GenericError("Missing data_file option")
            implicit = None
            if "data-file" not in options:
                implicit = {"driver": "file", "filename": header.data_file}
            ctx.open_child(node, options, "data-file", Role.DATA, implicit=implicit)
        elif "data-file" in options:
            raise GenericError("'data-file' can only be set for images with an external data file")

    def header_backing(self, node: Node) -> tuple[str, str | None] | None:
        """(backing file name, format) from the header, for the implicit backing open."""
        state = node.state
        if isinstance(state, Qcow2State) and state.header.backing_file:
            return state.header.backing_file, state.header.backing_format
        return None


DRIVERS = (Qcow2(),)
