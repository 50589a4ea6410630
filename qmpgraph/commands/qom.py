"""QOM commands: ``object-add``, ``object-del``, ``qom-list``, ``qom-get``, ``qom-set``.

``object-add``, ``object-del`` and ``qom-set`` run as one engine transaction
each (``Daemon.graph_transaction``), so they are logged with the block graph
commands and a failure undoes what QEMU would not keep.  Paths are resolved
as QEMU's ``object_resolve_path_type`` (absolute, or a unique partial path).

What does not live here: the object types and the tree
(``qmpgraph.objects``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.errors import GenericError
from qmpgraph.objects import create_object, delete_object, tree_for
from qmpgraph.objects.qom import ObjectStateUndo, QomObject


@command("object-add")
def object_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create a user object under ``/objects``."""
    daemon = ctx.daemon
    props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
    with daemon.graph_transaction("object-add", args) as tran:
        create_object(
            tran,
            tree_for(daemon.graph),
            daemon.schema,
            str(args["qom-type"]),
            str(args["id"]),
            props,
        )


@command("object-del")
def object_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Delete user object ``id`` unless it is in use."""
    daemon = ctx.daemon
    with daemon.graph_transaction("object-del", args) as tran:
        delete_object(tran, tree_for(daemon.graph), str(args["id"]))


def _property(obj: QomObject, name: str) -> None:
    if not obj.has_property(name):
        raise GenericError(f"Property '{obj.qom_type}.{name}' not found")


@command("qom-list")
def qom_list(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    """The properties of the object at ``path``."""
    return tree_for(ctx.daemon.graph).resolve(str(args["path"])).list_properties()


@command("qom-get")
def qom_get(ctx: CommandContext, args: dict[str, Any]) -> Any:
    """The value of one property."""
    obj = tree_for(ctx.daemon.graph).resolve(str(args["path"]))
    name = str(args["property"])
    _property(obj, name)
    return obj.get_property(name)


@command("qom-set")
def qom_set(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Set one property; the object's own setter decides what a refusal keeps."""
    daemon = ctx.daemon
    obj = tree_for(daemon.graph).resolve(str(args["path"]))
    name = str(args["property"])
    _property(obj, name)
    if name == "type" or any(n == name for n, _ in obj.children()):
        raise GenericError(f"Property '{obj.qom_type}.{name}' is not writable")
    with daemon.graph_transaction("qom-set", args) as tran:
        old = obj.snapshot()
        obj.set(name, args["value"])
        tran.add(ObjectStateUndo(obj, old))
