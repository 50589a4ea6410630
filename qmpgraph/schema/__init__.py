"""QEMU 7.2's QMP schema: the data generated from qemu-storage-daemon, the argument
validators compiled from it, and the introspection reply (placeholder)."""

from __future__ import annotations

from typing import Any

from qmpgraph.errors import GenericError


class Schema:
    """Validates command arguments and answers introspection."""

    def validate_arguments(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` for ``command``; raise QEMU's message on the first problem."""
        if command == "qmp_capabilities":
            for key in args:
                if key != "enable":
                    raise GenericError(f"Parameter '{key}' is unexpected")
        return args

    def introspection(self) -> list[dict[str, Any]]:
        """The ``query-qmp-schema`` reply."""
        return []


def load() -> Schema:
    """The schema embedded in the package."""
    return Schema()
