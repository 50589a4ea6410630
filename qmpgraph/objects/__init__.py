"""QOM user objects: the tree, the object types, creation and deletion.

API:

* ``tree_for(graph)``: the daemon's ``ObjectTree`` (``qom.py``).
* ``create_object(tran, tree, schema, qom_type, obj_id, props)``:
  ``user_creatable_add_type`` in QEMU 7.2's order: the id's syntax, the
  type, each property in QDict order, the ``/objects`` child (duplicate id),
  then ``complete``; every step inside ``tran``, so a failure leaves the
  tree as QEMU leaves it.
* ``delete_object(tran, tree, obj_id)``: ``user_creatable_del``.
* ``property_order(schema, qom_type, keys)``: the order QEMU sets them.

Implemented types: ``throttle-group``, ``secret``, ``iothread``,
``main-loop``, ``authz-simple``.  The other types qemu-storage-daemon 7.2
knows are refused with a qmpgraph message; the ObjectType values it does
not know get QEMU's "invalid object type".

What does not live here: the QMP commands (``qmpgraph.commands.qom``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qmpgraph.errors import GenericError
from qmpgraph.objects.misc import AuthzSimple, IOThread, MainLoop
from qmpgraph.objects.qom import (
    ObjectTree,
    QomObject,
    add_object,
    del_object,
    tree_for,
)
from qmpgraph.objects.secret import Secret
from qmpgraph.objects.throttle_group import ThrottleGroup
from qmpgraph.protocol.qjson import qdict_order

if TYPE_CHECKING:
    from qmpgraph.schema import Schema
    from qmpgraph.transactions.engine import Transaction

__all__ = [
    "ObjectTree",
    "QomObject",
    "create_object",
    "delete_object",
    "property_order",
    "tree_for",
]

_FACTORIES: dict[str, Callable[[Schema], QomObject]] = {
    "throttle-group": ThrottleGroup,
    "secret": lambda _s: Secret(),
    "iothread": lambda _s: IOThread(),
    "main-loop": lambda _s: MainLoop(),
    "authz-simple": lambda _s: AuthzSimple(),
}
# User-creatable types qemu-storage-daemon 7.2 has but qmpgraph does not model.
_KNOWN_TO_QSD = frozenset({
    "authz-list", "pr-manager-helper", "secret_keyring", "thread-context",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites",
})  # fmt: skip


def id_wellformed(obj_id: str) -> bool:
    """QEMU's ``id_wellformed``: an ASCII letter, then letters, digits, ``-._``."""
    if not obj_id or not (obj_id[0].isascii() and obj_id[0].isalpha()):
        return False
    return all((c.isascii() and c.isalnum()) or c in "-._" for c in obj_id[1:])


_ORDER_CACHE: dict[tuple[int, str], list[str]] = {}


def property_order(schema: Schema, qom_type: str, keys: list[str]) -> list[str]:
    """``keys`` in the order QEMU sets them: the QDict its output visitor
    builds (schema member order) iterated in hash order."""
    cache_key = (id(schema), qom_type)
    members = _ORDER_CACHE.get(cache_key)
    if members is None:
        members = []
        by_name = {e["name"]: e for e in schema.entities}
        args = by_name[by_name["object-add"]["arg-type"]]
        for variant in args.get("variants", []):
            if variant["case"] == qom_type:
                members = [m["name"] for m in by_name[variant["type"]].get("members", [])]
        _ORDER_CACHE[cache_key] = members
    present = set(keys)
    inserted = [m for m in members if m in present]
    inserted += [k for k in keys if k not in set(inserted)]
    return qdict_order(inserted)


def create_object(  # noqa: PLR0917 (the five inputs of QEMU's user_creatable_add_type)
    tran: Transaction,
    tree: ObjectTree,
    schema: Schema,
    qom_type: str,
    obj_id: str,
    props: dict[str, Any],
) -> QomObject:
    """Create ``/objects/<obj_id>`` of ``qom_type`` with ``props`` (see module doc)."""
    if not id_wellformed(obj_id):
        raise GenericError("Parameter 'id' expects an identifier")
    factory = _FACTORIES.get(qom_type)
    if factory is None:
        if qom_type in _KNOWN_TO_QSD:
            raise GenericError(f"object type '{qom_type}' is not supported by qmpgraph")
        raise GenericError(f"invalid object type: {qom_type}")
    obj = factory(schema)
    for key in property_order(schema, qom_type, list(props)):
        if not obj.has_property(key):
            raise GenericError(f"Property '{obj.qom_type}.{key}' not found")
        obj.set(key, props[key])
    add_object(tran, tree, obj_id, obj)
    obj.complete(tree)
    return obj


def delete_object(tran: Transaction, tree: ObjectTree, obj_id: str) -> None:
    """``object-del``: QEMU's lookup and in-use checks, then removal."""
    container = tree.objects_root()
    obj = container.child(obj_id)
    if obj is None:
        raise GenericError(f"object '{obj_id}' not found")
    if not obj.can_be_deleted():
        raise GenericError(f"object '{obj_id}' is in use, can not be deleted")
    del_object(tran, tree, obj_id)
