"""The committed conformance report (``docs/conformance.md``) is up to date.

Offline: the command list, the implemented column and the script counts are
recomputed from the registry, the schema data and the scripts. With QEMU:
the whole report, pass counts included, is regenerated from a live
differential run and must equal the committed text. Either failure says how
to regenerate it (``tools/conformance_report.py --write``).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import conformance_report as report

HOW = (
    "docs/conformance.md is out of date: regenerate it with "
    "`/tmp/v/bin/python tools/conformance_report.py --write` "
    "(or `.venv/bin/python tools/conformance_report.py --write`; it runs QEMU)"
)


def test_step_command_reads_execute_and_exec_oob() -> None:
    assert report.step_command('> {"execute": "quit"}') == "quit"
    assert report.step_command('> {"exec-oob": "query-version", "id": 1}') == "query-version"
    assert report.step_command(">> {'execute': 'quit'}") is None  # not JSON
    assert report.step_command('>> {"execute": "query-block"}\\n') == "query-block"
    assert report.step_command('> {"execute": 1}') is None
    assert report.step_command("> [1, 2]") is None
    assert report.step_command('> {"execute": "quit"') is None
    assert report.step_command("> " + "[" * 100_000) is None


def test_committed_report_lists_what_is_implemented_and_covered() -> None:
    committed = report.parse_doc(report.DOC.read_text(encoding="utf-8"))
    current = {r.command: ("yes" if r.implemented else "no", len(r.scripts)) for r in report.rows()}
    assert list(committed) == list(current), HOW
    stale = {
        name: {"committed": committed[name][:2], "now": now}
        for name, now in current.items()
        if committed[name][:2] != now
    }
    assert not stale, f"{HOW}\n{stale}"


@pytest.mark.qemu
def test_committed_report_matches_a_live_differential_run() -> None:
    from conftest import require_qemu

    qsd = require_qemu()
    live = report.live_report(qsd, int(os.environ.get("QMPGRAPH_DIFF_JOBS", "8")))
    committed = report.DOC.read_text(encoding="utf-8")
    if live != committed:
        diff = "\n".join(
            difflib.unified_diff(
                committed.splitlines(), live.splitlines(), "committed", "live", lineterm=""
            )
        )
        pytest.fail(f"{HOW}\n{diff}", pytrace=False)
