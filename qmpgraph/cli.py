"""``qmpgraph``: the command line. Thin: it parses and calls the library.

``qmpgraph daemon [qemu-storage-daemon options]`` runs the daemon; with no
options it listens on the default QMP socket.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from qmpgraph import __version__
from qmpgraph.server.run import DaemonConfig, MonitorConfig, run_daemon


def default_socket_path() -> str:
    """Where the argument-less daemon listens: ``$XDG_RUNTIME_DIR`` or ``/tmp``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, "qmpgraph.sock")


def _daemon(argv: list[str]) -> int:
    config = DaemonConfig()
    if not argv:
        path = default_socket_path()
        config.monitors.append(MonitorConfig(path=path))
        print(f"qmpgraph {__version__}: QMP monitor listening on {path}", flush=True)
        print(f"connect with: qmp-shell {path}", flush=True)
    else:
        chardevs: dict[str, str] = {}
        it = iter(argv)
        for opt in it:
            val = next(it)
            kv = dict(p.split("=", 1) for p in val.split(",")[1:])
            if opt == "--chardev":
                chardevs[kv["id"]] = kv["path"]
            elif opt == "--monitor":
                name = val.split(",")[0].removeprefix("chardev=")
                config.monitors.append(MonitorConfig(path=chardevs[name]))
    try:
        trio.run(run_daemon, config)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qmpgraph`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "daemon":
        return _daemon(args[1:])
    parser = argparse.ArgumentParser(prog="qmpgraph")
    parser.add_argument("command", choices=["daemon"])
    parser.parse_args(args)
    return 0
