"""Every ``scripts/*.qmp`` run against qemu-storage-daemon and qmpgraph.

The harness and the script format are described in ``harness.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import load_script, run_differential, script_paths

SCRIPTS = script_paths()


@pytest.mark.qemu
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script(path: Path, qsd_path: str) -> None:
    """The normalized transcripts of both daemons are identical."""
    script = load_script(path)
    result = run_differential(script, qsd_path)
    if not result.equal and script.xfail is not None:
        pytest.xfail(f"{script.xfail}\n{result.diff()}")
    if not result.equal:
        pytest.fail(f"{path.name}: transcripts differ\n{result.diff()}", pytrace=False)
