"""tools/fuzz_diff.py's generator, offline (no QEMU): deterministic, well formed, safe.

Running the generated scripts against both daemons is the tool's job; here
only the scripts themselves are checked: the same seed gives the same text,
each parses in the harness's format, every command is one qmpgraph
implements, and none holds a pattern that crashes qemu-storage-daemon 7.2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "differential"))

import fuzz_diff
from harness import parse_script

import qmpgraph.commands  # noqa: F401  (registers the commands)
from qmpgraph.commands.registry import REGISTRY

SEEDS = range(40)


def _commands(seed: int) -> list[dict[str, Any]]:
    script = parse_script(fuzz_diff.generate(seed), f"fuzz-{seed}")
    assert script.steps, seed
    out = []
    for step in script.steps:
        assert step.expects_reply, step.source
        out.append(json.loads(step.template))
    return out


def test_generation_is_deterministic_per_seed() -> None:
    for seed in SEEDS:
        assert fuzz_diff.generate(seed) == fuzz_diff.generate(seed)
    assert len({fuzz_diff.generate(seed) for seed in SEEDS}) == len(SEEDS)


def test_scripts_parse_and_use_implemented_commands() -> None:
    for seed in SEEDS:
        script = parse_script(fuzz_diff.generate(seed), f"fuzz-{seed}")
        assert script.setup and script.args
        for cmd in _commands(seed):
            assert cmd["execute"] in REGISTRY, (seed, cmd)


def test_scripts_avoid_what_crashes_qsd() -> None:
    reserved = {f"{n}/{b}" for n, b in fuzz_diff.RESERVED_BITMAPS}
    for seed in SEEDS:
        for cmd in _commands(seed):
            args = cmd.get("arguments", {})
            if cmd["execute"] == "block-dirty-bitmap-merge":
                assert args["bitmaps"], seed
            if cmd["execute"] == "block-dirty-bitmap-add":
                assert args["node"] not in fuzz_diff.FILE_NODES, seed
            if cmd["execute"] != "transaction":
                continue
            kinds = {a["type"].removeprefix("block-dirty-bitmap-") for a in args["actions"]}
            if args.get("properties", {}).get("completion-mode") == "grouped":
                assert not kinds & {"enable", "disable", "merge"}, seed
            for act in args["actions"]:
                data = act["data"]
                if act["type"] in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
                    assert f"{data['node']}/{data['name']}" in reserved, (seed, act)
                if act["type"] == "block-dirty-bitmap-merge":
                    assert data["bitmaps"], seed
                if act["type"] == "block-dirty-bitmap-add":
                    assert data["node"] not in fuzz_diff.FILE_NODES, seed
