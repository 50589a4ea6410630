#!/usr/bin/env python3
"""Block-graph benchmark: qemu-storage-daemon and qmpgraph as the graph grows.

Both daemons are started here, each on a Unix socket in its own temporary
directory, and stopped at the end (killed if anything fails or the
``--timeout`` watchdog fires). The workload runs on one daemon at a time (they
never compete for CPU) but alternates between them in blocks of samples, so load
from other processes drifts over both alike. For each daemon:

* the graph is grown to each of ``--sizes`` null-co nodes (default 1,000,
  4,000, 8,000) by pipelining ``blockdev-add`` commands (a writer thread sends
  them all, replies are read as they come);
* at each size, ``--samples`` pairs of one ``blockdev-add`` then one
  ``blockdev-del`` of a fresh node are timed, one command in flight: median
  and p90 round trip of each command;
* at the largest size, ``query-named-block-nodes`` is timed ``--queries``
  times (median), its multi-megabyte reply read to the last byte;
* resident memory (``VmRSS`` in ``/proc/PID/status``) is read before the first
  node and after each growth step; per node = growth / nodes added.

The client is the raw socket client of ``qmp_bench.py`` (identical for both
daemons; it splits on CRLF and parses nothing). Replies are only checked to be
``{"return"...`` so a failing command cannot pass for a fast one.

Ratios are ``qsd / qmpgraph`` throughout: above 1 qmpgraph is faster or
smaller by that factor. The goals checked at the end are those of the
benchmark issue: per-command cost flat as the graph grows, ``blockdev-add``
3x and ``query-named-block-nodes`` 5x faster than qsd at the largest size,
and at most a fifth of qsd's resident memory per node.

``--profile FILE`` runs qmpgraph under cProfile (slower: use it to find hot
spots, not for the figures) and prints its hottest functions.

Usage: ``tools/bench/graph_bench.py [--sizes 1000,4000,8000] [--samples N]``
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qmp_bench import Client

REPO_ROOT = Path(__file__).resolve().parents[2]

# A graph is "flat" when the median at the largest size is within this factor
# of the median at the smallest: 200 samples of ~100 us commands scatter by
# about 10% between runs, a linear scan over 8x more nodes costs far more.
FLAT_LIMIT = 1.3
# Pairs run on one daemon before switching to the other. Switching after
# every pair made both daemons 10-30% slower (each evicts the other's caches,
# and qsd finishes some work after replying), so blocks keep each warm.
BLOCK = 20
ADD_GOAL = 3.0
QUERY_GOAL = 5.0
MEMORY_GOAL = 5.0


def add_cmd(name: str) -> bytes:
    """The ``blockdev-add`` of one null-co node."""
    return (
        b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"'
        + name.encode()
        + b'"}}\n'
    )


def del_cmd(name: str) -> bytes:
    """The ``blockdev-del`` of one node."""
    return b'{"execute":"blockdev-del","arguments":{"node-name":"' + name.encode() + b'"}}\n'


QUERY_NODES = b'{"execute":"query-named-block-nodes"}\n'


class GraphClient(Client):
    """``qmp_bench.Client`` plus checked replies: events are skipped, errors raise."""

    def returns(self, count: int) -> bytes:
        """Read ``count`` replies, all successes; return the last one."""
        last = b""
        while count:
            data = self.read_messages(count)
            for message in data.split(b"\r\n")[:-1]:
                if message.startswith(b'{"event"'):
                    continue
                if not message.startswith(b'{"return"'):
                    raise RuntimeError(f"command failed: {message[:300]!r}")
                count -= 1
                last = message
        return last

    def command(self, payload: bytes) -> int:
        """Send one command, wait for its success reply; the round trip in ns."""
        start = time.perf_counter_ns()
        self.sock.sendall(payload)
        self.returns(1)
        return time.perf_counter_ns() - start

    def pipeline(self, payload: bytes, count: int) -> None:
        """Send ``count`` commands at once; read all their (successful) replies."""
        # A writer thread: the daemon may stop reading while its replies are
        # unread, so writing everything before reading could deadlock.
        writer = threading.Thread(target=self.sock.sendall, args=(payload,), daemon=True)
        writer.start()
        self.returns(count)
        writer.join()


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and p90 of one command's round trips, in microseconds."""

    median_us: float
    p90_us: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Stat:
        """Summarise round trips given in nanoseconds."""
        ordered = sorted(samples_ns)
        p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
        return cls(statistics.median(ordered) / 1000.0, p90 / 1000.0)


@dataclass(slots=True)
class Figures:
    """One daemon's results, keyed by graph size where they depend on it."""

    add: dict[int, Stat] = field(default_factory=dict)
    delete: dict[int, Stat] = field(default_factory=dict)
    build_ms: dict[int, float] = field(default_factory=dict)
    rss_kib: dict[int, int] = field(default_factory=dict)
    query_ms: float = 0.0
    query_bytes: int = 0

    def rss_per_node_kib(self, size: int) -> float:
        """Resident memory growth per node from an empty graph to ``size``."""
        return (self.rss_kib[size] - self.rss_kib[0]) / size


def vm_rss_kib(pid: int) -> int:
    """The process's resident set size in KiB, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def started(command: Sequence[str], timeout: float) -> Iterator[tuple[GraphClient, int]]:
    """Start a daemon with a QMP monitor in a temporary directory; negotiate.

    Yields the client and the daemon's pid. On leaving, asks the daemon to
    ``quit`` (so cProfile writes its stats) if all went well, else kills it.
    A watchdog kills the daemon after ``timeout`` seconds: the client's next
    read then fails, which bounds the whole run like ``trio.fail_after``.
    """
    base = tempfile.mkdtemp(prefix="gb")
    path = os.path.join(base, "qmp.sock")
    full = [*command, "--chardev", f"socket,id=qmp,path={path},server=on,wait=off"]
    full += ["--monitor", "qmp"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, env=env, cwd=base)
    watchdog = threading.Timer(timeout, proc.send_signal, args=(signal.SIGKILL,))
    watchdog.daemon = True
    watchdog.start()
    client: GraphClient | None = None
    ok = False
    try:
        deadline = time.monotonic() + 20.0
        while client is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with status {proc.returncode} at start")
            try:
                client = GraphClient(path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.negotiate()
        yield client, proc.pid
        client.sock.sendall(b'{"execute":"quit"}\n')
        client.returns(1)
        proc.wait(30)
        ok = True
    finally:
        watchdog.cancel()
        if client is not None:
            client.close()
        if proc.poll() is None:
            if not ok:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode == -signal.SIGKILL and not ok:
            print(f"{command[0]}: killed (error or --timeout)", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


@dataclass(slots=True)
class Running:
    """One started daemon under measurement."""

    client: GraphClient
    pid: int
    figures: Figures = field(default_factory=Figures)


def time_pair(client: GraphClient, name: str) -> tuple[int, int]:
    """Round trips (ns) of ``blockdev-add`` then ``blockdev-del`` of a fresh node."""
    return client.command(add_cmd(name)), client.command(del_cmd(name))


def measure(daemons: Sequence[Running], args: argparse.Namespace) -> None:
    """Run the workload on every daemon, interleaved phase by phase.

    Only one daemon works at a time (no competition for CPU), but the pairs
    alternate between the daemons in blocks of ``BLOCK`` and the queries one
    by one, so that load from other processes on the machine drifts over
    both alike and the ratios stay fair even when absolute figures move.
    """
    for d in daemons:
        # One untimed pair first so that code loaded on first use (Python
        # imports, QEMU's lazily initialised driver state) is not counted
        # as per-node memory.
        time_pair(d.client, "w")
        d.figures.rss_kib[0] = vm_rss_kib(d.pid)
    have = 0
    for size in args.sizes:
        payload = b"".join(add_cmd(f"n{i}") for i in range(have, size))
        for d in daemons:
            start = time.perf_counter()
            d.client.pipeline(payload, size - have)
            d.figures.build_ms[size] = (time.perf_counter() - start) * 1000.0
            d.figures.rss_kib[size] = vm_rss_kib(d.pid)
        have = size
        adds: list[list[int]] = [[] for _ in daemons]
        dels: list[list[int]] = [[] for _ in daemons]
        total = args.warmup + args.samples
        for first in range(0, total, BLOCK):
            for j, d in enumerate(daemons):
                for i in range(first, min(first + BLOCK, total)):
                    add_ns, del_ns = time_pair(d.client, f"p{size}x{i}")
                    if i >= args.warmup:
                        adds[j].append(add_ns)
                        dels[j].append(del_ns)
        for j, d in enumerate(daemons):
            d.figures.add[size] = Stat.of(adds[j])
            d.figures.delete[size] = Stat.of(dels[j])
    times: list[list[int]] = [[] for _ in daemons]
    for _ in range(args.queries):
        for j, d in enumerate(daemons):
            start_ns = time.perf_counter_ns()
            d.client.sock.sendall(QUERY_NODES)
            reply = d.client.returns(1)
            times[j].append(time.perf_counter_ns() - start_ns)
            d.figures.query_bytes = len(reply)
            listed = reply.count(b'"node-name": "n')
            if listed != have:
                raise RuntimeError(f"query-named-block-nodes listed {listed} of {have} nodes")
    for j, d in enumerate(daemons):
        if times[j]:
            d.figures.query_ms = statistics.median(times[j]) / 1e6


def run(commands: Sequence[Sequence[str]], args: argparse.Namespace) -> list[Figures]:
    """Start the daemons, measure them side by side, stop them; their figures."""
    with ExitStack() as stack:
        daemons = [Running(*stack.enter_context(started(c, args.timeout))) for c in commands]
        measure(daemons, args)
        return [d.figures for d in daemons]


def print_table(ref: Figures | None, cand: Figures | None, args: argparse.Namespace) -> None:
    """Print each figure for qsd, qmpgraph and the ratio qsd/qmpgraph."""
    rows: list[tuple[str, float | None, float | None]] = []

    def row(name: str, get: Callable[[Figures, int], float], size: int = 0) -> None:
        a = get(ref, size) if ref else None
        rows.append((name, a, get(cand, size) if cand else None))

    for size in args.sizes:
        row(f"build to {size:,} (ms)", lambda f, s: f.build_ms[s], size)
    for size in args.sizes:
        row(f"blockdev-add @{size:,} median (us)", lambda f, s: f.add[s].median_us, size)
        row(f"blockdev-add @{size:,} p90 (us)", lambda f, s: f.add[s].p90_us, size)
    for size in args.sizes:
        row(f"blockdev-del @{size:,} median (us)", lambda f, s: f.delete[s].median_us, size)
        row(f"blockdev-del @{size:,} p90 (us)", lambda f, s: f.delete[s].p90_us, size)
    top = args.sizes[-1]
    if args.queries:
        row(f"query-named-block-nodes @{top:,} (ms)", lambda f, _: f.query_ms)
        row("  reply size (KiB)", lambda f, _: f.query_bytes / 1024)
    row("VmRSS empty graph (KiB)", lambda f, _: f.rss_kib[0])
    row(f"VmRSS @{top:,} (KiB)", lambda f, _: f.rss_kib[top])
    row(f"VmRSS per node @{top:,} (KiB)", lambda f, _: f.rss_per_node_kib(top))

    print(
        f"null-co graph; per size {args.samples} blockdev-add+blockdev-del pairs of a fresh"
        f" node after {args.warmup} warm-up; query-named-block-nodes: median of {args.queries}"
    )
    print(f"{'':40}{'qemu-storage-daemon':>20}{'qmpgraph':>12}{'qsd/qmpgraph':>14}")
    for name, a, b in rows:
        cells = f"{a:>20,.1f}" if a is not None else f"{'-':>20}"
        cells += f"{b:>12,.1f}" if b is not None else f"{'-':>12}"
        cells += f"{a / b:>13.2f}x" if a is not None and b else f"{'-':>14}"
        print(f"{name:40}{cells}")
    print("(ratio > 1: qmpgraph is faster, or smaller, by that factor)")


def check_goals(ref: Figures | None, cand: Figures | None, args: argparse.Namespace) -> bool:
    """Print each goal of the benchmark issue as met or missed; True if all met."""
    lo, top = args.sizes[0], args.sizes[-1]
    results: list[tuple[str, float, bool]] = []
    if cand is not None and lo != top:
        for what, stats in (("blockdev-add", cand.add), ("blockdev-del", cand.delete)):
            growth = stats[top].median_us / stats[lo].median_us
            label = f"qmpgraph {what} flat: median @{top:,} / @{lo:,} <= {FLAT_LIMIT}"
            results.append((label, growth, growth <= FLAT_LIMIT))
    if cand is not None and ref is not None:
        ratio = ref.add[top].median_us / cand.add[top].median_us
        results.append((f"blockdev-add @{top:,}: qsd/qmpgraph >= {ADD_GOAL}", ratio, ratio >= 3))
        if args.queries:
            ratio = ref.query_ms / cand.query_ms
            label = f"query-named-block-nodes @{top:,}: qsd/qmpgraph >= {QUERY_GOAL}"
            results.append((label, ratio, ratio >= QUERY_GOAL))
        ratio = ref.rss_per_node_kib(top) / cand.rss_per_node_kib(top)
        label = f"VmRSS per node @{top:,}: qsd/qmpgraph >= {MEMORY_GOAL}"
        results.append((label, ratio, ratio >= MEMORY_GOAL))
    if ref is not None and lo != top:
        for what, stats in (("blockdev-add", ref.add), ("blockdev-del", ref.delete)):
            growth = stats[top].median_us / stats[lo].median_us
            results.append((f"(for reference) qsd {what} @{top:,} / @{lo:,}", growth, True))
    print("\ngoals:")
    for label, value, met in results:
        verdict = "" if label.startswith("(") else ("met" if met else "MISSED")
        print(f"  {label:62}{value:>8.2f}x  {verdict}")
    return all(met for _, _, met in results)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: sorted({int(x) for x in s.split(",")}),
        default=[1000, 4000, 8000],
        help="graph sizes, comma-separated (default 1000,4000,8000)",
    )
    parser.add_argument("--samples", type=int, default=200, help="timed pairs per size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed pairs per size first")
    parser.add_argument("--queries", type=int, default=5, help="query-named-block-nodes runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per daemon")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    parser.add_argument(
        "--only", choices=["qsd", "qmpgraph"], help="measure one daemon (no ratios)"
    )
    parser.add_argument("--profile", metavar="FILE", help="run qmpgraph under cProfile")
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)
    if args.sizes[0] <= 0:
        parser.error("--sizes must be positive")
    if args.qsd is None and args.only != "qmpgraph":
        print("qemu-storage-daemon not found (use --qsd PATH)", file=sys.stderr)
        return 2

    qmpgraph = [sys.executable, "-m", "qmpgraph", "daemon"]
    if args.profile:
        qmpgraph = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "qmpgraph"]
        qmpgraph.append("daemon")
    commands = {"qsd": [args.qsd], "qmpgraph": qmpgraph}
    chosen = [name for name in commands if args.only in (None, name)]
    results = dict(zip(chosen, run([commands[n] for n in chosen], args), strict=True))
    ref, cand = results.get("qsd"), results.get("qmpgraph")

    print_table(ref, cand, args)
    all_met = check_goals(ref, cand, args)
    if args.profile:
        print(f"\nqmpgraph profile ({args.profile}), top functions by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    return 1 if args.check and not all_met else 0


if __name__ == "__main__":
    raise SystemExit(main())
