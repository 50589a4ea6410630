"""The differential harness itself: script parsing, splitting, normalization.

These need no QEMU; ``test_scripts.py`` runs the scripts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import normalize, parse_script, run_differential, split_messages

TMP = "/tmp/qdabc123/tmp"


def test_parse_directives_and_steps() -> None:
    """Directives fill the script; '>' adds a newline, '>>' decodes escapes only."""
    script = parse_script(
        "# comment\n"
        "#! args: --blockdev 'driver=null-co,node-name=a b'\n"
        "#! setup: touch $TMP/x\n"
        "#! quiet: 300\n"
        "#! monitor: pretty=on\n"
        "#! xfail: not yet\n"
        "\n"
        '> {"execute": "qmp_capabilities"}\n'
        ">> {'bad \\xff\\r\\n\n"
    )
    assert script.args == ("--blockdev", "driver=null-co,node-name=a b")
    assert script.setup == ("touch $TMP/x",)
    assert script.quiet == 0.3
    assert script.monitor_options == "pretty=on"
    assert script.xfail == "not yet"
    assert [s.data(TMP) for s in script.steps] == [
        b'{"execute": "qmp_capabilities"}\n',
        b"{'bad \xff\r\n",
    ]


def test_reply_expected_only_on_a_clean_stream() -> None:
    """After raw bytes or non-command text, replies are waited for by silence."""
    script = parse_script('> {"execute": "a"}\n> {"exec-oob": "b"}\n> [1]\n> {"execute": "c"}\n')
    assert [s.expects_reply for s in script.steps] == [True, True, False, False]
    script = parse_script('>> {\n> {"execute": "a"}\n')
    assert [s.expects_reply for s in script.steps] == [False, False]


def test_tmp_substitution() -> None:
    """$TMP is replaced in steps and arguments."""
    script = parse_script('#! args: --x $TMP/a\n> {"f": "$TMP/b"}\n')
    assert script.daemon_args(TMP) == ["--x", f"{TMP}/a"]
    assert script.steps[0].data(TMP) == f'{{"f": "{TMP}/b"}}\n'.encode()


@pytest.mark.parametrize("line", ["bogus", "#! nosuch: 1", "#!args"])
def test_bad_lines_are_rejected(line: str) -> None:
    """Typos in scripts fail loudly instead of being skipped."""
    with pytest.raises(ValueError, match=r"<script>:1"):
        parse_script(line + "\n")


def test_split_keeps_terminators_and_partials() -> None:
    """Messages keep their CRLF; an unterminated tail is its own message."""
    assert split_messages(b"a\r\nb\nc\r\nd") == [b"a\r\n", b"b\nc\r\n", b"d"]
    assert split_messages(b"") == []


def test_normalize_only_random_parts() -> None:
    """Timestamps, package, auto node names and the temp dir; nothing else."""
    event = (
        b'{"timestamp": {"seconds": 1700000000, "microseconds": 12}, '
        b'"event": "X", "data": {"node": "#block123", "file": "' + TMP.encode() + b'/a"}}\r\n'
    )
    assert normalize(event, TMP) == (
        b'{"timestamp": {"seconds": N, "microseconds": N}, '
        b'"event": "X", "data": {"node": "#block1RR", "file": "$TMP/a"}}\r\n'
    )
    # The counter stays compared: only the last two digits are random.
    assert normalize(b'"#block080"', TMP) == b'"#block0RR"'
    assert normalize(b'"#block1299"', TMP) == b'"#block12RR"'
    version = b'{"return": {"package": "Debian 1:7.2 \\"x\\""}, "id": 5}\r\n'
    assert normalize(version, TMP) == b'{"return": {"package": "<package>"}, "id": 5}\r\n'
    other = b'{"return": {"seconds": 1, "name": "block1"}}\r\n'
    assert normalize(other, TMP) == other


def test_normalize_pretty_timestamp_across_lines() -> None:
    """With pretty=on every line ends with CRLF; timestamps still normalize."""
    from harness import Record, Transcript

    lines = [b"{\r\n", b'    "timestamp": {\r\n', b'        "seconds": 17,\r\n']
    lines += [b'        "microseconds": 5\r\n', b"    }\r\n", b"}\r\n"]
    transcript = Transcript("x", [Record("step", lines)])
    ((_, messages, _),) = transcript.normalized(TMP)
    assert messages[2:4] == (b'        "seconds": N,\r\n', b'        "microseconds": N\r\n')


# A stand-in daemon for the harness's own tests: it listens where --chardev
# says, greets (twice while the file named by FAKE_TWICE does not exist yet,
# creating it, so only its first run glitches; FAKE_TWICE=always keeps
# glitching) and answers every line with an empty return, or with
# {"run": N} when FAKE_RUNS names a file counting its runs (N: this run's
# number modulo FAKE_MOD), or {"run": FAKE_FIXED} when that is set.
_FAKE_DAEMON = r"""
import os, socket, sys
path = next(a.split("path=")[1].split(",")[0] for a in sys.argv if "path=" in a)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
conn, _ = srv.accept()
greeting = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'
marker = os.environ.get("FAKE_TWICE", "")
twice = marker == "always" or (marker and not os.path.exists(marker))
if marker and marker != "always":
    open(marker, "w").close()
conn.sendall(greeting * (2 if twice else 1))
reply = b'{"return": {}}\r\n'
if os.environ.get("FAKE_RUNS"):
    counter = os.environ["FAKE_RUNS"]
    run = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(run + 1))
    reply = b'{"return": {"run": %d}}\r\n' % (run % int(os.environ["FAKE_MOD"]))
elif os.environ.get("FAKE_FIXED"):
    reply = b'{"return": {"run": %d}}\r\n' % int(os.environ["FAKE_FIXED"])
buf = b""
while chunk := conn.recv(4096):
    buf += chunk
    while b"\n" in buf:
        _, buf = buf.split(b"\n", 1)
        conn.sendall(reply)
"""


def _fake(tmp_path: Path, name: str, twice: str, env: str = "") -> str:
    """An executable that runs the stand-in daemon with FAKE_TWICE (and ``env``) set."""
    code = tmp_path / "fake.py"
    code.write_text(_FAKE_DAEMON)
    wrapper = tmp_path / name
    wrapper.write_text(
        f'#!/bin/sh\nFAKE_TWICE="{twice}" {env} exec "{sys.executable}" "{code}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_double_greeting_from_qemu_is_run_again(tmp_path: Path) -> None:
    """QEMU greeting twice on one connection (a race of its own) is not
    qmpgraph's fault: the run is repeated once, and a repeat glitch stands."""
    script = parse_script('> {"execute": "qmp_capabilities"}\n', "twice")
    marker = tmp_path / "greeted"
    honest = [_fake(tmp_path, "honest", "")]
    result = run_differential(script, _fake(tmp_path, "once", str(marker)), honest)
    assert result.equal, result.diff()
    assert marker.exists()  # the glitching first run really happened
    result = run_differential(script, _fake(tmp_path, "always", "always"), honest)
    assert not result.equal
    assert result.oracle_glitch == "greeted twice"


def test_qemu_giving_qmpgraphs_answer_in_another_run_is_a_match(tmp_path: Path) -> None:
    """A QEMU that answers a script in more than one way (its own races): a
    mismatch is followed by QEMU-only runs, and qmpgraph matches when one of
    them gives exactly its transcript; an answer QEMU never gives still fails."""
    script = parse_script('> {"execute": "qmp_capabilities"}\n', "variants")
    counter = tmp_path / "runs"
    qemu = _fake(tmp_path, "qemu", "", f"FAKE_RUNS={counter} FAKE_MOD=3")
    # QEMU's first run answers run 0, the next ones 1 and 2: found in its third run.
    result = run_differential(script, qemu, [_fake(tmp_path, "two", "", "FAKE_FIXED=2")])
    assert result.equal, result.diff()
    assert result.oracle_runs == 3
    assert counter.read_text() == "3"
    # An answer QEMU never gives: every rerun is spent, and the diff stands.
    counter.unlink()
    result = run_differential(script, qemu, [_fake(tmp_path, "seven", "", "FAKE_FIXED=7")])
    assert not result.equal
    assert counter.read_text() == "4"  # the first run and ORACLE_RERUNS more
    assert '"run": 7' in result.diff()
