"""Scalar property values as QEMU's QObject input visitor takes them.

``qom-set`` hands its ``value`` (schema type ``any``) to the property's
setter, which visits it under the property's name; ``object-add`` values
arrive already checked by the command's schema, so these checks pass for
them.  Messages are QEMU 7.2's (probed on qemu-storage-daemon).

What does not live here: struct-valued properties (``limits``), which go
through the schema visitor (``qmpgraph.schema.visitor``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qmpgraph.errors import GenericError

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


def _bad(name: str, expected: str) -> GenericError:
    return GenericError(f"Invalid parameter type for '{name}', expected: {expected}")


def int64(name: str, value: Any) -> int:
    """``visit_type_int64``: a JSON integer that fits int64."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "integer")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _bad(name, "integer")
    return value


def uint64(name: str, value: Any) -> int:
    """``visit_type_uint64``: negative int64 values wrap, as QEMU's visitor does."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "integer")
    if _INT64_MIN <= value < 0:
        return value & _UINT64_MAX
    if not 0 <= value <= _UINT64_MAX:
        raise GenericError(f"Parameter '{name}' expects uint64")
    return value


def string(name: str, value: Any) -> str:
    """``visit_type_str``."""
    if not isinstance(value, str):
        raise _bad(name, "string")
    return value


def boolean(name: str, value: Any) -> bool:
    """``visit_type_bool``."""
    if not isinstance(value, bool):
        raise _bad(name, "boolean")
    return value


def enum(name: str, value: Any, values: Iterable[str]) -> str:
    """``visit_type_enum``: a string among ``values``."""
    if not isinstance(value, str):
        raise _bad(name, "string")
    if value not in values:
        raise GenericError(f"Parameter '{name}' does not accept value '{value}'")
    return value
