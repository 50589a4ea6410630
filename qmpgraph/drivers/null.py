"""The ``null-co`` and ``null-aio`` protocol drivers (no data, a configurable size).

One driver under two names: QEMU's two differ only in how requests complete
(coroutine or AIO callback), which the control plane does not see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node


@dataclass(frozen=True, slots=True)
class NullState:
    """Per-node state of a null node."""

    size: int
    latency_ns: int
    read_zeroes: bool


class Null(Driver):
    """null-co / null-aio: reads return nothing in particular, writes vanish."""

    protocol = True
    options = frozenset({"size", "latency-ns", "read-zeroes", "filename"})

    def __init__(self, format_name: str) -> None:
        self.format_name = format_name

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Parse ``size`` (default 1 GiB), ``latency-ns`` and ``read-zeroes``."""
        self.reject_unknown(options)
        size = int(options.get("size", 1 << 30))
        if size < 0:
            # QEMU 7.2 aborts here (its size parser's error goes to
            # error_abort); qmpgraph answers with that parser's words.
            raise GenericError("Parameter 'size' expects a non-negative number below 2^64")
        latency = int(options.get("latency-ns", 0))
        # QEMU keeps latency-ns (a uint64 in the schema) in an int64: values
        # from 2^63 up, and negative ones wrapped by the visitor, read as < 0.
        if latency < 0 or latency >= 1 << 63:
            raise GenericError("latency-ns is invalid")
        node.state = NullState(size, latency, bool(options.get("read-zeroes", False)))

    def filename(self, node: Node) -> str:
        """``null-co://`` or ``null-aio://`` (QEMU's synthesized filename)."""
        return f"{self.format_name}://"


DRIVERS = (Null("null-co"), Null("null-aio"))
