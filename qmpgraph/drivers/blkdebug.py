"""The ``blkdebug`` driver: an error-injecting filter over ``image`` (control plane).

blkdebug is a protocol driver (QEMU opens it with ``bdrv_file_open``) and a
filter: its one child ``image`` is FILTERED|PRIMARY.  Open follows
blkdebug_open's order and messages: the rules (a ``config`` file in QEMU's
ini-like syntax, then the ``inject-error``/``set-state`` lists), the
permission modifiers, ``image``, then the alignment and limit constraints
against the child's request alignment.  The rules are parsed and checked but
never fire: there is no data path.  ``take-child-perms`` and
``unshare-child-perms`` change the permissions on ``image``.

Filenames: ``blkdebug:<config>:<image's exact filename>`` when only ``config``
was given, else a json: filename with the strong options flattened as QEMU
keeps them (``inject-error.0.event``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import (
    FILTERED,
    ChildSpec,
    Driver,
    OpenContext,
    file_child,
    node_alignment,
    node_size,
)
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import Perm
from qmpgraph.protocol.qjson import qdict_order

_INT_MAX = (1 << 31) - 1
_PERM_BITS = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}
# The BlkdebugEvent enum of QEMU 7.2 (its QAPI names).
EVENTS = frozenset(
    [
        "l1_update",
        "l1_grow_alloc_table",
        "l1_grow_write_table",
        "l1_grow_activate_table",
        "l2_load",
        "l2_update",
        "l2_update_compressed",
        "l2_alloc_cow_read",
        "l2_alloc_write",
        "read_aio",
        "read_backing_aio",
        "read_compressed",
        "write_aio",
        "write_compressed",
        "vmstate_load",
        "vmstate_save",
        "cow_read",
        "cow_write",
        "reftable_load",
        "reftable_grow",
        "reftable_update",
        "refblock_load",
        "refblock_update",
        "refblock_update_part",
        "refblock_alloc",
        "refblock_alloc_hookup",
        "refblock_alloc_write",
        "refblock_alloc_write_blocks",
        "refblock_alloc_write_table",
        "refblock_alloc_switch_table",
        "cluster_alloc",
        "cluster_alloc_bytes",
        "cluster_free",
        "flush_to_os",
        "flush_to_disk",
        "pwritev_rmw_head",
        "pwritev_rmw_after_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_tail",
        "pwritev",
        "pwritev_zero",
        "pwritev_done",
        "empty_image_prepare",
        "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters",
        "cor_write",
        "cluster_alloc_space",
        "none",
    ]
)
IO_TYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush", "block-status"})
# QemuOptsList descriptions of the two rule groups: option -> type.
_RULE_OPTS: dict[str, dict[str, str]] = {
    "inject-error": {
        "event": "string",
        "state": "number",
        "iotype": "string",
        "errno": "number",
        "sector": "number",
        "once": "bool",
        "immediately": "bool",
    },
    "set-state": {"event": "string", "state": "number", "new_state": "number"},
}
# blkdebug_strong_runtime_opts (a trailing dot matches a prefix).
_STRONG = ("config", "inject-error.", "set-state.", "align", "max-transfer",
           "opt-write-zero", "max-write-zero", "opt-discard", "max-discard")  # fmt: skip
# Keys that still allow the blkdebug:config:image filename.
_PLAIN_KEYS = frozenset({"config", "image", "x-image", "driver"})
# sscanf patterns of a group header: the trailing ']' need not match.
_GROUP_WITH_ID = re.compile(r'\[(\S{1,63})\s*"([^"]{1,63})"')
_GROUP = re.compile(r"\[([^\]]{1,63})")
# QAPI member order of BlockdevOptionsBlkdebug's lists (the order QEMU builds them in).
_MEMBERS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
_SIZE_OPTIONS = ("align", "max-transfer", "opt-write-zero", "max-write-zero",
                 "opt-discard", "max-discard")  # fmt: skip


@dataclass(frozen=True, slots=True)
class BlkdebugState:
    """Per-node state of a blkdebug node."""

    config: str | None
    align: int
    take: int
    unshare: int
    rules: tuple[tuple[str, dict[str, Any]], ...]


def _absorb(group: str, values: dict[str, str]) -> dict[str, Any]:
    """qemu_opts_absorb_qdict for one config group, with QemuOpts' type errors."""
    desc = _RULE_OPTS[group]
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = desc.get(key)
        if kind is None:
            raise GenericError(f"Invalid parameter '{key}'")
        if kind == "number":
            try:
                out[key] = int(value, 0)
            except ValueError:
                raise GenericError(f"Parameter '{key}' expects a number") from None
        elif kind == "bool":
            if value not in ("on", "off"):
                raise GenericError(f"Parameter '{key}' expects 'on' or 'off'")
            out[key] = value == "on"
        else:
            out[key] = value
    return out


def _assignment(line: str) -> tuple[str, str] | None:
    """sscanf's ``" %63s = \"%1023[^\"]\""``: the first token, and a quoted value if any.

    sscanf counts a line whose token converted as a match even when the rest
    of the pattern fails, so any line with a token is an assignment (with an
    empty value unless the whole pattern matched).
    """
    m = re.match(r"\s*(\S{1,63})", line)
    if m is None:
        return None
    value = re.match(r'\s*=\s*"([^"]{1,1023})"', line[m.end() :])
    return m.group(1), value.group(1) if value else ""


def parse_config(text: str) -> tuple[list[tuple[str, dict[str, Any]]], GenericError | None]:
    """qemu_config_parse over blkdebug's two groups: (group, options) in file order.

    QEMU 7.2 reports a bad group (unknown name, option or value) without
    failing the parse: that error is returned as pending and the open goes
    on (any later error would hit an assertion in QEMU; here the pending
    error wins).
    """
    groups: list[tuple[str, dict[str, Any]]] = []
    current: tuple[str, dict[str, str]] | None = None
    pending: GenericError | None = None

    def flush() -> None:
        nonlocal pending
        if current is not None:
            name, values = current
            if name not in _RULE_OPTS:
                pending = pending or GenericError(f"There is no option group '{name}'")
                return
            try:
                groups.append((name, _absorb(name, values)))
            except GenericError as err:
                pending = pending or err

    for line in text.splitlines(keepends=True):
        if line.startswith("\n") or line.startswith("#"):
            continue
        if line.startswith("["):
            m = _GROUP_WITH_ID.match(line) or _GROUP.match(line)
            if m is not None:
                flush()
                current = (m.group(1), {})
                continue
        pair = _assignment(line)
        error = "parse error" if pair is None else "no group defined" if current is None else ""
        if error:
            raise pending or GenericError(error)
        assert pair is not None and current is not None
        current[1][pair[0]] = pair[1]
    flush()
    return groups, pending


def _read_config(path: str) -> str:
    try:
        with open(path, "rb") as f:
            try:
                return f.read().decode("latin-1")
            except OSError as err:
                raise GenericError(
                    f"Cannot read config file: {os.strerror(err.errno or 0)}"
                ) from err
    except IsADirectoryError:
        # fopen() succeeds on a directory; the first read fails.
        raise GenericError(f"Cannot read config file: {os.strerror(21)}") from None
    except OSError as err:
        raise GenericError(
            f"Could not read blkdebug config file: {os.strerror(err.errno or 0)}"
        ) from err


def _check_rule(group: str, opts: dict[str, Any]) -> None:
    """add_rule's checks: an event name, a known event, a known I/O type."""
    event = opts.get("event")
    if event is None:
        raise GenericError("Missing event name for rule")
    if event not in EVENTS:
        raise GenericError(f"invalid parameter value: {event}")
    if group == "inject-error" and "iotype" in opts and opts["iotype"] not in IO_TYPES:
        raise GenericError(f"invalid parameter value: {opts['iotype']}")


def _perm_mask(names: Any) -> int:
    mask = 0
    for name in names or ():
        mask |= _PERM_BITS[str(name)]
    return mask


class Blkdebug(Driver):
    """blkdebug: fault injection by rules (the rules never fire here)."""

    format_name = "blkdebug"
    protocol = True
    is_filter = True
    options = frozenset(
        {
            "config",
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
            "inject-error",
            "set-state",
            "take-child-perms",
            "unshare-child-perms",
        }
    )
    children = (ChildSpec("image", FILTERED),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """blkdebug_open: rules, perm modifiers, ``image``, then the constraints."""
        self.reject_unknown(options)
        # qemu_opts_absorb_qdict parses the size options in QDict order.
        for key in qdict_order([k for k in _SIZE_OPTIONS if k in options]):
            if int(options[key]) < 0:
                raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")
        config = options.get("config")
        rules: list[tuple[str, dict[str, Any]]] = []
        pending: GenericError | None = None
        if config is not None:
            rules, pending = parse_config(_read_config(str(config)))
        for group in ("inject-error", "set-state"):
            for item in options.get(group) or ():
                rules.append((group, dict(item)))
        # add_rule runs over all inject-error rules, then all set-state ones.
        ordered = [r for r in rules if r[0] == "inject-error"]
        ordered += [r for r in rules if r[0] == "set-state"]
        try:
            for group, opts in ordered:
                _check_rule(group, opts)
        except GenericError:
            if pending is None:
                raise
            raise pending from None
        take = _perm_mask(options.get("take-child-perms"))
        unshare = _perm_mask(options.get("unshare-child-perms"))
        node.state = BlkdebugState(
            None if config is None else str(config), 0, take, unshare, tuple(ordered)
        )
        edge = ctx.open_child(node, options, "image", FILTERED)
        assert edge is not None and edge.child is not None
        child = edge.child
        if pending is not None:
            raise pending
        child_align = node_alignment(child)
        align = int(options.get("align", 0))
        if align and (align >= _INT_MAX or align & (align - 1)):
            raise GenericError(f"Cannot meet constraints with align {align}")
        base = max(align, child_align)
        self._check_limit(options, "max-transfer", base)
        opt_wz = self._check_limit(options, "opt-write-zero", base)
        self._check_limit(options, "max-write-zero", max(opt_wz, base))
        opt_discard = self._check_limit(options, "opt-discard", base)
        self._check_limit(options, "max-discard", max(opt_discard, base))
        node.state = BlkdebugState(
            None if config is None else str(config), align, take, unshare, tuple(ordered)
        )

    @staticmethod
    def _check_limit(options: dict[str, Any], key: str, align: int) -> int:
        value = int(options.get(key, 0))
        if value and (value >= _INT_MAX or value % align):
            raise GenericError(f"Cannot meet constraints with {key} {value}")
        return value

    def adjust_default_perms(
        self, node: Node, perm: int, shared: int, nperm: int, nshared: int
    ) -> tuple[int, int]:
        """The default rule, plus the configured extra and unshared perms."""
        del perm, shared
        state = node.state
        if isinstance(state, BlkdebugState):
            nperm |= state.take
            nshared &= ~state.unshare
        return int(nperm), int(nshared)

    def request_alignment(self, node: Node) -> int:
        """The configured alignment, at least the child's."""
        state = node.state
        base = node_alignment(file_child(node))
        align = state.align if isinstance(state, BlkdebugState) else 0
        return max(align, base)

    def size(self, node: Node) -> int:
        """The image's size."""
        return node_size(file_child(node))

    def strong_options(self, node: Node) -> dict[str, Any]:
        """The strong runtime options, flattened and ordered as bs->options holds them.

        qdict_flatten visits the list-valued options and each rule's members
        in QDict order, inserting flat keys as it goes; append_strong_runtime_
        options then copies prefix matches in bs->options' iteration order.
        """
        options = node.options
        flat_keys: list[str] = []
        for group in qdict_order([g for g in _MEMBERS if options.get(g)]):
            for index, rule in enumerate(options[group]):
                members = [k for k in _MEMBERS[group] if k in rule]
                flat_keys += [f"{group}.{index}.{k}" for k in qdict_order(members)]
        # An inline child's options were flattened in its topmost parent's
        # QDict, then extracted level by level (qdict_extract_subqdict copies
        # in the source's iteration order), which can swap same-bucket keys.
        prefixes = _option_prefixes(node)
        keys = ["".join(prefixes) + k for k in flat_keys]
        for prefix in prefixes:
            keys = [k[len(prefix) :] for k in qdict_order(keys)]
        flat_iter = qdict_order(keys)
        out: dict[str, Any] = {}
        for name in _STRONG:
            if name.endswith("."):
                for key in flat_iter:
                    if key.startswith(name):
                        group_name, position, member = key.split(".")
                        out[key] = options[group_name][int(position)][member]
            elif name in options:
                out[name] = options[name]
        return out

    def refresh_exact_filename(
        self, node: Node, exact: Callable[[Node], str], full_options: dict[str, Any]
    ) -> str:
        """``blkdebug:<config>:<image>`` unless other options matter."""
        child = file_child(node)
        if child is None or not exact(child):
            return ""
        if any(key not in _PLAIN_KEYS for key in full_options):
            return ""
        state = node.state
        config = state.config if isinstance(state, BlkdebugState) and state.config else ""
        return f"blkdebug:{config}:{exact(child)}"


DRIVERS = (Blkdebug(),)


def _option_prefixes(node: Node) -> list[str]:
    """The option prefixes of an inline child, topmost first (``["file."]``)."""
    prefixes: list[str] = []
    child = node
    while child.inherits_from is not None:
        parent = child.inherits_from
        edge = next((e for e in parent.children if e.child is child), None)
        if edge is None:
            break
        prefixes.append(edge.name + ".")
        child = parent
    return prefixes[::-1]
