"""Every ``scripts/*.qmp`` run against qemu-storage-daemon and qmpgraph.

The harness and the script format are described in ``harness.py``.

Runs spend most of their time waiting for quiet windows, so the selected
scripts all start at once on a small thread pool (``QMPGRAPH_DIFF_JOBS``,
default 8); each test then reports its own script's result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import Result, load_script, run_differential, script_paths

SCRIPTS = script_paths()
JOBS = int(os.environ.get("QMPGRAPH_DIFF_JOBS", "8"))


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest) -> Iterator[dict[Path, Future[Result]]]:
    """Start every selected script's run; the futures by script path."""
    from conftest import require_qemu

    qsd = require_qemu()
    selected: list[Path] = []
    for item in request.session.items:
        if isinstance(item, pytest.Function) and item.module is not None:
            path = getattr(item, "callspec", None) and item.callspec.params.get("path")
            if item.module.__name__ == __name__ and isinstance(path, Path):
                selected.append(path)
    with ThreadPoolExecutor(max(1, JOBS), thread_name_prefix="differential") as pool:
        futures = {p: pool.submit(run_differential, load_script(p), qsd) for p in selected}
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.qemu
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script(path: Path, results: dict[Path, Future[Result]]) -> None:
    """The normalized transcripts of both daemons are identical."""
    script = load_script(path)
    result = results[path].result()
    if result.equal and script.xfail is not None:
        pytest.fail(f"{path.name} now matches QEMU: remove its '#! xfail:' line", pytrace=False)
    if not result.equal and script.xfail is not None:
        print(result.diff())  # for -s; tools/record_diff.py --diff shows it too
        pytest.xfail(script.xfail)
    if not result.equal:
        pytest.fail(f"{path.name}: transcripts differ\n{result.diff()}", pytrace=False)
