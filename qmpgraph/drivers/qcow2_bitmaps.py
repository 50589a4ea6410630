"""Persistent dirty bitmaps in qcow2 images (the bitmaps header extension).

Not implemented yet: images are opened and closed without touching their
stored bitmaps; ``remove_stored`` has nothing to remove.
"""

from __future__ import annotations

from qmpgraph.graph.model import Node
from qmpgraph.transactions.engine import Transaction


def remove_stored(tran: Transaction, node: Node, name: str) -> None:
    """qcow2_co_remove_persistent_dirty_bitmap: drop ``name`` from the image's directory."""
