"""Every ``scripts/*.qmp`` run against qemu-storage-daemon and qmpgraph.

The harness and the script format are described in ``harness.py``.

Runs spend most of their time waiting for quiet windows, so the selected
scripts all start at once on a small thread pool (``QMPGRAPH_DIFF_JOBS``,
default 8); each test then reports its own script's result. The last test
checks the committed conformance report (``docs/conformance.md``) against the
same runs, so CI runs every script once, not once per check.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import REPO_ROOT, Result, load_script, run_differential, script_paths

SCRIPTS = script_paths()
JOBS = int(os.environ.get("QMPGRAPH_DIFF_JOBS", "8"))


class Runs:
    """The scripts' runs, started on a shared pool; more start on demand."""

    def __init__(self, pool: ThreadPoolExecutor, qsd: str) -> None:
        self.pool = pool
        self.qsd = qsd
        self.futures: dict[Path, Future[Result]] = {}

    def start(self, path: Path) -> None:
        if path not in self.futures:
            self.futures[path] = self.pool.submit(run_differential, load_script(path), self.qsd)

    def result(self, path: Path) -> Result:
        self.start(path)
        return self.futures[path].result()


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Iterator[Runs]:
    """Every selected script's run, started at once."""
    from conftest import require_qemu

    qsd = require_qemu()
    with ThreadPoolExecutor(max(1, JOBS), thread_name_prefix="differential") as pool:
        started = Runs(pool, qsd)
        for item in request.session.items:
            if isinstance(item, pytest.Function) and item.module is not None:
                path = getattr(item, "callspec", None) and item.callspec.params.get("path")
                if item.module.__name__ == __name__ and isinstance(path, Path):
                    started.start(path)
        yield started
        for future in started.futures.values():
            future.cancel()


@pytest.mark.qemu
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script(path: Path, runs: Runs) -> None:
    """The normalized transcripts of both daemons are identical."""
    script = load_script(path)
    result = runs.result(path)
    if result.equal and script.xfail is not None:
        pytest.fail(f"{path.name} now matches QEMU: remove its '#! xfail:' line", pytrace=False)
    if not result.equal and script.xfail is not None:
        print(result.diff())  # for -s; tools/record_diff.py --diff shows it too
        pytest.xfail(script.xfail)
    if not result.equal:
        pytest.fail(f"{path.name}: transcripts differ\n{result.diff()}", pytrace=False)


@pytest.mark.qemu
def test_committed_conformance_report_matches_these_runs(runs: Runs) -> None:
    """docs/conformance.md, pass column included, is what these runs give.

    The offline columns are checked in tests/conformance without QEMU.
    """
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import conformance_report as report

    passed = {path.name: runs.result(path).equal for path in SCRIPTS}
    live = report.render(report.rows(passed), passed)
    committed = report.DOC.read_text(encoding="utf-8")
    if live != committed:
        diff = "\n".join(
            difflib.unified_diff(
                committed.splitlines(), live.splitlines(), "committed", "live", lineterm=""
            )
        )
        pytest.fail(f"{report.HOW}\n{diff}", pytrace=False)
