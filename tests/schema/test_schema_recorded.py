"""Argument errors: qmpgraph's text equals what qemu-storage-daemon answered.

The expected values were recorded from QEMU 7.2 by
``tools/record_arg_errors.py`` (every case carries the extra unknown key that
keeps QEMU from running the command; qmpgraph sees the same input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qmpgraph.errors import GenericError
from qmpgraph.schema import load

RECORDED = Path(__file__).parent / "data" / "qsd-arg-errors.json"
PROBE = "qmpgraph-probe"


def _recorded() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(RECORDED.read_text())
    return cases


def _error(command: str, args: dict[str, Any]) -> str | None:
    try:
        load().validate_arguments(command, args)
    except GenericError as err:
        return err.desc
    return None


def _qemu(command: str, args: dict[str, Any]) -> str:
    """The recorded QEMU answer for ``args`` (probe key added)."""
    sent = {**args, PROBE: 0}
    for case in _recorded():
        if case["command"] == command and case["arguments"] == sent:
            desc: str = case["error"]
            return desc
    raise LookupError(f"no recorded case for {command} {args!r}")


def test_every_recorded_case_matches() -> None:
    cases = _recorded()
    assert len(cases) > 1000
    wrong = [
        (c["command"], c["arguments"], c["error"], got)
        for c in cases
        if (got := _error(c["command"], c["arguments"])) != c["error"]
    ]
    assert wrong == []


def test_recorded_cases_cover_every_message_form() -> None:
    texts = [c["error"] for c in _recorded()]
    for needle in (
        "' is missing",
        "' is unexpected",
        "expected: string",
        "expected: integer",
        "expected: boolean",
        "expected: object",
        "expected: array",
        "expected: BlockdevRef",
        "expected: Qcow2OverlapChecks",
        "' does not accept value '",
        "' expects uint64",
        "' expects uint32_t",
        "' expects int32_t",
    ):
        assert any(needle in t for t in texts), needle


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("qmp_capabilities", {"enable": ["foo"]}),
        ("blockdev-add", {"driver": "raw", "file": []}),
        ("blockdev-add", {"driver": "quorum", "children": [True], "vote-threshold": 1}),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": 1}}),
        ("blockdev-add", {"driver": "blkdebug", "image": "x", "max-discard": 2**40}),
        (
            "blockdev-add",
            {"driver": "blklogwrites", "file": "x", "log": "y", "log-sector-size": -1},
        ),
        ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}),
        ("query-version", {"a": 1, "b": 2, "c": 3}),
        ("block-job-set-speed", {"device": "x", "speed": 2**63}),
    ],
)
def test_named_message_forms(command: str, args: dict[str, Any]) -> None:
    sent = {**args, PROBE: 0}
    assert _error(command, sent) == _qemu(command, args)


def test_valid_arguments_are_returned() -> None:
    args = {"driver": "raw", "node-name": "a", "file": "f"}
    assert load().validate_arguments("blockdev-add", args) == args
    assert load().validate_arguments("query-version", {}) == {}


def test_negative_unsigned_values_wrap_as_in_qemu() -> None:
    # QEMU accepts a negative int64 for a uint64 member and stores it
    # modulo 2**64 ("backward compatibility" in qobject-input-visitor.c).
    schema = load()
    out = schema.validate_arguments(
        "block-set-write-threshold", {"node-name": "n", "write-threshold": -1}
    )
    assert out == {"node-name": "n", "write-threshold": 2**64 - 1}
    # QEMU accepts it (recorded: only the probe key is refused).
    assert _qemu("block-set-write-threshold", {"node-name": "n", "write-threshold": -1}) == (
        f"Parameter '{PROBE}' is unexpected"
    )
