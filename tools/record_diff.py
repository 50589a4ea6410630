#!/usr/bin/env python3
"""Print what qemu-storage-daemon answers to a differential script.

For script authors: ``tools/record_diff.py tests/differential/scripts/x.qmp``
prints QEMU's normalized transcript (the expected side of the test);
``--diff`` also runs qmpgraph and prints the unified diff (or "identical");
``--self`` compares QEMU with itself, to check that a script is deterministic.
The script format is described in ``tests/differential/harness.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "differential"))

from harness import load_script, record_reference, run_differential


def main(argv: list[str] | None = None) -> int:
    """Record QEMU's transcript of each script given; optionally compare."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scripts", nargs="+", type=Path)
    parser.add_argument("--diff", action="store_true", help="also run qmpgraph and compare")
    parser.add_argument("--self", action="store_true", help="compare QEMU with itself")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    args = parser.parse_args(argv)
    if args.qsd is None:
        print("qemu-storage-daemon not found (use --qsd PATH)", file=sys.stderr)
        return 2
    status = 0
    for path in args.scripts:
        script = load_script(path)
        print(f"=== {path.name}")
        if not (args.diff or args.self):
            print("\n".join(record_reference(script, args.qsd)))
            continue
        if args.self:  # QEMU against itself: no reruns, a difference is the answer
            result = run_differential(script, args.qsd, [args.qsd], oracle_reruns=0)
        else:
            result = run_differential(script, args.qsd)
        print("\n".join(result.reference))
        if result.equal:
            print("--- identical")
        else:
            print(result.diff())
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
