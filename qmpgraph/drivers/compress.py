"""The ``compress`` filter: writes through it become compressed writes.

QEMU 7.2 (block/filter-compress.c): ``file`` (FILTERED|PRIMARY) opens first;
its driver must be able to write compressed clusters
(``block_driver_can_compress``), else "Compression is not supported for
underlying format: %s".  Permissions: the default filter rule.  Not
reopenable.  The data path: ``qmpgraph.io.filters_io``.
"""

from __future__ import annotations

from typing import Any

from qmpgraph.drivers.base import OpenContext, file_child
from qmpgraph.drivers.filter_base import FilterDriver
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node

# Drivers that write compressed clusters (block_driver_can_compress).
_COMPRESSING = frozenset({"qcow2", "qcow", "vmdk"})


class Compress(FilterDriver):
    """compress: compressed writes through the default filter rule."""

    format_name = "compress"
    supports_reopen = False

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """compress_open: the child's driver must write compressed clusters."""
        super().open(ctx, node, options)
        child = file_child(node)
        name = child.format_name if child is not None else None
        if name not in _COMPRESSING:
            raise GenericError(
                f"Compression is not supported for underlying format: {name or '(no format)'}"
            )


DRIVERS = (Compress(),)
