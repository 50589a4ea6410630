"""Properties of the validator that hold for any input.

* Random argument dicts never crash it: it returns or raises GenericError.
* The JSON Schema export is never looser than the exact visitor: whatever
  it accepts, the visitor accepts unchanged.
* The schema code imports no trio.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpgraph.errors import GenericError
from qmpgraph.schema import load
from qmpgraph.schema.visitor import visit_arguments

SCHEMA = load()
COMMANDS = SCHEMA.command_names


def _member_names() -> list[str]:
    names = {m["name"] for e in SCHEMA.entities for m in e.get("members", []) if "name" in m}
    return sorted(names)


# Keys drawn mostly from QEMU's own member names, so the walk goes deep.
KEYS = st.one_of(st.sampled_from(_member_names()), st.text(max_size=6))
ENUMISH = st.sampled_from(
    [*sorted({v for e in SCHEMA.entities for v in e.get("values", [])}), "x", ""]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([0, -1, 255, 256, 65536, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    ENUMISH,
    st.text(max_size=4),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMMANDS), st.dictionaries(KEYS, JSON, max_size=7))
def test_random_arguments_never_crash(command: str, args: dict[str, Any]) -> None:
    try:
        out = SCHEMA.validate_arguments(command, args)
    except GenericError as err:
        assert err.desc
    else:
        assert isinstance(out, dict)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMMANDS), st.dictionaries(KEYS, JSON, max_size=7))
def test_json_schema_is_never_looser(command: str, args: dict[str, Any]) -> None:
    if SCHEMA.json_schema(command).is_valid(args):
        assert visit_arguments(SCHEMA._arg_types[command], args) == args


def test_schema_imports_no_trio() -> None:
    code = "import sys, qmpgraph.schema; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
