"""Properties of the JSON stream reader, without an event loop.

The recorded exchanges (``test_wire_recorded.py``) pin QEMU's behaviour on
chosen inputs; these tests check the reader against itself on generated ones:

* values written as JSON come back equal, with dict keys in text order;
* the fast path agrees with the exact QEMU model (``JSONMachine``) on any
  bytes, however they are split into writes;
* no input makes it raise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpgraph.protocol import jsonstream, qjson
from qmpgraph.protocol.jsonlex import JSONMachine, c_text, has_noncharacter
from qmpgraph.protocol.jsonstream import JSONParseError, JSONStreamer


def canonical(value: Any) -> Any:
    """A form where equal means identical: types kept, key order kept, -0.0 kept."""
    if isinstance(value, dict):
        return ("dict", [(k, canonical(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [canonical(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, JSONParseError):
        return ("error", value.desc)
    return (type(value).__name__, value)


def exact(data: bytes) -> list[Any]:
    """What the exact model alone makes of ``data``."""
    machine = JSONMachine()
    machine.feed(data)
    return [canonical(v) for v in machine.out]


def streamed(chunks: list[bytes]) -> list[Any]:
    """What JSONStreamer makes of ``chunks``, fed one by one."""
    streamer = JSONStreamer()
    out: list[Any] = []
    for chunk in chunks:
        out.extend(streamer.feed(chunk))
    return [canonical(v) for v in out]


# -- values ---------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]).filter(lambda c: not has_noncharacter(c)))
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, ascii_only=st.booleans(), newline=st.booleans())
def test_values_round_trip(value: Any, ascii_only: bool, newline: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    # A scalar ends only when the next byte arrives; a container ends itself.
    data = text + (b"\n" if newline or not isinstance(value, (dict, list)) else b"")
    assert streamed([data]) == [canonical(value)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_qemu_output_reads_back(value: Any) -> None:
    # What QEMU writes, QEMU reads back (key order aside: qjson sorts as QDict).
    data = qjson.dumps(value).encode("ascii") + b"\n"
    [got] = JSONStreamer().feed(data)
    assert got == value


@given(st.integers(min_value=1 << 64, max_value=1 << 200))
def test_integers_beyond_uint64_become_floats(n: int) -> None:
    assert streamed([b"%d\n" % n]) == [canonical(float(n))]
    assert streamed([b"-%d\n" % n]) == [canonical(-float(n))]


def test_float_semantics() -> None:
    [value] = JSONStreamer().feed(b"[0.1, 1e400, -0.0, 18446744073709551616, -0]\n")
    assert qjson.dumps(value) == "[0.10000000000000001, inf, -0, 1.8446744073709552e+19, 0]"
    assert math.isinf(value[1])


# -- fast path against the exact model ------------------------------------------------

_fragments = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b" ",
        b"\n",
        b"\r\n",
        b"\t",
        b'"execute"',
        b'"id"',
        b'"arguments"',
        b'"x-a"',
        b'"a:b"',
        b"'sq'",
        b'"',
        b"'",
        b"\\",
        b"1",
        b"0",
        b"-",
        b".5",
        b"e3",
        b"123456789012345678901234",
        b"true",
        b"null",
        b"nul",
        b"x",
        b"%",
        b"\xff",
        b"\x00",
        b"\x01",
        b"\xc3\xa9",
        b"\xc0\x80",
        b"\xef\xbf\xbe",
        b'"\\u00e9"',
        b'"\\uD800"',
        b'"\\u0000"',
        b'{"execute": "x-a", "id": 1}\n',
        b'{"a": 1, "a": 2}\n',
        b"0e1",
        b"-0E",
        b"1E+2",
        b"1.5e-3",
        b"0.0",
        b"1e400",
        b"} {",
        b'["\xc3\xa9"]',
        b'"\xef\xbf\xbe"',
        b"}{",
    ]
)
byte_streams = st.lists(_fragments, max_size=40).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    start = 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_streams, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_fast_path_agrees_with_exact_model(data: bytes, cuts: list[int]) -> None:
    want = exact(data)
    assert streamed([data]) == want
    assert streamed(_split(data, cuts)) == want


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=byte_streams, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_long_line_shortcut_agrees_with_exact_model(data: bytes, cuts: list[int]) -> None:
    # The "} {" shortcut is taken only on long lines; make every line long.
    saved = jsonstream._LONG_SEGMENT
    jsonstream._LONG_SEGMENT = 0
    try:
        want = exact(data)
        assert streamed([data]) == want
        assert streamed(_split(data, cuts)) == want
    finally:
        jsonstream._LONG_SEGMENT = saved


@settings(max_examples=300)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=4))
def test_garbage_never_raises(data: bytes, cuts: list[int]) -> None:
    want = exact(data)
    assert streamed([data]) == want
    assert streamed(_split(data, cuts)) == want
    assert streamed([bytes((b,)) for b in data]) == want


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(json_values, min_size=1, max_size=5), cuts=st.lists(st.integers(0)))
def test_pipelined_lines_split_anywhere(values: list[Any], cuts: list[int]) -> None:
    data = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    assert streamed(_split(data, cuts)) == [canonical(v) for v in values]


# -- pieces ---------------------------------------------------------------------------


def test_error_text_is_what_qemus_writer_prints() -> None:
    assert c_text(b"ab\0cd") == "ab"
    assert c_text(b"\xc3\xa9\xff\xc0\x80") == "\u00e9\ufffd\x00"
    # A lead byte swallows the continuation bytes it has, then is invalid.
    assert c_text(b"\xe2\x82x") == "\ufffdx"
    assert c_text(b"\xef\xbf\xbe") == "\ufffd"  # noncharacter


def test_nul_and_ff_each_produce_an_error() -> None:
    assert JSONStreamer().feed(b"\x00\xff") == [
        JSONParseError("JSON parse error, stray ''"),
        JSONParseError("JSON parse error, stray '\ufffd'"),
    ]


def test_keyword_waits_for_the_next_byte() -> None:
    streamer = JSONStreamer()
    assert streamer.feed(b"true") == []
    assert streamer.feed(b" ") == [True]


def test_key_order_is_text_order() -> None:
    [value] = JSONStreamer().feed(b'{"z": 1, "a": {"y": 2, "b": 3}, "m": 4}\n')
    assert list(value) == ["z", "a", "m"]
    assert list(value["a"]) == ["y", "b"]


def test_protocol_imports_no_trio() -> None:
    code = (
        "import sys\n"
        "import qmpgraph.protocol.jsonlex, qmpgraph.protocol.jsonstream\n"
        "import qmpgraph.protocol.qjson, qmpgraph.protocol.session\n"
        "assert 'trio' not in sys.modules, 'protocol imported trio'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
