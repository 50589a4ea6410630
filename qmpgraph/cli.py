"""``qmpgraph``: the command line. Thin: it parses and calls the library.

``qmpgraph daemon [qemu-storage-daemon options]`` runs the daemon and takes
qsd 7.2's own syntax (see ``qmpgraph.cmdline``), plus qmpgraph's
``--transaction-log PATH``; with no qsd options at all it listens on the
default QMP socket (``default_socket_path()``). ``qmpgraph replay PATH``
hands its arguments to ``qmpgraph.replay.main``. Every other subcommand is
an ``argparse`` subparser: add one in ``_subcommands`` with a function
taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TextIO

import trio

from qmpgraph import __version__, replay
from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.cmdline.qsd import PROG, Exit, pre_pass, process_options
from qmpgraph.daemon import Daemon
from qmpgraph.jobs.clock import make_clock
from qmpgraph.server.run import serve_prepared
from qmpgraph.server.startup import Daemonizer, PidFile, Startup, write_pidfile

Subcommand = Callable[[argparse.Namespace], int]


def default_socket_path() -> str:
    """Where the argument-less daemon listens: ``$XDG_RUNTIME_DIR`` or ``/tmp``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, "qmpgraph.sock")


def run_daemon_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """``qmpgraph daemon ARGS``: qsd's start-up sequence, then serve; the exit status."""
    try:
        pre = pre_pass(argv, out, err)
    except Exit as e:
        return e.status
    daemonizer = Daemonizer()
    if pre.daemonize:
        daemonizer.start()
    try:
        daemon = Daemon(transaction_log=pre.transaction_log, clock=make_clock(pre.clock))
    except OSError as e:
        err.write(f"{PROG}: --transaction-log {pre.transaction_log}: {e.strerror}\n")
        err.flush()
        return 1
    startup = Startup(daemon)
    pidfile: PidFile | None = None
    try:
        process_options(argv, startup, out, err)
        if not pre.qsd_options:
            path = default_socket_path()
            try:
                startup.add_default_monitor(path)
            except CmdlineError as e:
                err.write(f"{PROG}: {e.msg}\n")
                raise Exit(1) from None
            out.write(f"qmpgraph {__version__}: QMP monitor listening on {path}\n")
            out.write(f"qmp-shell {path}\n")
            out.flush()
        # Written once every monitor listens: the readiness signal.
        if pre.pidfile is not None:
            try:
                pidfile = write_pidfile(pre.pidfile)
            except CmdlineError as e:
                err.write(f"{PROG}: cannot create PID file: {e.msg}\n")
                err.flush()
                raise Exit(1) from None
    except Exit as e:
        startup.close()
        daemon.stop()
        return e.status
    except KeyboardInterrupt:
        startup.close()
        daemon.stop()
        return 1
    except BaseException:
        # A bug: still, no socket file or open log may outlive start-up.
        startup.close()
        daemon.stop()
        raise
    daemonizer.done()
    try:
        trio.run(partial_serve, startup, daemon)
    except KeyboardInterrupt:
        # SIGINT before the signal receiver was installed.
        pass
    finally:
        startup.close()
        if daemon.transaction_log is not None:
            daemon.transaction_log.close()
        if pidfile is not None:
            pidfile.remove()
    return 0


async def partial_serve(startup: Startup, daemon: Daemon) -> None:
    """Serve the monitors start-up prepared, stopping on signals."""
    await serve_prepared(startup.monitors, daemon, handle_signals=True)


def _subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare the argparse subcommands (``daemon`` is handled before argparse)."""
    sub.add_parser(
        "daemon",
        help="run the daemon; takes qemu-storage-daemon's options (see `qmpgraph daemon -h`)",
        add_help=False,
    )
    sub.add_parser(
        "replay",
        help="replay a transaction log against a fresh engine (see `qmpgraph replay -h`)",
        add_help=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmpgraph`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "daemon":
        # qsd's syntax, not argparse's: handed over verbatim.
        return run_daemon_command(args[1:], sys.stdout, sys.stderr)
    if args and args[0] == "replay":
        return replay.main(args[1:])
    parser = argparse.ArgumentParser(
        prog="qmpgraph", description="A QEMU-exact stand-in for qemu-storage-daemon's QMP."
    )
    parser.add_argument("-V", "--version", action="version", version=f"qmpgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _subcommands(sub)
    ns = parser.parse_args(args)
    handler: Subcommand | None = getattr(ns, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(ns)
