#!/usr/bin/env python3
"""QMP benchmark: the same workload against qemu-storage-daemon and qmpgraph.

Measures, for each daemon in one run (started here, on Unix sockets in a
temporary directory, and stopped at the end):

* ``query-version`` round-trip latency from one client: median and p99 over
  ``--count`` requests after ``--warmup`` ones, one request in flight;
* pipelined throughput: ``--pipeline`` ``query-version`` commands written at
  once (by a writer thread), replies read as they come; commands per second.

The client is a raw blocking socket doing the least possible work (it counts
CRLFs, parses nothing), so its overhead is small and the same for both.
The daemons run one after the other so they do not compete for CPU. Ratios
are qmpgraph relative to QEMU: ``2.0x`` means qmpgraph takes twice as long.

``--profile FILE`` runs qmpgraph under cProfile (slower!) and prints its
hottest functions after the run; the raw stats are saved in FILE.

Usage: ``tools/bench/qmp_bench.py [--count N] [--pipeline N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
QUERY = b'{"execute": "query-version"}\n'
IO_TIMEOUT = 30.0


class Client:
    """A minimal QMP client: raw bytes, CRLF counting, no JSON parsing."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def read_messages(self, count: int) -> bytes:
        """Read until ``count`` complete messages arrived; return their bytes."""
        chunks = [self.buf]
        seen = self.buf.count(b"\r\n")
        tail = self.buf[-1:]
        while seen < count:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("daemon closed the connection")
            seen += (tail + data).count(b"\r\n")  # tail: a CRLF split across reads
            tail = data[-1:]
            chunks.append(data)
        buf = b"".join(chunks)
        pos = 0
        for _ in range(count):
            pos = buf.index(b"\r\n", pos) + 2
        self.buf = buf[pos:]
        return buf[:pos]

    def negotiate(self) -> None:
        """Read the greeting and leave negotiation mode."""
        self.read_messages(1)
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.read_messages(1)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def _connect(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {proc.returncode} at start")
        try:
            return Client(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass(frozen=True, slots=True)
class Figures:
    """One daemon's results."""

    median_us: float
    p99_us: float
    throughput: float


def measure_latency(client: Client, count: int, warmup: int) -> list[float]:
    """Round-trip times in microseconds, one request in flight."""
    times: list[float] = []
    for i in range(warmup + count):
        start = time.perf_counter_ns()
        client.sock.sendall(QUERY)
        client.read_messages(1)
        if i >= warmup:
            times.append((time.perf_counter_ns() - start) / 1000.0)
    return times


def measure_throughput(client: Client, count: int) -> float:
    """Commands per second with ``count`` commands written at once."""
    payload = QUERY * count
    # A writer thread: the daemon may stop reading while its replies are
    # unread, so writing everything before reading could deadlock.
    writer = threading.Thread(target=client.sock.sendall, args=(payload,))
    start = time.perf_counter()
    writer.start()
    client.read_messages(count)
    elapsed = time.perf_counter() - start
    writer.join()
    return count / elapsed


def p99(values: Sequence[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * len(ordered)) - 1)]


def run_one(command: Sequence[str], args: argparse.Namespace, quit_at_end: bool) -> Figures:
    """Start one daemon, measure it, stop it."""
    base = tempfile.mkdtemp(prefix="qb")
    path = os.path.join(base, "qmp.sock")
    full = [*command, "--chardev", f"socket,id=qmp,path={path},server=on,wait=off"]
    full += ["--monitor", "qmp"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, env=env, cwd=base)
    try:
        client = _connect(path, proc)
        client.negotiate()
        times = measure_latency(client, args.count, args.warmup)
        rates = [measure_throughput(client, args.pipeline) for _ in range(args.rounds)]
        if quit_at_end:
            client.sock.sendall(b'{"execute": "quit"}\n')
            client.read_messages(1)
            proc.wait(30)
        client.close()
        return Figures(statistics.median(times), p99(times), max(rates))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="timed round trips")
    parser.add_argument("--warmup", type=int, default=200, help="untimed round trips first")
    parser.add_argument("--pipeline", type=int, default=5000, help="commands written at once")
    parser.add_argument("--rounds", type=int, default=3, help="pipelined rounds (best kept)")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    parser.add_argument("--profile", metavar="FILE", help="run qmpgraph under cProfile")
    args = parser.parse_args(argv)
    if args.qsd is None:
        print("qemu-storage-daemon not found (use --qsd PATH)", file=sys.stderr)
        return 2

    qmpgraph = [sys.executable, "-m", "qmpgraph", "daemon"]
    if args.profile:
        qmpgraph = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "qmpgraph"]
        qmpgraph.append("daemon")
    ref = run_one([args.qsd], args, quit_at_end=False)
    cand = run_one(qmpgraph, args, quit_at_end=bool(args.profile))

    print(f"query-version, Unix socket, {args.count} round trips after {args.warmup} warm-up;")
    print(f"pipelined: {args.pipeline} commands at once, best of {args.rounds}")
    print(f"{'':24}{'qemu-storage-daemon':>22}{'qmpgraph':>14}{'qmpgraph/qsd':>14}")
    rows = [
        ("latency median (us)", ref.median_us, cand.median_us, cand.median_us / ref.median_us),
        ("latency p99 (us)", ref.p99_us, cand.p99_us, cand.p99_us / ref.p99_us),
        ("throughput (cmd/s)", ref.throughput, cand.throughput, ref.throughput / cand.throughput),
    ]
    for name, a, b, ratio in rows:
        print(f"{name:24}{a:>22,.1f}{b:>14,.1f}{ratio:>13.2f}x")
    print("(ratio > 1: qmpgraph is slower by that factor)")
    if args.profile:
        print(f"\nqmpgraph profile ({args.profile}), top functions by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
