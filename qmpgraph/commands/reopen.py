"""``blockdev-reopen``: change the options of several nodes at once, atomically.

The handler checks each list entry in order ("node-name not specified",
"Failed to find node with node-name='%s'"), flattens its options as QEMU's
output visitor plus ``qdict_flatten`` do, and queues it; then one
``reopen_multiple`` runs over the whole queue in a single graph transaction,
so any failure leaves the graph as it was.

Queue construction (QEMU 7.2's bdrv_reopen_queue_child) lives here:

* the same node queued twice merges into its first entry: the new options
  win, the entry's earlier explicit options fill the gaps;
* option precedence, highest first: options given now, options kept from an
  earlier entry (or, for a child named by its current node name, the child's
  explicit options), options inherited from the parent's *new* options,
  and (with ``keep_old_opts``) the node's old effective options;
* flags are recomputed from the final options (the parent's flags through
  inheritance for a child, the node's own flags at the top);
* a child whose ``inherits_from`` is the node is reopened with it: with its
  old options if the parent names it by its current node name, not at all if
  the parent names another node or null (the edge switches instead), else
  with the parent's ``<child>.*`` options.

Beyond QEMU: an empty ``options`` list aborts QEMU 7.2 (an assertion on the
empty queue); qmpgraph answers a GenericError and changes nothing.

What does not live here: the prepare/refresh/commit steps
(``qmpgraph.transactions.reopen``) and the drivers' own reopen checks
(``Driver.reopen_prepare``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.drivers.open import Inheritance, inherit_options
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag, Role
from qmpgraph.jobs.drain import subtree_drains
from qmpgraph.transactions.reopen import ReopenRequest, flatten, opt_bool, reopen_multiple

EMPTY_LIST_ERROR = "blockdev-reopen needs at least one node in 'options'"


def _join(node: Node, options: dict[str, Any], old: dict[str, Any]) -> None:
    """bdrv_join_options: ``old`` fills keys ``options`` lacks (qcow2 has its own rules)."""
    old = dict(old)
    if node.format_name == "qcow2":
        if "overlap-check" in options or "overlap-check.template" in options:
            old = {k: v for k, v in old.items() if not k.startswith("overlap-check")}
        has_total = "cache-size" in options
        if has_total:
            old.pop("l2-cache-size", None)
            old.pop("refcount-cache-size", None)
        for key, value in old.items():
            options.setdefault(key, value)
        if not has_total and any(
            k in options for k in ("cache-size", "l2-cache-size", "refcount-cache-size")
        ):
            options.pop("cache-size", None)
        return
    for key, value in old.items():
        options.setdefault(key, value)


def _update_flags(flags: int, options: dict[str, Any]) -> int:
    """update_flags_from_options, then reopen's own PROTOCOL/ALLOW_RDWR rule."""
    flags &= ~(OpenFlag.NOCACHE | OpenFlag.NO_FLUSH | OpenFlag.RDWR | OpenFlag.AUTO_RDONLY)
    if opt_bool(options.get("cache.no-flush", False)):
        flags |= OpenFlag.NO_FLUSH
    if opt_bool(options.get("cache.direct", False)):
        flags |= OpenFlag.NOCACHE
    if not opt_bool(options.get("read-only", False)):
        flags |= OpenFlag.RDWR
    if opt_bool(options.get("auto-read-only", False)):
        flags |= OpenFlag.AUTO_RDONLY
    flags &= ~OpenFlag.PROTOCOL
    if flags & OpenFlag.RDWR:
        flags |= OpenFlag.ALLOW_RDWR
    return int(flags)


def _extract(options: dict[str, Any], prefix: str) -> dict[str, Any]:
    """qdict_extract_subqdict: move ``prefix``-keys out of ``options``, prefix removed."""
    taken = {k[len(prefix) :]: v for k, v in options.items() if k.startswith(prefix)}
    for key in [k for k in options if k.startswith(prefix)]:
        del options[key]
    return taken


class ReopenQueue:
    """The queue being built: entries in order, found by node."""

    def __init__(self) -> None:
        self.entries: list[ReopenRequest] = []
        self._by_node: dict[int, ReopenRequest] = {}

    def add(
        self,
        node: Node,
        options: dict[str, Any] | None,
        inherit: Inheritance | None,
        keep_old: bool,
    ) -> None:
        """bdrv_reopen_queue_child: queue (or merge) ``node`` and its inheriting children."""
        options = dict(options or {})
        entry = self._by_node.get(node.id)
        if entry is not None or keep_old:
            old = entry.explicit_options if entry is not None else None
            _join(node, options, old if old is not None else flatten(node.explicit_options))
        explicit = dict(options)
        flags = inherit_options(options, inherit) if inherit is not None else node.open_flags
        if keep_old:
            _join(node, options, flatten(node.options))
        flags = _update_flags(flags, options)
        if entry is None:
            entry = ReopenRequest(node, flags)
            self.entries.append(entry)
            self._by_node[node.id] = entry
        entry.flags = flags
        entry.options = options
        entry.explicit_options = explicit
        if not keep_old:
            entry.backing_missing = "backing" not in options and "backing.driver" not in options
        drv = node.driver
        assert drv is not None
        for edge in list(node.children):
            child = edge.child
            if child is None or child.inherits_from is not node:
                continue
            child_keep_old = keep_old
            child_options: dict[str, Any] | None = None
            if edge.name in options:
                ref = options[edge.name]
                if not isinstance(ref, str) or ref != child.node_name:
                    continue  # the edge is switched (or cleared) instead
                child_keep_old = True
            else:
                prefix = edge.name + "."
                _extract(explicit, prefix)
                child_options = _extract(options, prefix)
            inh = Inheritance(node, Role(edge.role), flags, options, drv.is_format)
            self.add(child, child_options, inh, child_keep_old)


@command("blockdev-reopen")
def blockdev_reopen(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Reopen every listed node with its new options, all or nothing."""
    daemon = ctx.daemon
    entries = args["options"]
    if not entries:
        raise GenericError(EMPTY_LIST_ERROR)
    with (
        subtree_drains(daemon) as drains,
        daemon.graph_transaction("blockdev-reopen", args) as tran,
    ):
        queue = ReopenQueue()
        for item in entries:
            name = item.get("node-name")
            if name is None:
                raise GenericError("node-name not specified")
            node = daemon.graph.lookup(str(name))
            if node is None:
                raise GenericError(f"Failed to find node with node-name='{name}'")
            drains.add(node)
            queue.add(node, flatten(item), None, False)
        reopen_multiple(tran, daemon.graph, queue.entries)
