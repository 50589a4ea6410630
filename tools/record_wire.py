"""Record what qemu-storage-daemon 7.2 answers to raw QMP bytes.

Each case opens a fresh connection to a real daemon (fresh parser state),
optionally negotiates (``mode``: ``negotiation`` stays in negotiation mode,
``command`` sends plain ``qmp_capabilities``, ``oob`` enables out-of-band),
then sends its chunks one write at a time. After each chunk the daemon is
read until it has been quiet for a while; the bytes it sent are recorded for
that chunk, so the data says not only what QEMU answers but when (a keyword
at the end of a write is answered only once the next byte arrives).

The result is ``tests/protocol/data/qsd-wire.json``: bytes are stored as
latin-1 text, so every byte value survives; a long chunk is stored as
``[prefix, unit, count, suffix]``. ``tests/protocol/test_wire.py``
replays the inputs through qmpgraph's sans-IO path and compares bytes.

Usage: ``python tools/record_wire.py [--out PATH] [--quiet-ms N] [-k NAME]``.
Not shipped; needs ``qemu-storage-daemon`` on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "protocol" / "data" / "qsd-wire.json"
NOPE = b'{"execute": "x-no-such-command"'


@dataclass(frozen=True, slots=True)
class Rep:
    """A long chunk stored compactly: ``prefix + unit * count + suffix``."""

    prefix: bytes
    unit: bytes
    count: int
    suffix: bytes

    def expand(self) -> bytes:
        """The bytes this stands for."""
        return self.prefix + self.unit * self.count + self.suffix

    def stored(self) -> list[object]:
        """The data-file form (latin-1 texts and the count)."""
        return [
            self.prefix.decode("latin-1"),
            self.unit.decode("latin-1"),
            self.count,
            self.suffix.decode("latin-1"),
        ]


@dataclass(frozen=True, slots=True)
class Case:
    """One recorded exchange."""

    name: str
    chunks: tuple[bytes | Rep, ...]
    mode: str = "command"
    pretty: bool = False
    quiet: float = 0.0  # a longer quiet window for slow cases (seconds)


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(
        name: str,
        *chunks: bytes | Rep,
        mode: str = "command",
        pretty: bool = False,
        quiet: float = 0.0,
    ) -> None:
        cases.append(Case(name, tuple(chunks), mode, pretty, quiet))

    # tests/qtest/qmp-test.c test_malformed, before and after negotiation.
    malformed = {
        "syntax-brace-bracket": b"{]\n",
        "impossible-byte-outside-string": b"{\xff",
        "control-char-outside-string": b"{\x01",
        "impossible-byte-in-string": b"{'bad \xff",
        "control-char-in-string": b"{'execute': 'nonexistent', 'id':'\n",
        "interpolation": b"%p",
        "not-a-dict": b"null\n",
        "no-execute": b"{}\n",
        "execute-not-string": b"{ 'execute': true }\n",
        "arguments-not-dict": b"{ 'execute': 'no-such-cmd', 'arguments': [] }\n",
        "extra-key": b"{ 'execute': 'no-such-cmd', 'extra': true }\n",
    }
    for mode in ("negotiation", "command"):
        for name, data in malformed.items():
            add(f"qmp-test/{mode}/{name}", data, mode=mode)
        add(f"qmp-test/{mode}/recovers", b"{\xff", b"{ 'execute': 'no-such-cmd' }\n", mode=mode)

    # Lexical errors and how the lexer resynchronizes.
    lexical = {
        "ff": b"\xff",
        "fe": b"\xfe",
        "ff-ff-ff": b"\xff\xff\xff",
        "nul": b"\x00",
        "nul-nul": b"\x00\x00\n",
        "garbage-then-value": b"abc\xffdef{}\n",
        "capital-keyword": b"True\n",
        "plus-number": b"+1\n",
        "dot-number": b".5\n",
        "leading-zero": b"01\n",
        "leading-zero-in-dict": b'{"a": 01}\n',
        "minus-letter": b"-a\n",
        "minus-minus": b"--1\n",
        "mantissa-brace": b"1.}\n",
        "mantissa-e": b"1.e5\n",
        "exp-nothing": b"1e\n",
        "exp-sign-nothing": b"1e+\n",
        "exp-sign-letter": b"1e+x\n",
        "hex-number": b"0x10\n",
        "zero-exponent": b"0e3 \n",
        "minus-zero-exponent": b"[-0E1]\n",
        "zero-point-exponent": b'{"execute": "x-no-such-command", "id": [0.0e1, 10e1]}\n',
        "number-letter": b"1a\n",
        "list-then-letter": b"[1,2,3]x\n",
        "short-keyword": b"tru\n",
        "nul-keyword": b"nul\n",
        "long-keyword": b"truex\n",
        "upper-null": b"NULL\n",
        "ff-then-command": b'\xff{"execute": "x-no-such-command"}\n',
        "control-then-command": b'\x01  {"execute": "x-no-such-command"}\n',
        "ff-inside-dict": b'{"execute":\xff "x"}\n',
        "ff-tab-dict": b"\xff\t{}\n",
        "ff-space-dict": b"\xff {}\n",
        "ff-quote-recovery": b'\xff"{"}\n',
        "raw-tab-in-string": b'{"execute": "a\tb"}\n',
        "control-in-string-recovers": b'"abc\x01def"\n',
        "escape-then-control": b'"\\\x01"\n',
        "escape-then-ff": b'"\\\xff"\n',
        "nul-in-string": b'"ab\x00cd"\n',
        "del-outside": b"\x7f\n",
        "bom": b'\xef\xbb\xbf{"execute": "x-no-such-command"}\n',
        "percent-in-dict": b'{"execute": %s}\n',
        "backslash-outside": b"\\n\n",
        "interpolation-ld": b"%ld\n",
        "unterminated-dq": b'"abc',
        "unterminated-sq": b"'abc",
        "newline-in-sq": b"'abc\ndef'\n",
        "unicode-outside": b"\xc3\xa9\n",
    }
    for name, data in lexical.items():
        add(f"lexical/{name}", data)

    # String contents: escapes and UTF-8 as the parser judges them.
    strings = {
        "u0000": b'"\\u0000"',
        "pair": b'"\\uD800\\uDC00"',
        "pair-lower": b'"\\ud83d\\ude00"',
        "lone-high": b'"\\uD800"',
        "lone-low": b'"\\uDC00"',
        "high-then-x": b'"\\uD800x"',
        "high-then-bmp": b'"\\uD800\\u0041"',
        "uffff": b'"\\uFFFF"',
        "ufffe": b'"\\uFFFE"',
        "ufdd0": b'"\\uFDD0"',
        "u10ffff": b'"\\uDBFF\\uDFFF"',
        "u1fffe": b'"\\uD83F\\uDFFE"',
        "short-u": b'"\\u12"',
        "bad-hex": b'"\\u12G4"',
        "u-at-end": b'"\\u"',
        "bad-escape": b'"\\x"',
        "escaped-apostrophe": b'"\\\'"',
        "sq-escaped-quote": b"'\\\"'",
        "sq-with-dq": b"'say \"hi\"'",
        "dq-with-sq": b'"it\'s"',
        "solidus": b'"\\/"',
        "all-escapes": b'"\\"\\\\\\/\\b\\f\\n\\r\\t"',
        "mod-utf8-nul": b'"\xc0\x80"',
        "e-acute": b'"\xc3\xa9"',
        "emoji": b'"\xf0\x9f\x98\x80"',
        "surrogate-utf8": b'"\xed\xa0\x80"',
        "nonchar-utf8": b'"\xef\xbf\xbe"',
        "beyond-unicode": b'"\xf4\x90\x80\x80"',
        "overlong-3": b'"\xe0\x80\x80"',
        "overlong-2": b'"\xc1\xbf"',
        "truncated-2": b'"\xc3"',
        "lone-continuation": b'"\x80"',
        "five-byte": b'"\xf8\x88\x80\x80\x80"',
        "lone-fd": b'"\xfd"',
        "del": b'"\x7f"',
        "percent": b'"%s %p %%"',
        "escaped-utf8-lead": b'"\\\xc3\xa9"',
    }
    for name, data in strings.items():
        add(f"string/{name}", NOPE + b', "id": ' + data + b"}\n")
        add(f"string-key/{name}", b"{" + data + b": 1}\n")

    # Every JSON type as an id, echoed back.
    ids = {
        "int": b"1",
        "zero": b"0",
        "negative": b"-42",
        "minus-zero": b"-0",
        "string": b'"cookie#1"',
        "sq-string": b"'sq'",
        "empty-string": b'""',
        "float": b"1.5",
        "point-one": b"0.1",
        "minus-zero-float": b"-0.0",
        "one-point-zero": b"1.0",
        "exp": b"1E2",
        "exp-neg": b"5e-324",
        "min-normal": b"2.2250738585072014e-308",
        "huge-float": b"1e308",
        "inf": b"1e400",
        "minus-inf": b"-1e400",
        "underflow": b"1e-400",
        "sum": b"0.30000000000000004",
        "u64-max": b"18446744073709551615",
        "u64-max-plus-1": b"18446744073709551616",
        "i64-min": b"-9223372036854775808",
        "i64-min-minus-1": b"-9223372036854775809",
        "i64-max": b"9223372036854775807",
        "i64-max-plus-1": b"9223372036854775808",
        "big": b"123456789012345678901234567890",
        "long-mantissa": b"3.14159265358979323846264338327950288",
        "true": b"true",
        "false": b"false",
        "null": b"null",
        "list": b'[1, "a", {}]',
        "dict": b'{"b": 1, "a": 2, "execute": 3, "id": 4, "arguments": 5}',
        "empty-dict": b"{}",
        "empty-list": b"[]",
        "nested": b'{"x": [[], {}, [{"y": null}]]}',
        "non-ascii": b'"\xc3\xa9t\xc3\xa9"',
        "escaped-non-ascii": b'"\\u00e9"',
        "control": b'"\\u0001\\u001f\\u007f"',
    }
    for name, data in ids.items():
        add(f"id/{name}", NOPE + b', "id": ' + data + b"}\n")
        add(f"id-first/{name}", b'{"id": ' + data + b', "execute": "x-no-such-command"}\n')
    for name in ("float", "nested", "empty-dict", "empty-list", "non-ascii", "list"):
        add(f"pretty/id/{name}", NOPE + b', "id": ' + ids[name] + b"}\n", pretty=True)

    # Syntax errors and which message wins.
    syntax = {
        "missing-colon": b'{"a" 1}\n',
        "key-not-string": b"{1: 2}\n",
        "key-is-list": b"{[1, 2]: 3}\n",
        "key-bad-list": b"{[1 2]: 3}\n",
        "trailing-comma-dict": b'{"a": 1,}\n',
        "comma-only-dict": b"{,}\n",
        "trailing-comma-list": b"[1,]\n",
        "leading-comma-list": b"[,1]\n",
        "no-comma-list": b"[1 2]\n",
        "no-comma-dict": b'{"a": 1 "b": 2}\n',
        "duplicate-key": b'{"a": 1, "a": 2}\n',
        "duplicate-key-bad-value": b'{"a": 1, "a": tru}\n',
        "key-only": b'{"a"}\n',
        "missing-value": b'{"a": }\n',
        "colon": b":\n",
        "comma": b",\n",
        "close-bracket": b"]\n",
        "close-brace": b"}\n",
        "close-braces": b"}}}\n",
        "bracket-brace": b"[}\n",
        "dict-list-mismatch": b'{"a": [}]\n',
        "list-dict-mismatch": b"[{]}\n",
        "invalid-keyword-in-dict": b'{"execute": nope}\n',
        "bad-string-in-list": b'[1, "\\uD800", tru]\n',
        "bad-keyword-then-string": b'[tru, "\\uD800"]\n',
        "long-keyword": b"[" + b"a" * 1100 + b"]\n",
        "extra-close": b'{"execute": "x-no-such-command"}}\n',
        "two-errors": b"]]\n",
    }
    for name, data in syntax.items():
        add(f"syntax/{name}", data)

    # Framing: several values in one write, one value over several writes.
    add("frame/two-in-one", b'{"execute": "x-a"}{"execute": "x-b"}')
    add("frame/two-lines", b'{"execute": "x-a"}\n{"execute": "x-b"}\n')
    add("frame/three-scalars", b"1 2 3\n")
    add("frame/strings-back-to-back", b'"a""b"')
    add("frame/lists-back-to-back", b"[1][2]")
    add("frame/crlf", b'{"execute": "x-a"}\r\n{"execute": "x-b"}\r\n')
    add("frame/whitespace-only", b" \t\r\n")
    add("frame/split-string", b'{"exec', b'ute": "x-no-such-command"}', b"\n")
    add("frame/split-escape", b'{"execute": "x-\\', b'u0041"}\n')
    add("frame/split-number", NOPE + b', "id": 12', b"3}\n")
    add("frame/split-bytewise", *(bytes((c,)) for c in NOPE + b', "id": 7}'))
    add("frame/number-waits", b"12", b"3", b" ")
    add("frame/keyword-waits", b"tr", b"ue", b"\n")
    add("frame/keyword-alone", b"true")
    add("frame/float-waits", b"1.5", b"e3", b"\n")
    add("frame/multi-line", b'{\n  "execute":\n  "x-no-such-command",\n  "id": 1\n}\n')
    add("frame/pipelined", b"".join(NOPE + b', "id": %d}\n' % i for i in range(20)))
    add(
        "frame/mixed-good-bad",
        NOPE + b', "id": 1}\n{]\n' + NOPE + b', "id": 2}\n\xff\n' + NOPE + b', "id": 3}\n',
    )
    add("frame/split-utf8", NOPE + b', "id": "\xc3', b'\xa9"}\n')
    add("frame/error-split-recovery", b"\xff abc", b" def", b' {"execute": "x-a"}\n')

    # Limits.
    add("limit/nesting-1024", b"[" * 1024 + b"]" * 1024 + b"\n")
    add("limit/nesting-1025", b"[" * 1025 + b"]" * 1025 + b"\n")
    add("limit/nesting-dicts-1025", b'{"a": ' * 1025 + b"1" + b"}" * 1025 + b"\n")
    add("limit/nesting-2000", b"[" * 2000 + b"]" * 2000 + b"\n")
    deep = b"[" * 1020 + b'{"a": 1}' + b"]" * 1020
    add("limit/deep-id-echo", NOPE + b', "id": ' + deep + b"}\n")
    add("limit/deep-id-echo-pretty", NOPE + b', "id": ' + deep + b"}\n", pretty=True)
    add("limit/deep-id-1023", NOPE + b', "id": [' + deep + b"]}\n")
    add("limit/token-count-max", Rep(b"[", b"0,", 1048574, b"[]]\n"), quiet=5.0)
    add("limit/token-count-exceeded", Rep(b"[", b"0,", 1048576, b"0]\n"), quiet=5.0)

    # Negotiation mode and capabilities.
    neg = "negotiation"
    add("neg/query-version", b'{"execute": "query-version"}\n', mode=neg)
    add("neg/unknown", b'{"execute": "x-no-such-command", "id": 1}\n', mode=neg)
    add("neg/caps", b'{"execute": "qmp_capabilities"}\n', mode=neg)
    add("neg/caps-id", b'{"execute": "qmp_capabilities", "id": "c"}\n', mode=neg)
    add("neg/caps-twice", b'{"execute": "qmp_capabilities"}\n' * 2, mode=neg)
    add(
        "neg/caps-oob",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
        mode=neg,
    )
    add(
        "neg/caps-empty-enable",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}\n',
        mode=neg,
    )
    add(
        "neg/caps-oob-twice",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}\n',
        mode=neg,
    )
    add(
        "neg/caps-unknown-cap",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["cap-does-not-exist"]}}\n',
        mode=neg,
    )
    add(
        "neg/caps-enable-string",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}\n',
        mode=neg,
    )
    add(
        "neg/caps-enable-int",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}\n',
        mode=neg,
    )
    add(
        "neg/caps-bogus-arg",
        b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}\n',
        mode=neg,
    )
    add("neg/exec-oob", b'{"exec-oob": "qmp_capabilities"}\n', mode=neg)
    add("neg/exec-oob-id", b'{"exec-oob": "qmp_capabilities", "id": 5}\n', mode=neg)
    add("neg/not-object", b"[]\n", mode=neg)
    add("neg/id-only", b'{"id": 1}\n', mode=neg)
    add("neg/then-command", b'{"execute": "qmp_capabilities"}\n{"execute": "x-a"}\n', mode=neg)
    add("neg/pretty", b'{"execute": "qmp_capabilities"}\n', mode=neg, pretty=True)
    add("neg/pretty-error", b'{"execute": "query-version"}\n', mode=neg, pretty=True)

    # Command mode: the request's shape and the OOB rules.
    add("cmd/caps-again", b'{"execute": "qmp_capabilities"}\n')
    add(
        "cmd/caps-again-oob-arg",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
    )
    add("cmd/query-version", b'{"execute": "query-version"}\n')
    add("cmd/query-version-args", b'{"execute": "query-version", "arguments": {"x": 1}}\n')
    add("cmd/query-version-null-args", b'{"execute": "query-version", "arguments": null}\n')
    add("cmd/id-only", b'{"id": "lonely"}\n')
    add("cmd/arguments-only", b'{"arguments": {}}\n')
    add("cmd/every-member-bad", b'{"execute": 1, "arguments": 2, "id": 3, "extra": 4}\n')
    add("cmd/extra-and-bad-args", b'{"execute": "x", "arguments": [], "zzz": 1}\n')
    add("cmd/list", b"[]\n")
    add("cmd/string", b'"query-version"\n')
    add("cmd/exec-oob-disabled", b'{"exec-oob": "query-version"}\n')
    add("cmd/exec-oob-disabled-id", b'{"exec-oob": "query-version", "id": 1}\n')
    add("cmd/exec-oob-and-execute-disabled", b'{"execute": "x-a", "exec-oob": "x-b"}\n')
    add("cmd/pretty-version", b'{"execute": "query-version"}\n', pretty=True)
    add("cmd/pretty-parse-error", b"{]\n", pretty=True)
    oob = "oob"
    add("oob/no-oob-support", b'{"exec-oob": "query-version"}\n', mode=oob)
    add("oob/no-oob-support-id", b'{"exec-oob": "query-version", "id": "o"}\n', mode=oob)
    add("oob/caps", b'{"exec-oob": "qmp_capabilities"}\n', mode=oob)
    add("oob/unknown", b'{"exec-oob": "x-no-such-command", "id": 2}\n', mode=oob)
    add("oob/not-string", b'{"exec-oob": 1}\n', mode=oob)
    add("oob/clash", b'{"execute": "query-version", "exec-oob": "query-version"}\n', mode=oob)
    add(
        "oob/clash-reversed",
        b'{"exec-oob": "query-version", "execute": "query-version"}\n',
        mode=oob,
    )
    add("oob/clash-bad", b'{"execute": "x-a", "exec-oob": 1}\n', mode=oob)
    add("oob/execute-still-works", b'{"execute": "query-version", "id": 1}\n', mode=oob)
    return cases


# --- talking to the daemon -------------------------------------------------------------


class Daemon:
    """One qemu-storage-daemon whose monitor accepts one client at a time."""

    def __init__(self, binary: str, pretty: bool) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qsdw")
        self.path = os.path.join(self._tmp.name, "m.sock")
        monitor = "c,pretty=on" if pretty else "c"
        self.proc = subprocess.Popen(
            [
                binary,
                "--chardev",
                f"socket,id=c,path={self.path},server=on,wait=off",
                "--monitor",
                monitor,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path):
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not create its socket")
            time.sleep(0.01)

    def close(self) -> None:
        """Kill the daemon and remove its directory."""
        self.proc.kill()
        self.proc.wait()
        self._tmp.cleanup()


def _read_quiet(sock: socket.socket, quiet: float) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([sock], [], [], quiet)
        if not ready:
            return out
        data = sock.recv(1 << 20)
        if not data:
            return out
        out += data


def _read_message(sock: socket.socket, pretty: bool, timeout: float = 10) -> bytes:
    # A pretty message closes with a brace alone on its line.
    end = b"\n}\r\n" if pretty else b"}\r\n"
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(end):
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"no complete message, got {out!r}")
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed")
        out += data
    return out


SETUP = {
    "negotiation": None,
    "command": b'{"execute": "qmp_capabilities"}\n',
    "oob": b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
}


def run_case(daemon: Daemon, case: Case, quiet: float) -> dict[str, object]:
    """Play ``case`` on a fresh connection; the recorded entry."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(500):
        try:
            sock.connect(daemon.path)
            break
        except OSError:
            time.sleep(0.01)
    try:
        greeting = _read_message(sock, case.pretty)
        setup = SETUP[case.mode]
        setup_reply = b""
        if setup is not None:
            sock.sendall(setup)
            setup_reply = _read_message(sock, case.pretty)
        replies = []
        for chunk in case.chunks:
            sock.sendall(chunk.expand() if isinstance(chunk, Rep) else chunk)
            replies.append(_read_quiet(sock, max(quiet, case.quiet)))
    finally:
        sock.close()
    return {
        "name": case.name,
        "mode": case.mode,
        "pretty": case.pretty,
        "greeting": greeting.decode("latin-1"),
        "setup": setup_reply.decode("latin-1"),
        "chunks": [c.stored() if isinstance(c, Rep) else c.decode("latin-1") for c in case.chunks],
        "replies": [r.decode("latin-1") for r in replies],
    }


def main(argv: list[str] | None = None) -> int:
    """Record every case (or those named with -k) into the data file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quiet-ms", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument(
        "-k", dest="only", default=None, help="re-record only cases whose name has this"
    )
    args = parser.parse_args(argv)
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        print("qemu-storage-daemon not found on PATH", file=sys.stderr)
        return 2
    cases = [c for c in _cases() if args.only is None or args.only in c.name]
    results: dict[str, dict[str, object]] = {}
    todo: queue.Queue[Case] = queue.Queue()
    for case in cases:
        todo.put(case)

    def worker() -> None:
        daemons = {p: Daemon(binary, p) for p in (False, True)}
        try:
            while True:
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    return
                results[case.name] = run_case(daemons[case.pretty], case, args.quiet_ms / 1000)
        finally:
            for d in daemons.values():
                d.close()

    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.only is not None and args.out.exists():
        # Re-record only the selected cases; keep the others as they are.
        for old in json.loads(args.out.read_text(encoding="ascii")):
            results.setdefault(old["name"], old)
    ordered = [results[c.name] for c in _cases() if c.name in results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ordered, indent=1, ensure_ascii=True) + "\n", encoding="ascii")
    print(f"recorded {len(ordered)} cases into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
