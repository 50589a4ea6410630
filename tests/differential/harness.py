"""Differential harness: one QMP script against qemu-storage-daemon and qmpgraph.

What lives here: the script parser, the two daemon runners, transcript
collection and normalization, and the diff. What does not: the pytest
parametrization (``test_scripts.py``) and the scripts (``scripts/*.qmp``).

Adding a script
===============

Create ``tests/differential/scripts/<area>-<what>.qmp``; ``test_scripts.py``
picks it up automatically. One step per line::

    # a comment
    #! args: --blockdev driver=null-co,node-name=n0
    #! setup: qemu-img create -f qcow2 $TMP/a.qcow2 1M
    #! quiet: 300
    #! monitor: pretty=on
    #! xfail: blockdev-add is not implemented yet
    > {"execute": "qmp_capabilities"}
    >> {'bad \\xff

* ``#! args:`` extra daemon arguments (shell-quoted). The harness always adds
  ``--chardev socket,id=qmp,path=...,server=on,wait=off --monitor qmp``.
* ``#! setup:`` a shell command run (in ``$TMP``) before the daemon starts,
  e.g. to create images; may be repeated. A failing setup fails the test.
* ``#! monitor:`` options appended to the harness's ``--monitor qmp``
  (e.g. ``pretty=on``).
* ``#! xfail:`` the reason qmpgraph is known not to match yet; the test is
  then reported as xfail, and fails once it matches (remove the line then).
* ``#! settle:`` milliseconds of silence that end a command's step once its
  reply came (default ``QMPGRAPH_DIFF_SETTLE_MS``), for scripts whose jobs
  send events a while after the reply (e.g. after an fsync).
* ``#! quiet:`` milliseconds of silence that end a step which is not a plain
  command (default ``QMPGRAPH_DIFF_QUIET_MS`` or 200).
* ``> text`` sends ``text`` plus ``"\\n"``.
* ``>> body`` sends the bytes of the Python bytes literal ``b'body'`` (escapes
  such as ``\\xff``, ``\\r``, ``\\n`` work), with no newline added.
* ``$TMP`` anywhere is replaced by a per-daemon temporary directory.

To see what QEMU answers, run ``tools/record_diff.py SCRIPT`` (``--diff`` also
runs qmpgraph and prints the comparison).

How replies are collected
=========================

Each step's bytes go to both daemons at once. For qemu-storage-daemon the
step ends once the connection, after a first message, has been quiet for a
settle window (``QMPGRAPH_DIFF_SETTLE_MS``, 100); a step with no reply ends
after the quiet window. When the step is a complete ``{"execute": ...}``
object on a clean stream, a reply is certain, so the harness waits for it as
long as it takes (up to 10 s), and a slow command is not cut short.
qmpgraph is then read until it has sent as many messages as QEMU did (and
closed the connection if QEMU did), with a timeout, and watched briefly for
anything extra. When the transcripts differ, QEMU alone runs the script up
to ``ORACLE_RERUNS`` more times: QEMU answers a few scripts in more than one
way, and a QEMU transcript equal to qmpgraph's is a match (``record_diff.py
--self`` finds such scripts; prefer making them deterministic).

A transcript is the greeting plus each step's messages (raw bytes split after
each CRLF, so framing and formatting differences show), whether the daemon
closed the connection, and at the end whether the process is still alive or
its exit status. A daemon that exits before accepting the connection (a
command-line error) is compared by exit status and stderr, with the leading
program name normalized. Normalized, and nothing else: event timestamps, the
``package`` string, the two random digits that end an auto node name
(``#block123`` -> ``#block1RR``: the counter before them is deterministic
and stays compared) and
the temporary directory (``$TMP``).
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"

START_TIMEOUT = 15.0  # seconds for a daemon to accept the QMP connection
REPLY_TIMEOUT = 10.0  # seconds to wait for an expected reply
EXIT_TIMEOUT = 5.0  # seconds for a daemon to exit after quit / SIGTERM


def _env_ms(name: str, default: int) -> float:
    return int(os.environ.get(name, default)) / 1000.0


# Silence that ends a step with no reply expected, and the settle time after
# an expected reply. Raise them on a loaded machine (e.g. QMPGRAPH_DIFF_QUIET_MS=500).
QUIET = _env_ms("QMPGRAPH_DIFF_QUIET_MS", 200)
SETTLE = _env_ms("QMPGRAPH_DIFF_SETTLE_MS", 100)
# How long qmpgraph is watched for extra messages once it matched QEMU's count.
EXTRA = _env_ms("QMPGRAPH_DIFF_EXTRA_MS", 50)
# qmpgraph sent part of a step's messages and then nothing for this long: it
# will not send the rest, stop waiting (the transcripts differ anyway).
STALL = _env_ms("QMPGRAPH_DIFF_STALL_MS", 1000)


# --------------------------------------------------------------------------
# Scripts


@dataclass(frozen=True, slots=True)
class Step:
    """One line that sends bytes; ``source`` is the line as written."""

    source: str
    template: bytes
    expects_reply: bool

    def data(self, tmp: str) -> bytes:
        """The bytes to send, with ``$TMP`` replaced by ``tmp``."""
        return self.template.replace(b"$TMP", tmp.encode())


@dataclass(frozen=True, slots=True)
class Script:
    """A parsed ``.qmp`` script."""

    name: str
    args: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    quiet: float | None = None
    steps: tuple[Step, ...] = ()
    monitor_options: str = ""
    xfail: str | None = None
    settle: float | None = None

    def daemon_args(self, tmp: str) -> list[str]:
        """The extra daemon arguments, with ``$TMP`` replaced."""
        return [a.replace("$TMP", tmp) for a in self.args]


def _is_command(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and ("execute" in value or "exec-oob" in value)


def parse_script(text: str, name: str = "<script>") -> Script:
    """Parse the script format described in the module docstring."""
    args: list[str] = []
    setup: list[str] = []
    quiet: float | None = None
    monitor = ""
    xfail: str | None = None
    settle: float | None = None
    steps: list[Step] = []
    # A reply is only predictable while every earlier step was one whole JSON
    # value: after raw bytes the streamer may be mid-token.
    clean = True
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        where = f"{name}:{lineno}"
        if line.startswith("#!"):
            key, sep, value = line[2:].partition(":")
            key, value = key.strip(), value.strip()
            if not sep:
                raise ValueError(f"{where}: expected '#! key: value'")
            if key == "args":
                args.extend(shlex.split(value))
            elif key == "setup":
                setup.append(value)
            elif key == "quiet":
                quiet = int(value) / 1000.0
            elif key == "settle":
                settle = int(value) / 1000.0
            elif key == "monitor":
                monitor = value
            elif key == "xfail":
                xfail = value
            else:
                raise ValueError(f"{where}: unknown directive {key!r}")
        elif line.startswith("#") or not line.strip():
            continue
        elif line.startswith(">> "):
            data, _ = codecs.escape_decode(line[3:].encode())
            steps.append(Step(line, bytes(data), expects_reply=False))
            clean = False
        elif line.startswith("> "):
            text = line[2:]
            is_command = _is_command(text)
            steps.append(Step(line, text.encode() + b"\n", expects_reply=clean and is_command))
            clean = clean and is_command
        else:
            raise ValueError(f"{where}: a line starts with '#', '> ' or '>> '")
    return Script(name, tuple(args), tuple(setup), quiet, tuple(steps), monitor, xfail, settle)


def load_script(path: Path) -> Script:
    """Read and parse one script file."""
    return parse_script(path.read_text(encoding="utf-8"), path.name)


def script_paths() -> list[Path]:
    """Every script in ``scripts/``, sorted by name."""
    return sorted(SCRIPTS_DIR.glob("*.qmp"))


# --------------------------------------------------------------------------
# Transcripts


@dataclass(slots=True)
class Record:
    """What one step (or the greeting) produced."""

    label: str
    messages: list[bytes] = field(default_factory=list)
    closed: bool = False


@dataclass(slots=True)
class Transcript:
    """Everything observed from one daemon running one script."""

    daemon: str
    records: list[Record] = field(default_factory=list)
    ending: str = ""
    stderr: str = ""
    failed_start: bool = False

    def normalized(self, tmp: str) -> list[tuple[str, tuple[bytes, ...], bool]]:
        """The comparable form: labels, normalized messages, closed flags."""
        # Normalize a step's bytes as a whole: with pretty=on, QEMU ends every
        # line with CRLF, so a timestamp object spans several "messages".
        return [
            (r.label, tuple(split_messages(normalize(b"".join(r.messages), tmp))), r.closed)
            for r in self.records
        ]

    def render(self, tmp: str) -> list[str]:
        """Readable lines of the normalized transcript, for diffs and authors."""
        lines: list[str] = []
        for label, messages, closed in self.normalized(tmp):
            lines.append(label)
            lines.extend(_render_message(m) for m in messages)
            if closed:
                lines.append("  <connection closed by daemon>")
        lines.append(f"end: {self.ending}")
        if self.failed_start:
            # Command-line errors are the reply here: compare them, minus the
            # program name (QEMU's messages start with "qemu-storage-daemon: ").
            lines.extend("stderr: " + _PROG.sub("<prog>: ", e) for e in self.stderr.splitlines())
        return lines


_TIMESTAMP = re.compile(rb'"timestamp":\s*\{[^{}]*\}')
_DIGITS = re.compile(rb"-?\d+")
_PACKAGE = re.compile(rb'("package":\s*)"(?:[^"\\]|\\.)*"')
# '#block' + the process-wide counter + two random digits (QEMU's id_generate).
_AUTO_NODE = re.compile(rb"#block(\d*)\d\d")
_PROG = re.compile(r"^\S*(?:qemu-storage-daemon|qmpgraph): ")


def normalize(message: bytes, tmp: str) -> bytes:
    """Replace only what is genuinely random between two runs."""
    message = message.replace(tmp.encode(), b"$TMP")
    # The QMP socket lives beside $TMP (query-chardev shows its path).
    message = message.replace(os.path.dirname(tmp).encode() + b"/", b"$BASE/")
    message = _TIMESTAMP.sub(lambda m: _DIGITS.sub(b"N", m.group(0)), message)
    message = _PACKAGE.sub(rb'\1"<package>"', message)
    return _AUTO_NODE.sub(rb"#block\1RR", message)


def _render_message(message: bytes) -> str:
    terminated = message.endswith(b"\r\n")
    body = message[:-2] if terminated else message
    parts = body.split(b"\n")
    text = "\n  | ".join(
        p.decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")
        for p in parts
    )
    return "  " + text + ("" if terminated else "  <no CRLF>")


def split_messages(data: bytes) -> list[bytes]:
    """Split after each CRLF; a trailing unterminated piece is its own message."""
    out: list[bytes] = []
    start = 0
    while (end := data.find(b"\r\n", start)) >= 0:
        out.append(data[start : end + 2])
        start = end + 2
    if start < len(data):
        out.append(data[start:])
    return out


# --------------------------------------------------------------------------
# Daemons


class _Connection:
    """A client socket with a reader thread buffering everything received."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._cond = threading.Condition()
        self._buf = b""
        self._changed = 0.0  # monotonic time of the last arrival
        self.closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                self._changed = time.monotonic()
                if data:
                    self._buf += data
                else:
                    self.closed = True
                self._cond.notify_all()
            if not data:
                return

    def pending(self) -> bytes:
        """The bytes received since the last ``take`` (call under the lock)."""
        return self._buf

    def complete_messages(self) -> int:
        """How many CRLF-terminated messages are buffered."""
        return self._buf.count(b"\r\n")

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (called under the lock) or the timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_or_stall(self, predicate: Callable[[], bool], timeout: float, stall: float) -> bool:
        """Like ``wait``, but also give up once data came and then stopped for ``stall``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                now = time.monotonic()
                if now >= deadline or (self._buf and now - self._changed >= stall):
                    return False
                self._cond.wait(min(deadline - now, stall))
            return True

    def wait_quiet(self, window: float, limit: float) -> None:
        """Wait until nothing arrived for ``window`` seconds (or closed, or limit)."""
        deadline = time.monotonic() + limit
        with self._cond:
            last = max(self._changed, time.monotonic())
            while not self.closed:
                now = time.monotonic()
                remaining = min(last + window, deadline) - now
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
                last = max(last, self._changed)

    def take(self) -> tuple[list[bytes], bool]:
        """Everything buffered so far, split into messages; and whether closed."""
        with self._cond:
            data, self._buf = self._buf, b""
            return split_messages(data), self.closed

    def send(self, data: bytes) -> None:
        """Send ``data``; a daemon that already hung up is not an error here."""
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def close(self) -> None:
        """Close the socket and stop the reader."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


class DaemonRun:
    """One daemon process plus its QMP connection, in its own directory."""

    def __init__(self, name: str, command: Sequence[str], script: Script) -> None:
        self.name = name
        self.base = tempfile.mkdtemp(prefix="qd")  # short: Unix socket paths
        self.tmp = os.path.join(self.base, "tmp")
        os.mkdir(self.tmp)
        self.sock_path = os.path.join(self.base, "qmp.sock")
        self.script = script
        self.command = [
            *command,
            *script.daemon_args(self.tmp),
            "--chardev",
            f"socket,id=qmp,path={self.sock_path},server=on,wait=off",
            "--monitor",
            ",".join(filter(None, ["qmp", script.monitor_options])),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: _Connection | None = None
        self.transcript = Transcript(name)
        self._stderr_path = os.path.join(self.base, "stderr")
        self._stopped = False
        self._missed = False

    def setup(self) -> None:
        """Run the script's setup commands in ``$TMP``."""
        for cmd in self.script.setup:
            line = cmd.replace("$TMP", self.tmp)
            done = subprocess.run(
                line, shell=True, cwd=self.tmp, capture_output=True, check=False, timeout=60
            )
            if done.returncode != 0:
                err = done.stderr.decode(errors="replace")
                raise RuntimeError(f"setup failed ({done.returncode}): {line}\n{err}")

    def start(self) -> None:
        """Start the process; returns at once (see ``connect``)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )

    def connect(self) -> bool:
        """Connect to the monitor, polling until it listens; False if it died."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.transcript.ending = f"exited with status {self.proc.returncode} at start"
                self.transcript.failed_start = True
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.sock_path)
            except OSError:
                sock.close()
                time.sleep(0.01)
                continue
            self.conn = _Connection(sock)
            return True
        self.transcript.ending = "did not listen in time"
        return False

    def send(self, data: bytes) -> None:
        """Send one step's bytes (nothing once the daemon hung up)."""
        if self.conn is not None and not self.conn.closed:
            self.conn.send(data)

    def collect_reference(self, label: str, expects_reply: bool) -> Record:
        """Collect QEMU's messages for one step (quiet-window strategy)."""
        conn = self.conn
        record = Record(label)
        if conn is not None:
            quiet = self.script.quiet if self.script.quiet is not None else QUIET
            if expects_reply:
                conn.wait(lambda: conn.complete_messages() > 0 or conn.closed, REPLY_TIMEOUT)
                settle = self.script.settle if self.script.settle is not None else SETTLE
                conn.wait_quiet(settle, REPLY_TIMEOUT)
            elif conn.wait(lambda: bool(conn.pending()) or conn.closed, quiet):
                conn.wait_quiet(SETTLE, REPLY_TIMEOUT)
            record.messages, record.closed = conn.take()
        self.transcript.records.append(record)
        return record

    def collect_matching(self, label: str, reference: Record) -> Record:
        """Collect qmpgraph's messages: as many as QEMU sent, then a short watch."""
        conn = self.conn
        record = Record(label)
        if conn is not None:
            want = sum(1 for m in reference.messages if m.endswith(b"\r\n"))

            def enough() -> bool:
                assert conn is not None
                if conn.closed:
                    return True
                return conn.complete_messages() >= want and not reference.closed

            # Once qmpgraph missed a reply it is failing anyway: stop waiting long.
            timeout = REPLY_TIMEOUT if not self._missed else EXTRA * 4
            if not conn.wait_or_stall(enough, timeout, STALL):
                self._missed = True
            conn.wait_quiet(EXTRA, EXTRA)
            record.messages, record.closed = conn.take()
        self.transcript.records.append(record)
        return record

    def finish(self) -> None:
        """Record whether the process lives on (or how it exited), then stop it."""
        proc = self.proc
        if proc is None:
            return
        if self.conn is not None and self.conn.closed and not self.transcript.ending:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(EXIT_TIMEOUT)
        if not self.transcript.ending:
            if proc.poll() is None:
                self.transcript.ending = "still running"
            else:
                self.transcript.ending = f"exited with status {proc.returncode}"
        self.stop()

    def stop(self) -> None:
        """Close the connection, terminate the process, remove the directory."""
        if self._stopped:
            return
        self._stopped = True
        if self.conn is not None:
            self.conn.close()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(EXIT_TIMEOUT)
        try:
            with open(self._stderr_path, encoding="utf-8", errors="replace") as f:
                self.transcript.stderr = f.read().replace(self.tmp, "$TMP")
        except OSError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def qmpgraph_command() -> list[str]:
    """How the harness starts qmpgraph: this interpreter, ``-m qmpgraph daemon``."""
    return [sys.executable, "-m", "qmpgraph", "daemon"]


# --------------------------------------------------------------------------
# Running and comparing


@dataclass(frozen=True, slots=True)
class Result:
    """Both rendered transcripts and, when they differ, a unified diff."""

    reference: list[str]
    candidate: list[str]
    reference_stderr: str
    candidate_stderr: str
    #: QEMU sent nothing within the timeout for a step that always gets a
    #: reply (the oracle stalled, seen once under heavy load), or QEMU greeted
    #: twice on one connection (its monitor I/O thread and main loop both
    #: announced the connection; the parser was reset mid-command, seen once in
    #: CI): this run says nothing about qmpgraph and may be repeated. The text
    #: says which glitch it was; empty when there was none.
    oracle_glitch: str = ""
    #: How many QEMU runs it took to see qmpgraph's transcript (1: the first).
    oracle_runs: int = 1

    @property
    def equal(self) -> bool:
        """Whether the normalized transcripts are identical."""
        return self.reference == self.candidate

    def diff(self) -> str:
        """A unified diff of the transcripts plus both daemons' stderr."""
        lines = difflib.unified_diff(
            self.reference,
            self.candidate,
            "qemu-storage-daemon",
            "qmpgraph",
            lineterm="",
            n=4,
        )
        out = "\n".join(lines)
        for who, err in (
            ("qemu-storage-daemon", self.reference_stderr),
            ("qmpgraph", self.candidate_stderr),
        ):
            if err.strip():
                out += f"\n--- {who} stderr ---\n{err.rstrip()}"
        return out


def _label(index: int, step: Step) -> str:
    return f"step {index}: {step.source}"


def record_reference(script: Script, qsd: str) -> list[str]:
    """Run ``script`` against QEMU alone; its rendered transcript."""
    return _run_reference(script, qsd)[0]


#: QEMU-only runs of a script whose transcripts differ, looking for QEMU
#: giving qmpgraph's answer (see ``run_differential``).
ORACLE_RERUNS = 3


def run_differential(
    script: Script,
    qsd: str,
    candidate: Sequence[str] | None = None,
    oracle_reruns: int = ORACLE_RERUNS,
) -> Result:
    """Run ``script`` against QEMU and qmpgraph side by side and compare.

    When QEMU itself misbehaved (see ``Result.oracle_glitch``), that run says
    nothing about qmpgraph: it is run once more.

    qemu-storage-daemon is not always deterministic: where a job's thread-pool
    I/O races the QMP dispatcher, a reply and a job's events can come in either
    order (seen in CI with ``x-blockdev-amend`` next to a mirror that became
    ready). So a mismatch is followed by up to ``oracle_reruns`` runs of QEMU
    alone; if one of them gives exactly qmpgraph's transcript, that is QEMU's
    answer too and the script matches (``Result.oracle_runs`` says how many
    QEMU runs it took). A transcript QEMU never gives still fails.
    """
    result = _run_once(script, qsd, candidate)
    if not result.equal and result.oracle_glitch:
        print(f"{script.name}: qemu-storage-daemon {result.oracle_glitch}; running it again")
        result = _run_once(script, qsd, candidate)
    runs = 1
    while not result.equal and runs <= oracle_reruns:
        runs += 1
        reference, stderr = _run_reference(script, qsd)
        if reference == result.candidate:
            print(f"{script.name}: qemu-storage-daemon's run {runs} gave qmpgraph's transcript")
            return Result(
                reference,
                result.candidate,
                stderr,
                result.candidate_stderr,
                result.oracle_glitch,
                oracle_runs=runs,
            )
    return result


def _steps(script: Script) -> list[tuple[str, Step | None, bool]]:
    """The greeting, then each step with its label and whether a reply is certain."""
    steps: list[tuple[str, Step | None, bool]] = [("greeting", None, True)]
    steps += [(_label(i, s), s, s.expects_reply) for i, s in enumerate(script.steps, 1)]
    return steps


def _run_reference(script: Script, qsd: str) -> tuple[list[str], str]:
    """QEMU alone through ``script``: its rendered transcript and stderr."""
    ref = DaemonRun("qemu-storage-daemon", [qsd], script)
    try:
        ref.setup()
        ref.start()
        if ref.connect():
            for label, step, expects in _steps(script):
                if step is not None:
                    ref.send(step.data(ref.tmp))
                ref.collect_reference(label, expects)
        ref.finish()
    finally:
        ref.stop()
    return ref.transcript.render(ref.tmp), ref.transcript.stderr


def _run_once(script: Script, qsd: str, candidate: Sequence[str] | None) -> Result:
    ref = DaemonRun("qemu-storage-daemon", [qsd], script)
    cand = DaemonRun("qmpgraph", list(candidate or qmpgraph_command()), script)
    oracle_glitch = ""
    try:
        ref.setup()
        cand.setup()
        ref.start()
        cand.start()
        # Connect concurrently: qmpgraph's interpreter start-up dominates.
        waiter = threading.Thread(target=cand.connect)
        waiter.start()
        ref_up = ref.connect()
        waiter.join()
        if ref_up and cand.conn is not None:
            for label, step, expects in _steps(script):
                if step is not None:
                    ref.send(step.data(ref.tmp))
                    cand.send(step.data(cand.tmp))
                reference = ref.collect_reference(label, expects)
                if expects and not reference.messages and not reference.closed:
                    oracle_glitch = f"stayed silent at {label}"
                if step is None and b"".join(reference.messages).count(b'"QMP"') > 1:
                    oracle_glitch = "greeted twice"
                cand.collect_matching(label, reference)
        ref.finish()
        cand.finish()
    finally:
        ref.stop()
        cand.stop()
    return Result(
        ref.transcript.render(ref.tmp),
        cand.transcript.render(cand.tmp),
        ref.transcript.stderr,
        cand.transcript.stderr,
        oracle_glitch,
    )
