"""qemu-storage-daemon 7.2's options, processed in order as QEMU does.

QEMU scans the command line twice. The first pass handles only ``-h``,
``-V``, ``--daemonize``, ``--pidfile`` and malformed options (so ``--help``
anywhere wins over a later bad option, and a bad option anywhere stops
start-up before anything is created). The second pass handles everything
else in order, each option fully (parsed *and* acted on) before the next is
read: an option can refer only to what an earlier one created, and the
first failure, whatever its kind, is the one reported.

qmpgraph adds options of its own, ``--transaction-log PATH`` and ``--clock
realtime|virtual``: matched only when spelled in full (so no qsd
abbreviation becomes ambiguous) and taken in the first pass, since the
daemon's log and clock must exist before the first ``--blockdev`` runs.

``process_options`` does the parsing and the bookkeeping QEMU does in its
registries (chardev ids, which chardev a monitor uses); it hands every
accepted option to an ``Applier`` (the server's start-up), which does the
I/O and may itself raise ``CmdlineError``. Messages are QEMU's, with the
program name ``qmpgraph``.

What does not live here: sockets, the pidfile, daemonizing
(``qmpgraph.server.startup``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from qmpgraph import QEMU_VERSION, __version__
from qmpgraph.cmdline.chardev import (
    ChardevHelp,
    ChardevSpec,
    MonitorSpec,
    parse_chardev,
    parse_monitor,
)
from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.cmdline.getopt import NONOPTION, Opt, OptSpec, getopt_long
from qmpgraph.cmdline.keyval import option_dict
from qmpgraph.cmdline.qemuopts import TRACE_OPTS, parse_opts

__all__ = [
    "PROG",
    "Applier",
    "Exit",
    "OptionArgs",
    "PrePass",
    "help_text",
    "pre_pass",
    "process_options",
    "version_text",
]

#: The program name in messages (QEMU prints its own, "qemu-storage-daemon").
PROG = "qmpgraph"

OPTIONS = (
    OptSpec("blockdev", None, True),
    OptSpec("chardev", None, True),
    OptSpec("daemonize", None, False),
    OptSpec("export", None, True),
    OptSpec("help", "h", False),
    OptSpec("monitor", None, True),
    OptSpec("nbd-server", None, True),
    OptSpec("object", None, True),
    OptSpec("pidfile", None, True),
    OptSpec("trace", "T", True),
    OptSpec("version", "V", False),
    # qmpgraph's own: matched only in full, handled in the pre-pass.
    OptSpec("transaction-log", None, True, exact=True),
    OptSpec("clock", None, True, exact=True),
)
_PRE_PASS = frozenset({"help", "version", "daemonize", "pidfile", "transaction-log", "clock"})
_OWN = frozenset({"transaction-log", "clock"})


class Exit(Exception):
    """Start-up ends here with ``status`` (messages are already printed)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class OptionArgs:
    """A ``--blockdev``, ``--export``, ``--nbd-server`` or ``--object``, as
    QEMU's option visitor receives it: ``options`` is the keyval tree (all
    leaves strings, ``keyval`` true) or the JSON object (typed leaves). The
    implied key is already filled in (``driver``, ``type``, ``qom-type``).
    """

    option: str
    options: dict[str, Any]
    keyval: bool


class Applier(Protocol):
    """What start-up does with each accepted option, in command-line order."""

    def chardev(self, spec: ChardevSpec, report: ReportFn) -> None:
        """Create the chardev (bind or connect); raise CmdlineError on failure."""

    def monitor(self, spec: MonitorSpec) -> None:
        """Attach a QMP monitor to an existing, unused chardev."""

    def option(self, args: OptionArgs, report: ReportFn) -> None:
        """Act on a --blockdev, --export, --nbd-server or --object
        (``report`` prints a warning located at it)."""


class ReportFn(Protocol):
    """Prints one message located at the current option (QEMU's error_report)."""

    def __call__(self, msg: str) -> None:
        """Print ``msg``."""


def version_text() -> str:
    """What ``-V`` prints."""
    qemu = "{major}.{minor}.{micro}".format(**QEMU_VERSION)
    return (
        f"{PROG} version {__version__} (qemu-storage-daemon {qemu} compatible)\n"
        "Copyright (c) 2025 the qmpgraph authors\n"
    )


def help_text() -> str:
    """What ``-h`` prints: qsd's option list, naming qmpgraph."""
    return f"""\
Usage: {PROG} daemon [options]
qmpgraph: the QMP block-graph control plane of the QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options (parsed, no effect)
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (socket and null: see the qemu(1) man page)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object <type>[,<property>=<value>...]
                         create a new object of type <type>; the 'id'
                         property must be set

  --pidfile <path>       write process ID to a file after startup

qmpgraph extensions (spelled in full, never abbreviated):

  --transaction-log <path>
                         append every block-graph transaction (including
                         those of --blockdev) to <path> as JSON Lines, for
                         audit and `qmpgraph replay <path>`

  --clock realtime|virtual
                         where event timestamps and job timers take their
                         time from; `virtual` starts at 0, moves 1 us per
                         event and jumps over job sleeps, and runs jobs in a
                         fixed order, so the same script gives the same
                         transcript byte for byte (default: realtime)

With no options at all, a QMP monitor listens on $XDG_RUNTIME_DIR/qmpgraph.sock
(or /tmp/qmpgraph.sock).
"""


@dataclass(slots=True)
class PrePass:
    """The first pass's result: what must be known before anything starts."""

    daemonize: bool = False
    pidfile: str | None = None
    #: ``--transaction-log PATH`` (qmpgraph's extension; the last one wins).
    transaction_log: str | None = None
    #: ``--clock NAME`` (qmpgraph's extension): "realtime" or "virtual".
    clock: str = "realtime"
    #: Whether any qsd option (anything but qmpgraph's own) was given.
    qsd_options: bool = False


def _error(err: TextIO, msg: str, location: str | None = None) -> None:
    where = f"{location}: " if location is not None else ""
    err.write(f"{PROG}: {where}{msg}\n")
    err.flush()


def pre_pass(argv: list[str], out: TextIO, err: TextIO) -> PrePass:
    """QEMU's first pass over ``argv`` (without the program name).

    Raises ``Exit`` for help, version, and malformed options.
    """
    result = PrePass()
    for opt in getopt_long(OPTIONS, argv):
        if isinstance(opt, CmdlineError):
            _error(err, opt.msg)
            raise Exit(1)
        if opt.name not in _OWN:
            result.qsd_options = True
        if opt.name not in _PRE_PASS:
            continue
        if opt.name == "help":
            out.write(help_text())
            out.flush()
            raise Exit(0)
        if opt.name == "version":
            out.write(version_text())
            out.flush()
            raise Exit(0)
        if opt.name == "daemonize":
            result.daemonize = True
        elif opt.name == "pidfile":
            result.pidfile = opt.arg
        elif opt.name == "transaction-log":
            result.transaction_log = opt.arg
        elif opt.name == "clock":
            if opt.arg not in ("realtime", "virtual"):
                _error(err, f"--clock {opt.arg}: expected 'realtime' or 'virtual'")
                raise Exit(1)
            result.clock = opt.arg
    return result


@dataclass(slots=True)
class _Registry:
    """QEMU's bookkeeping of chardevs during start-up."""

    chardevs: dict[str, ChardevSpec] = field(default_factory=dict)
    # Socket chardevs register a "yank instance" before they bind.
    yank: set[str] = field(default_factory=set)
    in_use: set[str] = field(default_factory=set)


_IMPLIED = {"blockdev": "driver", "export": "type", "object": "qom-type", "nbd-server": None}


def process_options(argv: list[str], applier: Applier, out: TextIO, err: TextIO) -> None:
    """QEMU's second pass: every option but the pre-pass ones, in order.

    Raises ``Exit`` (message printed) at the first failure.
    """
    reg = _Registry()
    for opt in getopt_long(OPTIONS, argv):
        # Malformed options ended the first pass already.
        assert isinstance(opt, Opt)
        if opt.name in _PRE_PASS:
            continue
        try:
            _one(opt, reg, applier, out, err)
        except CmdlineError as exc:
            for warning in exc.warnings:
                _error(err, warning, opt.location)
            _error(err, exc.msg, opt.location)
            raise Exit(1) from None


def _one(opt: Opt, reg: _Registry, applier: Applier, out: TextIO, err: TextIO) -> None:
    arg = opt.arg if opt.arg is not None else ""

    def report(msg: str) -> None:
        _error(err, msg, opt.location)

    if opt.name == NONOPTION:
        raise CmdlineError("Unexpected argument")
    if opt.name == "trace":
        # Parsed for its syntax; qmpgraph has no trace events to enable.
        trace = parse_opts(TRACE_OPTS, arg)
        for warning in trace.warnings:
            report(warning)
    elif opt.name == "chardev":
        try:
            spec, warnings = parse_chardev(arg)
        except ChardevHelp as h:
            out.write(h.text)
            out.flush()
            raise Exit(h.status) from None
        for warning in warnings:
            report(warning)
        if spec.backend == "socket":
            if spec.id in reg.yank:
                raise CmdlineError("duplicate yank instance")
            reg.yank.add(spec.id)
        applier.chardev(spec, report)
        if spec.id in reg.chardevs:
            raise CmdlineError(
                f"attempt to add duplicate property '{spec.id}' to object (type 'container')"
            )
        reg.chardevs[spec.id] = spec
    elif opt.name == "monitor":
        mon = parse_monitor(arg)
        if mon.chardev not in reg.chardevs:
            raise CmdlineError(f'chardev "{mon.chardev}" not found')
        if mon.mode != "control":
            raise CmdlineError("Only QMP is supported")
        if mon.chardev in reg.in_use:
            raise CmdlineError(f"Device '{mon.chardev}' is in use")
        reg.in_use.add(mon.chardev)
        applier.monitor(mon)
    else:
        options, keyval = option_dict(arg, _IMPLIED[opt.name])
        applier.option(OptionArgs(opt.name, options, keyval), report)
