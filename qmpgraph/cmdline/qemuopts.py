"""QemuOpts: the older ``key=value`` syntax of ``--chardev`` and ``-T``.

Differences from keyval that users meet: every value (the implied first one
too) may contain ``,,`` for a comma; a bare ``flag`` means ``flag=on`` and
``noflag`` means ``flag=off`` (with a deprecation warning); keys are checked
against a fixed list as they are read; ``id`` is taken aside (the last one
wins) and must be an identifier.

What does not live here: what a chardev means (``qmpgraph.cmdline.chardev``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qmpgraph.cmdline.errors import CmdlineError

__all__ = ["CHARDEV_OPTS", "TRACE_OPTS", "OptsList", "QemuOpts", "parse_bool", "parse_opts"]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


@dataclass(frozen=True, slots=True)
class OptsList:
    """A QemuOpts list: its name, implied first key and typed keys."""

    name: str
    implied: str
    keys: dict[str, str]  # key -> "str" | "bool" | "num" | "size"


# The keys QEMU 7.2 accepts for any --chardev (one list for all backends).
CHARDEV_OPTS = OptsList(
    "chardev",
    "backend",
    {
        "backend": "str",
        "path": "str",
        "host": "str",
        "port": "str",
        "fd": "str",
        "localaddr": "str",
        "localport": "str",
        "to": "num",
        "ipv4": "bool",
        "ipv6": "bool",
        "wait": "bool",
        "server": "bool",
        "delay": "bool",
        "nodelay": "bool",
        "reconnect": "num",
        "telnet": "bool",
        "tn3270": "bool",
        "tls-creds": "str",
        "tls-authz": "str",
        "websocket": "bool",
        "width": "num",
        "height": "num",
        "cols": "num",
        "rows": "num",
        "mux": "bool",
        "signal": "bool",
        "name": "str",
        "debug": "num",
        "size": "size",
        "chardev": "str",
        "append": "bool",
        "logfile": "str",
        "logappend": "bool",
        "mouse": "bool",
        "clipboard": "bool",
        "tight": "bool",
        "abstract": "bool",
    },
)

TRACE_OPTS = OptsList("trace", "enable", {"enable": "str", "events": "str", "file": "str"})

_TYPE_HELP = {"str": "str", "bool": "bool (on/off)", "num": "num", "size": "size"}


@dataclass(slots=True)
class QemuOpts:
    """Parsed options: values in the order given (repeats kept), the id,
    whether help was asked for, and the deprecation warnings to print."""

    values: list[tuple[str, str]] = field(default_factory=list)
    id: str | None = None
    help: bool = False
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        """The last value given for ``key`` (QEMU's ``qemu_opt_get``)."""
        for k, v in reversed(self.values):
            if k == key:
                return v
        return None

    def get_bool(self, key: str, default: bool) -> bool:
        """``key`` as a boolean (already validated), or ``default``."""
        v = self.get(key)
        return default if v is None else v in _TRUE

    def get_number(self, key: str) -> int | None:
        """``key`` as a number option (already validated: QEMU's
        ``qemu_opt_get_number``, a uint64), or None when not given."""
        v = self.get(key)
        return None if v is None else parse_number(v)


def parse_bool(name: str, value: str) -> bool:
    """QEMU's ``qapi_bool_parse``: on/yes/true/y and off/no/false/n."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CmdlineError(f"Parameter '{name}' expects 'on' or 'off'")


def _value(params: str, pos: int) -> tuple[str, int]:
    """Read a value up to a single comma; ``,,`` is a literal comma."""
    out: list[str] = []
    n = len(params)
    while pos < n:
        if params[pos] == ",":
            if pos + 1 < n and params[pos + 1] == ",":
                out.append(",")
                pos += 2
                continue
            break
        out.append(params[pos])
        pos += 1
    return "".join(out), pos


def _fragments(
    params: str, implied: str | None, warnings: list[str] | None
) -> list[tuple[str, str, bool]]:
    """(name, value, is_help) for each fragment, QEMU's get_opt_name_value."""
    out: list[tuple[str, str, bool]] = []
    pos = 0
    while pos < len(params):
        end = pos
        while end < len(params) and params[end] not in "=,":
            end += 1
        is_help = False
        if end >= len(params) or params[end] != "=":
            if implied is not None:
                name = implied
                value, pos = _value(params, pos)
            else:
                name, pos = params[pos:end], end
                prefix = ""
                if name.startswith("no"):
                    name, value, prefix = name[2:], "off", "no"
                else:
                    value = "on"
                    is_help = name in ("help", "?")
                if not is_help and warnings is not None:
                    better = (
                        f"nodelay={'on' if prefix else 'off'}"
                        if name == "delay"
                        else f"{name}={value}"
                    )
                    warnings.append(
                        f"warning: short-form boolean option '{prefix}{name}' deprecated\n"
                        f"Please use {better} instead"
                    )
        else:
            name = params[pos:end]
            value, pos = _value(params, end + 1)
        out.append((name, value, is_help))
        if pos < len(params) and params[pos] == ",":
            pos += 1
        implied = None
    return out


def parse_opts(opts_list: OptsList, params: str) -> QemuOpts:
    """Parse ``params`` as QEMU's ``qemu_opts_parse_noisily`` does.

    Deprecation warnings are collected in the result; the first invalid key
    or value raises ``CmdlineError`` (warnings for fragments before it are
    in the exception's ``warnings`` attribute).
    """
    result = QemuOpts()
    # The id comes from a first, silent scan (no implied key: a leading
    # "socket" is read as a flag, so it never counts as an id).
    for name, value, _ in _fragments(params, None, None):
        if name == "id":
            result.id = value
    if result.id is not None and _ID.fullmatch(result.id) is None:
        raise CmdlineError(
            "Parameter 'id' expects an identifier\n"
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        )
    warnings: list[str] = []
    for name, value, is_help in _fragments(params, opts_list.implied, warnings):
        if is_help:
            result.help = True
            break
        if name == "id":
            continue
        try:
            _check(opts_list, name, value)
        except CmdlineError as exc:
            exc.warnings = warnings
            raise
        result.values.append((name, value))
    result.warnings = warnings
    return result


def _check(opts_list: OptsList, name: str, value: str) -> None:
    kind = opts_list.keys.get(name)
    if kind is None:
        raise CmdlineError(f"Invalid parameter '{name}'")
    if kind == "bool":
        parse_bool(name, value)
    elif kind == "num" and not _is_number(value):
        raise CmdlineError(f"Parameter '{name}' expects a number")


def _is_number(value: str) -> bool:
    return parse_number(value) is not None


def parse_number(value: str) -> int | None:
    """qemu_strtou64 with base 0: decimal, 0x hex or 0 octal; a '-' wraps
    modulo 2^64. None when ``value`` is not a number."""
    text = value.strip(" \t\n\v\f\r")
    negative = text[:1] == "-"
    text = text[1:] if text[:1] in "+-" else text
    try:
        number = int(text, 0 if not re.fullmatch(r"0[0-7]+", text) else 8)
    except ValueError:
        return None
    return (-number if negative else number) % (1 << 64)


def opts_help(opts_list: OptsList) -> str:
    """The listing printed for ``--chardev <backend>,help``."""
    lines = [f"{opts_list.name} options:"]
    lines += [f"  {k}=<{_TYPE_HELP[t]}>" for k, t in sorted(opts_list.keys.items())]
    return "\n".join(lines) + "\n"
