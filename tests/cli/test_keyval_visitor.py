"""The keyval input visitor (``qmpgraph.schema.keyval_visitor``) without processes.

Number parsing is checked against the C library itself (``strtoll`` and
``strtoull`` with base 0, through ctypes), which is what QEMU calls; the
messages and typing rules are checked live against qemu-storage-daemon in
``test_blockdev_live.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpgraph.errors import GenericError
from qmpgraph.schema import load
from qmpgraph.schema.keyval_visitor import strtoi64, strtou64

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.strtoll.restype = ctypes.c_longlong
_libc.strtoll.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
_libc.strtoull.restype = ctypes.c_ulonglong
_libc.strtoull.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]


def _c_parse(fn: str, text: str) -> int | None:
    """QEMU's qemu_strto[iu]64(text, NULL, 0): C's parse, whole string, no ERANGE."""
    raw = text.encode()
    buf = ctypes.create_string_buffer(raw)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = getattr(_libc, fn)(buf, ctypes.byref(end), 0)
    errno = ctypes.get_errno()
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(buf)  # type: ignore[operator]
    if errno or consumed == 0 or consumed != len(raw):
        return None
    return int(value)


_NUMBERISH = st.text(alphabet=" \t+-0123456789xXabcdefABCDEF8", max_size=24)
_EDGES = [
    "",
    "0",
    "0x",
    "0x1g",
    "-0x10",
    "010",
    "08",
    " 5",
    "5 ",
    "+-1",
    "--1",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "-18446744073709551615",
    "-18446744073709551616",
    "0xffffffffffffffff",
    "-0xffffffffffffffff",
    "\v\f\r\n7",
]


@pytest.mark.parametrize("text", _EDGES)
def test_integer_edges_match_libc(text: str) -> None:
    assert strtoi64(text) == _c_parse("strtoll", text)
    assert strtou64(text) == _c_parse("strtoull", text)


@given(_NUMBERISH)
def test_integers_match_libc(text: str) -> None:
    assert strtoi64(text) == _c_parse("strtoll", text)
    assert strtou64(text) == _c_parse("strtoull", text)


def _visit(tree: dict[str, Any]) -> dict[str, Any]:
    return load().validate_keyval_arguments("blockdev-add", tree)


def test_leaves_become_typed_values() -> None:
    tree = {
        "driver": "raw",
        "node-name": "r",
        "read-only": "yes",
        "offset": "0x200",
        "file": {"driver": "null-co", "size": "010", "latency-ns": "-1", "read-only": "off"},
    }
    assert _visit(tree) == {
        "driver": "raw",
        "node-name": "r",
        "read-only": True,
        "offset": 512,
        "file": {
            "driver": "null-co",
            "size": 8,
            "latency-ns": 2**64 - 1,
            "read-only": False,
        },
    }


def test_alternate_takes_the_string_branch_for_a_string() -> None:
    assert _visit({"driver": "raw", "file": "n"}) == {"driver": "raw", "file": "n"}
    assert _visit({"driver": "qcow2", "file": "f", "backing": ""})["backing"] == ""


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"driver": "quorum", "children": [{"driver": "null-co", "size": "x"}]},
         "Parameter 'children.0.size' expects integer"),
        ({"driver": "quorum", "children": [{"size": "1"}]},
         "Parameter 'children.0.driver' is missing"),
        ({"driver": "null-co", "size": {"a": "1"}}, "Parameters 'size.*' are unexpected"),
        ({"driver": "null-co", "cache": "1"},
         "Invalid parameter type for 'cache', expected: object"),
        ({"driver": "raw", "file": ["x"]},
         "Invalid parameter type for 'file', expected: BlockdevRef"),
    ],
)  # fmt: skip
def test_messages(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(GenericError) as exc:
        _visit(tree)
    assert exc.value.desc == message


def test_keyval_visitor_imports_no_trio() -> None:
    code = "import sys, qmpgraph.schema.keyval_visitor; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0
