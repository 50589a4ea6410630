"""The ``blkverify`` driver: compares a ``test`` image with a ``raw`` reference.

A protocol driver (``bdrv_file_open``) and a filter: ``raw`` is the filtered
child (FILTERED|PRIMARY, so it lands in ``bs->file``), ``test`` is a DATA
child with the default storage rule.  The node's length is the test image's.
Its exact filename is ``blkverify:<raw>:<test>`` when both children have one.
What does not live here: the comparison itself (``qmpgraph.io.filters_io``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmpgraph.drivers.base import FILTERED, ChildSpec, Driver, OpenContext, file_child, node_size
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Role


def _test_child(node: Node) -> Node | None:
    for edge in node.children:
        if edge.name == "test":
            return edge.child
    return None


class Blkverify(Driver):
    """blkverify: every read is checked against the raw reference image."""

    format_name = "blkverify"
    protocol = True
    is_filter = True
    children = (ChildSpec("raw", FILTERED), ChildSpec("test", Role.DATA))

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open ``raw`` (the filtered child), then ``test``."""
        self.reject_unknown(options)
        ctx.open_child(node, options, "raw", FILTERED)
        ctx.open_child(node, options, "test", Role.DATA)
        node.state = ()

    def size(self, node: Node) -> int:
        """blkverify_co_getlength: the test image's length."""
        return node_size(_test_child(node))

    def refresh_exact_filename(
        self, node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
    ) -> str:
        """``blkverify:<raw>:<test>`` when both children have exact filenames."""
        del full_options
        raw = file_child(node)
        test = _test_child(node)
        if raw is None or test is None or not exact(raw) or not exact(test):
            return ""
        return f"blkverify:{exact(raw)}:{exact(test)}"


DRIVERS = (Blkverify(),)
