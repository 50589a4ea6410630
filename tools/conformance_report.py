#!/usr/bin/env python3
"""Conformance report: qemu-storage-daemon 7.2's commands against qmpgraph.

For every command of QEMU 7.2's qemu-storage-daemon schema (the committed
data in ``qmpgraph/schema/data/``, in QEMU's registration order) the report
says whether qmpgraph implements it (it is in ``qmpgraph.commands.REGISTRY``),
how many differential scripts (``tests/differential/scripts/*.qmp``) execute
it, and how many of those scripts matched QEMU in a live differential run.

Usage::

    tools/conformance_report.py              # run every script against QEMU, print the report
    tools/conformance_report.py --write      # ... and write docs/conformance.md
    tools/conformance_report.py --offline    # no QEMU: the pass column is left out

What counts as executing a command, kept simple on purpose: a script step
``> text`` or ``>> bytes`` whose text is one complete JSON object with a
string ``execute`` or ``exec-oob`` member executes that command, whatever
its arguments (a step made to fail still exercises the command's checks).
The actions inside a ``transaction`` are not counted as commands of their
own; a script counts once per command however often it sends it. Options
such as ``--blockdev`` on a script's ``#! args:`` line are not counted.
A script passes when its normalized transcripts are identical, or when
QEMU, run again, gives exactly qmpgraph's transcript (``run_differential``:
QEMU is not deterministic everywhere); a script marked ``#! xfail:`` that
still differs does not pass.

The generated document is deterministic: no timings, fixed order. The test
``tests/conformance/test_conformance_report.py`` fails when the committed document is
out of date for the implemented and script-count columns (offline), and the
last test of ``tests/differential/test_scripts.py`` when the pass column
differs from its own differential run.

What does not live here: the differential harness itself
(``tests/differential/harness.py``, imported from there).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance.md"
sys.path.insert(0, str(ROOT / "tests" / "differential"))

from harness import Script, load_script, run_differential, script_paths  # noqa: E402

import qmpgraph.commands  # noqa: E402
from qmpgraph.schema import load as load_schema  # noqa: E402

REGENERATE = "/tmp/v/bin/python tools/conformance_report.py --write (or .venv/bin/python ...)"


@dataclass(frozen=True, slots=True)
class Row:
    """One command's line of the report; ``passing`` is None when not run."""

    command: str
    implemented: bool
    scripts: tuple[str, ...]
    passing: int | None = None


def step_command(source: str) -> str | None:
    """The command a script line executes, or None (see the module docstring)."""
    if source.startswith(">> "):
        # The harness sends the bytes of a Python bytes literal body.
        raw, _ = codecs.escape_decode(source[3:].encode())
        text = bytes(raw).decode("utf-8", "replace")
    elif source.startswith("> "):
        text = source[2:]
    else:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # wire-limits.qmp nests deeper than json allows
        return None
    if not isinstance(value, dict):
        return None
    for key in ("execute", "exec-oob"):
        name = value.get(key)
        if isinstance(name, str):
            return name
    return None


def script_commands(script: Script) -> set[str]:
    """Every command some step of ``script`` executes."""
    found = {step_command(step.source) for step in script.steps}
    found.discard(None)
    return {c for c in found if c is not None}


def coverage(paths: Iterable[Path] | None = None) -> dict[str, set[str]]:
    """Command name -> names of the scripts that execute it."""
    covered: dict[str, set[str]] = {}
    for path in script_paths() if paths is None else paths:
        for name in script_commands(load_script(path)):
            covered.setdefault(name, set()).add(path.name)
    return covered


#: What a failing check of the committed report says to do.
HOW = (
    "docs/conformance.md is out of date: regenerate it with "
    "`/tmp/v/bin/python tools/conformance_report.py --write` "
    "(or `.venv/bin/python tools/conformance_report.py --write`; it runs QEMU)"
)


def rows(passed: Mapping[str, bool] | None = None) -> list[Row]:
    """The report's rows: QEMU's commands in QEMU's order, then qmpgraph-only ones.

    ``passed`` maps script file names to whether they matched QEMU; without
    it the pass column is left empty. With it, exactly the scripts that ran
    are counted (scripts may be added while the run goes on).
    """
    schema_names = load_schema().command_names
    implemented = set(qmpgraph.commands.REGISTRY)
    extra = sorted(implemented - set(schema_names))
    paths = script_paths()
    if passed is not None:
        paths = [p for p in paths if p.name in passed]
    covered = coverage(paths)
    out = []
    for name in [*schema_names, *extra]:
        scripts = tuple(sorted(covered.get(name, ())))
        passing = None if passed is None else sum(1 for s in scripts if passed.get(s))
        out.append(Row(name, name in implemented, scripts, passing))
    return out


def run_scripts(qsd: str, jobs: int = 8) -> dict[str, bool]:
    """Run every differential script against ``qsd`` and qmpgraph: name -> matched."""
    paths = script_paths()
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="conformance") as pool:
        futures = {p.name: pool.submit(run_differential, load_script(p), qsd) for p in paths}
        passed = {name: f.result().equal for name, f in futures.items()}
    # Running many scripts at once (two daemons each) loads the machine far
    # more than the test suite does, and the job scripts compare where events
    # fall against replies: a script that differs here is judged by a run of
    # its own, as tests/differential/test_scripts.py runs it.
    for path in paths:
        if not passed[path.name]:
            passed[path.name] = run_differential(load_script(path), qsd).equal
    return passed


def render(table: list[Row], passed: Mapping[str, bool] | None = None) -> str:
    """The report as Markdown (the text of ``docs/conformance.md``)."""
    schema_names = set(load_schema().command_names)
    qemu = [r for r in table if r.command in schema_names]
    done = sum(r.implemented for r in qemu)
    with_scripts = sum(1 for r in qemu if r.implemented and r.scripts)
    lines = [
        "# Conformance with qemu-storage-daemon 7.2",
        "",
        "<!-- Generated by tools/conformance_report.py --write; do not edit by hand. -->",
        "",
        "Every command of QEMU 7.2's `qemu-storage-daemon` QMP schema, whether",
        "qmpgraph implements it, how many differential scripts",
        "(`tests/differential/scripts/*.qmp`) execute it, and how many of those",
        "scripts give the same transcript from qmpgraph as from QEMU. A script",
        "counts for a command when one of its steps is a JSON object whose",
        "`execute` or `exec-oob` names it (actions inside `transaction` count for",
        "`transaction` only); see `tools/conformance_report.py` for the details.",
        "",
        f"Implemented: {done} of {len(qemu)} commands; {with_scripts} of them are",
        "covered by differential scripts.",
    ]
    if passed is not None:
        ok = sum(passed.values())
        lines.append(f"Differential scripts matching QEMU: {ok} of {len(passed)}.")
    lines += ["", "| Command | Implemented | Scripts | Passing |", "|---|---|---|---|"]
    for r in table:
        passing = "" if r.passing is None else str(r.passing)
        mark = "yes" if r.implemented else "no"
        lines.append(f"| `{r.command}` | {mark} | {len(r.scripts)} | {passing} |")
    if passed is not None:
        failing = sorted(name for name, ok in passed.items() if not ok)
        lines += ["", "Scripts that do not match QEMU yet:", ""]
        lines += [f"- `{name}`" for name in failing] or ["- none"]
    return "\n".join(lines) + "\n"


def parse_doc(text: str) -> dict[str, tuple[str, int, str]]:
    """The table of a rendered report: command -> (implemented, scripts, passing)."""
    table: dict[str, tuple[str, int, str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            table[cells[0].strip("`")] = (cells[1], int(cells[2]), cells[3])
    return table


def live_report(qsd: str, jobs: int) -> str:
    """The full report from a fresh differential run against ``qsd``."""
    passed = run_scripts(qsd, jobs)
    return render(rows(passed), passed)


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--write`` store) the conformance report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write {DOC.relative_to(ROOT)}")
    parser.add_argument("--offline", action="store_true", help="do not run QEMU (no pass column)")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("QMPGRAPH_DIFF_JOBS", "8")))
    args = parser.parse_args(argv)
    if args.offline:
        if args.write:
            parser.error("--write needs the live run (drop --offline)")
        text = render(rows())
    else:
        if args.qsd is None:
            print("qemu-storage-daemon not found (use --qsd PATH or --offline)", file=sys.stderr)
            return 2
        text = live_report(args.qsd, args.jobs)
    sys.stdout.write(text)
    if args.write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
