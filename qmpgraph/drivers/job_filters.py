"""The block jobs' implicit filters ``commit_top`` and ``mirror_top``.

Only the daemon instantiates them (they are not offered to blockdev-add):
their filtered child is ``backing`` (``filtered_child_is_backing``).
``commit_top`` takes nothing and shares everything; ``mirror_top`` keeps the
default rule while its job runs.  The jobs themselves live elsewhere.
"""

from __future__ import annotations

from qmpgraph.drivers.base import FILTERED, ChildSpec, Driver
from qmpgraph.drivers.filter_base import TakesNothing


class _JobFilter(Driver):
    """A job's filter: its filtered child is ``backing``."""

    is_filter = True
    filtered_child_is_backing = True
    children = (ChildSpec("backing", FILTERED),)


class CommitTop(TakesNothing, _JobFilter):
    """commit_top: the commit job's implicit filter."""

    format_name = "commit_top"


class MirrorTop(_JobFilter):
    """mirror_top: the mirror job's implicit filter (default rule while running)."""

    format_name = "mirror_top"


INTERNAL_DRIVERS = (CommitTop(), MirrorTop())
