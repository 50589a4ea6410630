"""Node names: the validity rules, their message order, and generated names.

Lives here: ``check_node_name`` (QEMU's checks and exact messages, in QEMU's
order) and ``NameGenerator`` (``#block<counter><rr>``: one process-wide
counter plus two random digits from a seedable RNG).  What does not live here:
the name index itself (``graph.py``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from qmpgraph.errors import GenericError

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
MAX_NODE_NAME = 31


def is_well_formed(name: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    return bool(_WELL_FORMED.match(name))


def check_node_name(
    name: str,
    *,
    is_node_name: Callable[[str], bool],
    is_backend_name: Callable[[str], bool] = lambda _n: False,
) -> None:
    """Raise QEMU's error for an unusable user-given node name, checks in QEMU's order."""
    if not is_well_formed(name):
        raise GenericError(f"Invalid node-name: '{name}'")
    if is_backend_name(name):
        raise GenericError(f"node-name={name} is conflicting with a device id")
    if is_node_name(name):
        raise GenericError(f"Duplicate nodes with node-name='{name}'")
    if len(name) > MAX_NODE_NAME:
        raise GenericError("Node name too long")


class NameGenerator:
    """Generates ``#block<counter><rr>`` names; the counter is never rolled back.

    QEMU consumes the counter even when the open that asked for a name fails,
    so this is deliberately not transactional.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.counter = 0
        self._rng = random.Random(seed)

    def generate(self) -> str:
        """The next generated node name."""
        name = f"#block{self.counter}{self._rng.randrange(100):02d}"
        self.counter += 1
        return name
