"""Replay of recorded transaction logs, and divergence detection.

The logs in ``logs/`` were recorded by ``scenarios.py`` against images made
by ``images.py``; replay runs with ``--base-dir`` pointing at a fresh copy of
those images.
"""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from images import make_images
from scenarios import NAME_SEED, SCENARIOS, record

from qmpgraph.replay import main, replay

LOGS = sorted((Path(__file__).parent / "logs").glob("*.jsonl"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory holding the images the logs refer to."""
    d = tmp_path / "images"
    d.mkdir()
    make_images(d)
    return d


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out, err)
    return code, out.getvalue() + err.getvalue()


def test_every_scenario_has_a_log() -> None:
    """Each scenario's log is committed (re-record with scenarios.py)."""
    assert {p.stem for p in LOGS} == set(SCENARIOS)


@pytest.mark.parametrize("log", LOGS, ids=[p.stem for p in LOGS])
def test_recorded_log_replays(log: Path, images: Path) -> None:
    """Every step of every recorded log has the recorded outcome and digest."""
    code, text = _run([str(log), "--base-dir", str(images)])
    assert code == 0, text
    assert "all match" in text


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fresh_recording_equals_committed_log(name: str, tmp_path: Path) -> None:
    """Recording a scenario now gives the committed log's outcomes and digests."""
    work = tmp_path / "w"
    work.mkdir()
    fresh = tmp_path / "fresh.jsonl"
    record(name, work, fresh)
    committed = Path(__file__).parent / "logs" / f"{name}.jsonl"

    def summary(path: Path) -> list[tuple[object, ...]]:
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        return [(r.get("seq"), r.get("outcome"), r.get("error"), r.get("digest")) for r in rows]

    assert summary(fresh) == summary(committed)


def _tamper(log: Path, dest: Path, lineno: int, change: str) -> None:
    lines = log.read_bytes().splitlines()
    rec = orjson.loads(lines[lineno - 1])
    if change == "digest":
        rec["digest"] = "0" * 64
    elif change == "outcome":
        rec["outcome"] = "committed" if rec["outcome"] == "aborted" else "aborted"
    elif change == "argument":
        rec["arguments"]["node-name"] = "renamed"
    lines[lineno - 1] = orjson.dumps(rec)
    dest.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("change", ["digest", "outcome", "argument"])
def test_tampered_log_diverges(change: str, images: Path, tmp_path: Path) -> None:
    """A changed record is caught at its line, with exit status 1."""
    log = Path(__file__).parent / "logs" / "backing-chain.jsonl"
    bad = tmp_path / "bad.jsonl"
    _tamper(log, bad, 4, change)  # line 4: the third transaction (adds "top")
    code, text = _run([str(bad), "--base-dir", str(images)])
    assert code == 1, text
    assert "line 4:" in text
    assert "expected:" in text and "actual:" in text


def test_missing_images_diverge(tmp_path: Path) -> None:
    """Without the images the first open fails where the log says it succeeded."""
    log = Path(__file__).parent / "logs" / "backing-chain.jsonl"
    code, text = _run([str(log), "--base-dir", str(tmp_path)])
    assert code == 1
    assert "line 2:" in text and "outcome" in text


def test_unreadable_log_exits_2(tmp_path: Path) -> None:
    """A log that is not JSON Lines is an error, not a divergence."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code, text = _run([str(bad)])
    assert code == 2
    assert "line 1" in text


def test_replay_restores_working_directory(images: Path) -> None:
    """``--base-dir`` applies only while replaying."""
    import os

    before = os.getcwd()
    matched, div = replay(LOGS[0], base_dir=str(images))
    assert div is None and matched > 0
    assert os.getcwd() == before


def test_seed_is_recorded() -> None:
    """The header carries the name seed the scenarios used."""
    header = orjson.loads(LOGS[0].read_bytes().splitlines()[0])
    assert header == {"qmpgraph-transaction-log": 1, "name-seed": NAME_SEED}
