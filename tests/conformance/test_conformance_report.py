"""The committed conformance report (``docs/conformance.md``) is up to date.

Offline: the command list, the implemented column and the script counts are
recomputed from the registry, the schema data and the scripts. The pass
counts are checked against the differential run of the scripts themselves
(``tests/differential/test_scripts.py``, its last test). Either failure says
how to regenerate it (``tools/conformance_report.py --write``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import conformance_report as report

HOW = report.HOW


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
