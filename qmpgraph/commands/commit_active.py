"""Active commit: block-commit of the active layer, a mirror job into the base.

Placeholder until the mirror-based job is wired (see ``commit``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node


def commit_active_start(ctx: CommandContext, args: dict[str, Any], top: Node, base: Node) -> None:
    """commit_active_start (not yet)."""
    raise GenericError("active block-commit is not supported by qmpgraph yet")
