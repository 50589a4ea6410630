#!/usr/bin/env python3
"""NBD data-path benchmark: nbdcopy against qemu-storage-daemon and qmpgraph.

One run creates a ``--size`` MiB raw image (mostly pseudo-random data, one
MiB in eight a hole, one in eight written zeros) and a qcow2 copy of it
(``qemu-img convert``), starts both daemons (each with a QMP monitor and an
NBD server on Unix sockets in a temporary directory, the two source images
exported read-only by ``--blockdev``/``--export``), and times with
``nbdcopy`` (its defaults: multi-conn, many requests in flight):

* **read**: the read-only export copied to ``null:`` (nothing but the
  server's work and the client's; ``--sink file`` copies to a local file);
* **write**: the local raw image copied into a fresh writable export of the
  same format (a new target file, ``blockdev-add`` + ``block-export-add``
  over QMP before each run, deleted after it);
* **clients**: ``--clients`` readers of the raw export at once (aggregate
  throughput; the point is the memory figure: many clients must not make
  the daemon grow without bound).

Each figure is the median of ``--repeats`` runs; runs alternate between the
daemons (never both at once) so load from other processes drifts over both
alike. The first run of each phase is checked: the bytes that came out of
(or went into) the export hash the same as the source (the write targets are
read back through the daemon's own export).

Resident memory: a thread polls ``VmRSS`` of each daemon every 5 ms during
each phase (the peak is reported per phase), and ``VmHWM`` (the kernel's
peak) is printed at the end.

Ratios are ``qmpgraph / qsd`` for throughput (above 1: qmpgraph is faster)
and ``qmpgraph / qsd`` for memory (below 1: qmpgraph is smaller).

``--profile FILE`` runs qmpgraph under cProfile (much slower: for finding hot
spots, not for figures) and prints its hottest functions.

Usage: ``tools/bench/nbd_bench.py [--size MIB] [--repeats N] [--clients N]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pstats
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
IO_TIMEOUT = 60.0
READ_GOAL = 0.5  # qmpgraph / qsd on raw reads (the issue's goal)


# -- the images ---------------------------------------------------------------------


def make_source(path: Path, size_mib: int) -> str:
    """Write the source raw image; its sha256.

    Per MiB: one in eight is left a hole, one in eight is written as zeros
    (allocated zeros: QEMU reports them as data), the rest is seeded random
    data, so reads cover data, holes and zero ranges alike.
    """
    rng = random.Random(5)
    digest = hashlib.sha256()
    zeros = bytes(MIB)
    with path.open("wb") as f:
        f.truncate(size_mib * MIB)
        for i in range(size_mib):
            if i % 8 == 3:
                digest.update(zeros)
                continue
            chunk = zeros if i % 8 == 6 else rng.randbytes(MIB)
            f.seek(i * MIB)
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def run_tool(*cmd: str, timeout: float = IO_TIMEOUT) -> None:
    """Run a command; raise with its stderr when it fails."""
    res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {res.stderr.decode(errors='replace')}")


# -- one daemon ---------------------------------------------------------------------


class QMP:
    """A small line-based QMP client (events are skipped)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.file.readline()
        self.ok("qmp_capabilities")

    def ok(self, command: str, **arguments: Any) -> Any:
        """Run a command that must succeed; its return value."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"{command}: connection closed")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "return" not in reply:
                raise RuntimeError(f"{command} failed: {reply}")
            return reply["return"]

    def wait_event(self, name: str) -> None:
        """Wait for event ``name`` (one that already came counts)."""
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    del self.events[i]
                    return
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"connection closed waiting for {name}")
            self.events.append(json.loads(line))

    def close(self) -> None:
        """Close the socket."""
        self.file.close()
        self.sock.close()


@dataclass
class Daemon:
    """One started daemon: its QMP client, pid, NBD socket and figures."""

    name: str
    qmp: QMP
    pid: int
    nbd_path: str
    workdir: Path
    mib_s: dict[str, list[float]] = field(default_factory=dict)
    cpu_s: dict[str, list[float]] = field(default_factory=dict)
    peak_kib: dict[str, int] = field(default_factory=dict)
    start_kib: int = 0
    hwm_kib: int = 0

    def uri(self, export: str) -> str:
        """The nbd+unix URI of ``export``."""
        return f"nbd+unix:///{export}?socket={self.nbd_path}"


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def source_options(images: dict[str, Path]) -> list[str]:
    """``--blockdev``/``--export`` options exporting each source read-only."""
    opts: list[str] = []
    for fmt, path in images.items():
        opts += ["--blockdev", f"driver=file,filename={path},node-name=f-{fmt},read-only=on"]
        opts += ["--blockdev", f"driver={fmt},file=f-{fmt},node-name={fmt},read-only=on"]
        opts += ["--export", f"type=nbd,id=e-{fmt},node-name={fmt},name={fmt}"]
    return opts


@contextmanager
def started(
    name: str, command: Sequence[str], images: dict[str, Path], timeout: float
) -> Iterator[Daemon]:
    """Start a daemon exporting ``images``; ``quit`` it on leaving (kill on error).

    A watchdog kills the daemon after ``timeout`` seconds: every client read
    then fails, which bounds the whole run.
    """
    base = Path(tempfile.mkdtemp(prefix="nb"))
    qmp_path, nbd_path = str(base / "q.sock"), str(base / "n.sock")
    full = [*command, "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off"]
    full += ["--monitor", "m", "--nbd-server", f"addr.type=unix,addr.path={nbd_path}"]
    full += source_options(images)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with (base / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stderr=err, env=env, cwd=base)
    watchdog = threading.Timer(timeout, proc.send_signal, args=(signal.SIGKILL,))
    watchdog.daemon = True
    watchdog.start()
    qmp: QMP | None = None
    ok = False
    try:
        deadline = time.monotonic() + 30.0
        while qmp is None:
            if proc.poll() is not None:
                text = (base / "stderr.txt").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with status {proc.returncode}: {text}")
            try:
                qmp = QMP(qmp_path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        daemon = Daemon(name, qmp, proc.pid, nbd_path, base)
        daemon.start_kib = status_kib(proc.pid, "VmRSS")
        yield daemon
        daemon.hwm_kib = status_kib(proc.pid, "VmHWM")
        qmp.file.write(b'{"execute":"quit"}\n')
        qmp.file.flush()
        proc.wait(30)
        ok = True
    finally:
        watchdog.cancel()
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            if ok:
                proc.terminate()
            else:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


class PeakRSS:
    """Polls a process's ``VmRSS`` in a thread while active; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = status_kib(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))


# -- the copies ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nbdcopy(src: str, dst: str, timeout: float, pid: int) -> tuple[float, float]:
    """Run nbdcopy once; its wall-clock seconds and daemon ``pid``'s CPU seconds."""
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    run_tool("nbdcopy", src, dst, timeout=timeout)
    return time.perf_counter() - start, cpu_seconds(pid) - cpu


def hash_through(uri: str, timeout: float) -> str:
    """The sha256 of an export's bytes, read with nbdcopy to a pipe."""
    proc = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        digest = hashlib.sha256()
        while chunk := proc.stdout.read(4 * MIB):
            digest.update(chunk)
        if proc.wait() != 0:
            raise RuntimeError(f"nbdcopy {uri} - failed")
    finally:
        timer.cancel()
        proc.stdout.close()
    return digest.hexdigest()


@dataclass
class Bench:
    """The workload: images, options, and the daemons it runs on."""

    args: argparse.Namespace
    tmp: Path
    images: dict[str, Path]
    digest: str
    daemons: list[Daemon]
    targets: int = 0
    backlog_retries: int = 0

    def read_once(self, d: Daemon, fmt: str, check: bool) -> tuple[float, float]:
        """Copy export ``fmt`` out once; MiB/s and the daemon's CPU seconds."""
        if check:
            got = hash_through(d.uri(fmt), self.args.timeout)
            if got != self.digest:
                raise RuntimeError(f"{d.name}: {fmt} export reads wrong bytes")
        dst = "null:" if self.args.sink == "null" else str(self.tmp / "out.img")
        secs, cpu = nbdcopy(d.uri(fmt), dst, self.args.timeout, d.pid)
        if dst != "null:":
            os.unlink(dst)
        return self.args.size / secs, cpu

    def write_once(self, d: Daemon, fmt: str, check: bool) -> tuple[float, float]:
        """Copy the raw source into a fresh writable ``fmt`` export once; MiB/s, CPU s."""
        self.targets += 1
        n = self.targets
        path = self.tmp / f"t{n}.{fmt}"
        run_tool("qemu-img", "create", "-q", "-f", fmt, str(path), f"{self.args.size}M")
        d.qmp.ok("blockdev-add", driver="file", filename=str(path), **{"node-name": f"tf{n}"})
        d.qmp.ok("blockdev-add", driver=fmt, file=f"tf{n}", **{"node-name": f"t{n}"})
        d.qmp.ok(
            "block-export-add",
            type="nbd",
            id=f"w{n}",
            **{"node-name": f"t{n}", "name": f"w{n}", "writable": True},
        )
        try:
            secs, cpu = nbdcopy(str(self.images["raw"]), d.uri(f"w{n}"), self.args.timeout, d.pid)
            if check and hash_through(d.uri(f"w{n}"), self.args.timeout) != self.digest:
                raise RuntimeError(f"{d.name}: {fmt} writable export holds wrong bytes")
        finally:
            d.qmp.ok("block-export-del", id=f"w{n}")
            d.qmp.wait_event("BLOCK_EXPORT_DELETED")
            d.qmp.ok("blockdev-del", **{"node-name": f"t{n}"})
            d.qmp.ok("blockdev-del", **{"node-name": f"tf{n}"})
            path.unlink()
        return self.args.size / secs, cpu

    def clients_once(self, d: Daemon) -> tuple[float, float]:
        """``--clients`` nbdcopy readers of the raw export at once; aggregate MiB/s, CPU s.

        Each reader uses one connection.  QEMU 7.2 listens with a backlog of
        one (so does qmpgraph), and libnbd gives up on a Unix socket whose
        backlog is full: a reader that failed so is started again.
        """
        count = self.args.clients
        cmd = ["nbdcopy", "--connections=1", d.uri("raw"), "null:"]
        cpu = cpu_seconds(d.pid)
        start = time.perf_counter()
        deadline = time.monotonic() + self.args.timeout
        procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE) for _ in range(count)]
        try:
            i = 0
            while i < len(procs):
                p = procs[i]
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if p.returncode and b"backlog overflowed" in err:
                    self.backlog_retries += 1
                    procs[i] = subprocess.Popen(cmd, stderr=subprocess.PIPE)
                    continue
                if p.returncode:
                    raise RuntimeError(f"nbdcopy failed: {err.decode(errors='replace')}")
                i += 1
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        secs = time.perf_counter() - start
        return count * self.args.size / secs, cpu_seconds(d.pid) - cpu

    def phase(self, key: str, fmt: str | None) -> None:
        """Run one phase ``--repeats`` times on each daemon, alternating."""
        for d in self.daemons:
            d.mib_s[key] = []
            d.cpu_s[key] = []
            d.peak_kib[key] = 0
        for i in range(self.args.repeats):
            for d in self.daemons:
                with PeakRSS(d.pid) as peak:
                    if key.startswith("read"):
                        assert fmt is not None
                        figure = self.read_once(d, fmt, check=i == 0)
                    elif key.startswith("write"):
                        assert fmt is not None
                        figure = self.write_once(d, fmt, check=i == 0)
                    else:
                        figure = self.clients_once(d)
                d.mib_s[key].append(figure[0])
                d.cpu_s[key].append(figure[1])
                d.peak_kib[key] = max(d.peak_kib[key], peak.peak)


PHASES = [
    ("read raw", "raw"),
    ("read qcow2", "qcow2"),
    ("write raw", "raw"),
    ("write qcow2", "qcow2"),
]


def print_table(bench: Bench) -> None:
    """The MiB/s medians and peak VmRSS of every phase, with ratios qmpgraph/qsd."""
    by = {d.name: d for d in bench.daemons}
    ref, cand = by.get("qsd"), by.get("qmpgraph")
    keys = list(bench.daemons[0].mib_s)
    a = bench.args
    print(
        f"{a.size} MiB image; nbdcopy defaults; median of {a.repeats} runs"
        f" (read sink: {a.sink}; clients: {a.clients} readers of the raw export at once)"
    )
    print(f"{'':22}{'qsd MiB/s':>11}{'qmpgraph':>10}{'ratio':>8}", end="")
    print(f"{'qsd CPU s':>11}{'qmpgraph':>9}{'ratio':>8}", end="")
    print(f"{'qsd peak RSS':>15}{'qmpgraph':>10}{'ratio':>8}")

    def fmt(v: float | None, width: int, spec: str) -> str:
        return f"{v:>{width}{spec}}" if v is not None else f"{'-':>{width}}"

    def ratio(x: float | None, y: float | None) -> str:
        return fmt(y / x if x and y else None, 7, ".2f") + "x"

    def speed(d: Daemon | None, key: str) -> float | None:
        return statistics.median(d.mib_s[key]) if d is not None else None

    def cpu(d: Daemon | None, key: str) -> float | None:
        return statistics.median(d.cpu_s[key]) if d is not None else None

    def mib(d: Daemon | None, kib: dict[str, int] | int | None, key: str = "") -> float | None:
        if d is None or kib is None:
            return None
        return (kib[key] if isinstance(kib, dict) else kib) / 1024

    for key in keys:
        x, y = speed(ref, key), speed(cand, key)
        rx = mib(ref, ref.peak_kib if ref else None, key)
        ry = mib(cand, cand.peak_kib if cand else None, key)
        cx, cy = cpu(ref, key), cpu(cand, key)
        line = f"{key:22}{fmt(x, 11, ',.0f')}{fmt(y, 10, ',.0f')}{ratio(x, y)}"
        line += f"{fmt(cx, 11, '.2f')}{fmt(cy, 9, '.2f')}{ratio(cx, cy)}"
        line += f"{fmt(rx, 11, ',.1f')} MiB{fmt(ry, 6, ',.1f')} MiB{ratio(rx, ry)}"
        print(line)
    for label, attr in (("VmRSS at start (MiB)", "start_kib"), ("VmHWM at end (MiB)", "hwm_kib")):
        x = mib(ref, getattr(ref, attr, None))
        y = mib(cand, getattr(cand, attr, None))
        print(f"{label:22}{fmt(x, 11, ',.1f')}{fmt(y, 10, ',.1f')}{ratio(x, y)}")
    print(
        "(ratios are qmpgraph / qsd: throughput above 1, CPU and memory below 1 favour"
        " qmpgraph; CPU s: the daemon's user+system time during one copy, median)"
    )
    if bench.backlog_retries:
        print(f"({bench.backlog_retries} clients-phase readers restarted: listen backlog full)")
    if ref is not None and cand is not None and "read raw" in ref.mib_s:
        r = statistics.median(cand.mib_s["read raw"]) / statistics.median(ref.mib_s["read raw"])
        verdict = "met" if r >= READ_GOAL else "MISSED"
        print(f"goal: raw read throughput qmpgraph/qsd >= {READ_GOAL}: {r:.2f}x {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Make the images, run every phase on both daemons, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image size in MiB (512)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase (median)")
    parser.add_argument("--clients", type=int, default=8, help="readers in the clients phase")
    parser.add_argument("--sink", choices=["null", "file"], default="null", help="read target")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per daemon")
    parser.add_argument("--dir", help="where the images go (default: a temporary directory)")
    parser.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    parser.add_argument("--only", choices=["qsd", "qmpgraph"], help="measure one daemon")
    parser.add_argument(
        "--phases", help="comma-separated subset of: read raw,read qcow2,write raw,..."
    )
    parser.add_argument("--profile", metavar="FILE", help="run qmpgraph under cProfile")
    args = parser.parse_args(argv)
    if args.qsd is None and args.only != "qmpgraph":
        print("qemu-storage-daemon not found (use --qsd PATH)", file=sys.stderr)
        return 2
    for tool in ("nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2

    qmpgraph = [sys.executable, "-m", "qmpgraph", "daemon"]
    if args.profile:
        qmpgraph = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "qmpgraph"]
        qmpgraph.append("daemon")
    commands = {"qsd": [args.qsd], "qmpgraph": qmpgraph}
    chosen = [name for name in commands if args.only in (None, name)]
    wanted = [*PHASES, ("clients", None)]
    if args.phases:
        names = args.phases.split(",")
        wanted = [p for p in wanted if p[0] in names]

    tmp = Path(tempfile.mkdtemp(prefix="nbdbench", dir=args.dir))
    try:
        images = {"raw": tmp / "src.raw", "qcow2": tmp / "src.qcow2"}
        digest = make_source(images["raw"], args.size)
        run_tool(
            "qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(images["raw"]),
            str(images["qcow2"]), timeout=args.timeout,
        )  # fmt: skip
        with ExitStack() as stack:
            daemons = [
                stack.enter_context(started(n, commands[n], images, args.timeout)) for n in chosen
            ]
            bench = Bench(args, tmp, images, digest, daemons)
            for key, fmt in wanted:
                bench.phase(key, fmt)
        print_table(bench)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.profile:
        print(f"\nqmpgraph profile ({args.profile}), top functions by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
