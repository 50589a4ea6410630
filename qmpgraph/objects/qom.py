"""The QOM composition tree of one daemon: containers, user objects, paths.

QEMU 7.2's qemu-storage-daemon has a root container holding ``chardevs``
and, once the first user object is added, ``objects``.  The order in which
``qom-list`` names a container's children is GLib's hash table order
(``g_str_hash`` buckets, replayed by ``qmpgraph.schema.ghash.StrSet``),
reversed, because QEMU prepends each property to the reply list; the class
properties (``type`` last of all in iteration) come first in the reply.

Lives here: ``QomObject`` (the property protocol every user object type
implements), ``Container``, ``ObjectTree`` (root, lazily created
``/objects``, path resolution as ``object_resolve_path_type``), the
transaction actions that add and remove a user object, and ``tree_for``
(the one tree of a block graph, so drivers can look objects up).

What does not live here: the user object types (``throttle_group.py``,
``secret.py``, ``misc.py``) and the QMP commands (``qmpgraph.commands.qom``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

from qmpgraph.errors import DeviceNotFound, GenericError
from qmpgraph.graph.digest import register_state_source
from qmpgraph.graph.graph import BlockGraph
from qmpgraph.schema.ghash import StrSet
from qmpgraph.transactions.engine import Action, Transaction


class QomObject:
    """A QOM object: its type name, its properties, its reference count.

    ``class_properties`` lists ``(name, type)`` as ``qom-list`` shows them
    after ``type`` (probed on qsd 7.2: the order is GLib's, fixed per class).
    """

    qom_type: ClassVar[str] = "object"
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Properties ``qom-set`` refuses ("Property '%s.%s' is not writable").
    read_only: ClassVar[frozenset[str]] = frozenset()

    def __init__(self) -> None:
        self.parent: Container | None = None
        self.name = ""
        # One reference held by the tree; users (throttle nodes) add theirs.
        self.refcnt = 1

    def path(self) -> str:
        """The canonical path, ``/`` for the root."""
        parts: list[str] = []
        obj: QomObject | None = self
        while obj is not None and obj.parent is not None:
            parts.append(obj.name)
            obj = obj.parent
        return "/" + "/".join(reversed(parts))

    def children(self) -> list[tuple[str, QomObject]]:
        """Child properties in GLib iteration order (none for a leaf)."""
        return []

    def list_properties(self) -> list[dict[str, str]]:
        """``qom-list``'s reply for this object."""
        out = [{"name": "type", "type": "string"}]
        out += [{"name": n, "type": t} for n, t in self.class_properties]
        out += [{"name": n, "type": f"child<{c.qom_type}>"} for n, c in reversed(self.children())]
        return out

    def has_property(self, name: str) -> bool:
        """Whether ``name`` is one of this object's properties."""
        return name == "type" or any(n == name for n, _ in self.class_properties)

    def get_property(self, name: str) -> Any:
        """The value ``qom-get`` returns for ``name`` (a known property)."""
        if name == "type":
            return self.qom_type
        child = dict(self.children()).get(name)
        if child is not None:
            return child.path()
        return self.get(name)

    def get(self, name: str) -> Any:
        """Type-specific getter of a class property."""
        raise GenericError(f"Property '{self.qom_type}.{name}' is not readable")

    def set(self, name: str, value: Any) -> None:
        """Type-specific setter: check ``value`` as QEMU's visitor does, then store."""
        raise GenericError(f"Property '{self.qom_type}.{name}' is not writable")

    def complete(self, tree: ObjectTree) -> None:
        """``UserCreatable.complete``: checks run after every property was set."""

    def can_be_deleted(self) -> bool:
        """``UserCreatable.can_be_deleted``: by default, always."""
        return True

    def snapshot(self) -> Any:
        """Mutable state to restore if a ``qom-set`` transaction aborts."""
        return dict(vars(self))

    def restore(self, state: Any) -> None:
        """Put back what ``snapshot`` returned."""
        vars(self).update(state)


class Container(QomObject):
    """A ``container``: children only, ordered as QEMU's hash table."""

    qom_type = "container"

    def __init__(self) -> None:
        super().__init__()
        self._children: dict[str, QomObject] = {}
        self._order = StrSet()

    def children(self) -> list[tuple[str, QomObject]]:
        """Children in GLib iteration order."""
        return [(k, self._children[k]) for k in self._order.keys()]  # noqa: SIM118 (StrSet: bucket order)

    def child(self, name: str) -> QomObject | None:
        """The child called ``name``, if any."""
        return self._children.get(name)

    def has_property(self, name: str) -> bool:
        """Class properties and children."""
        return name in self._children or super().has_property(name)

    def add_child(self, name: str, obj: QomObject) -> None:
        """``object_property_try_add_child``; raises on a duplicate name."""
        if name in self._children or super().has_property(name):
            raise GenericError(
                f"attempt to add duplicate property '{name}' to object (type '{self.qom_type}')"
            )
        self._children[name] = obj
        self._order.insert(name)
        obj.parent = self
        obj.name = name

    def del_child(self, name: str) -> None:
        """``object_property_del`` of a child (the hash table keeps a tombstone)."""
        obj = self._children.pop(name)
        self._order.remove(name)
        obj.parent = None


class ObjectTree:
    """The QOM tree of one daemon: ``/``, ``/chardevs`` and ``/objects``."""

    def __init__(self) -> None:
        self.root = Container()
        self.root.add_child("chardevs", Container())
        self._objects: Container | None = None

    def objects_root(self) -> Container:
        """``object_get_objects_root``: created on first use, then kept."""
        if self._objects is None:
            self._objects = Container()
            self.root.add_child("objects", self._objects)
        return self._objects

    def lookup(self, obj_id: str) -> QomObject | None:
        """The user object ``obj_id`` (``object_resolve_path_component`` of /objects)."""
        return self._objects.child(obj_id) if self._objects is not None else None

    def resolve(self, path: str) -> QomObject:
        """``object_resolve_path_type(path, "object")`` with qmp_qom_*'s errors."""
        parts = path.split("/") if path else []
        if parts and parts[0] == "":
            found = _resolve_abs(self.root, parts[1:])
        else:
            ambiguous = [False]
            found = _resolve_partial(self.root, parts, ambiguous)
            if ambiguous[0]:
                raise GenericError(f"Path '{path}' is ambiguous")
        if found is None:
            raise DeviceNotFound(f"Device '{path}' not found")
        return found


def _resolve_abs(obj: QomObject, parts: list[str]) -> QomObject | None:
    for part in parts:
        if part == "":
            continue
        child = dict(obj.children()).get(part)
        if child is None:
            return None
        obj = child
    return obj


def _resolve_partial(obj: QomObject, parts: list[str], ambiguous: list[bool]) -> QomObject | None:
    found = _resolve_abs(obj, parts)
    for _, child in obj.children():
        sub = _resolve_partial(child, parts, ambiguous)
        if sub is not None:
            if found is not None:
                ambiguous[0] = True
                return None
            found = sub
        if ambiguous[0]:
            return None
    return found


_TREES: weakref.WeakKeyDictionary[BlockGraph, ObjectTree] = weakref.WeakKeyDictionary()


def tree_for(graph: BlockGraph) -> ObjectTree:
    """The QOM tree that belongs with ``graph`` (one per daemon), made on first use.

    Kept beside the graph rather than in it: block drivers reach objects
    (throttle groups, secrets) through the graph their open context holds.
    """
    tree = _TREES.get(graph)
    if tree is None:
        tree = _TREES[graph] = ObjectTree()
    return tree


_DROP = object()


def _plain(value: Any) -> Any:
    """``value`` reduced to JSON-able data; other objects (a parent) become ``_DROP``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [v for v in map(_plain, value) if v is not _DROP]
    if isinstance(value, dict):
        pairs = ((str(k), _plain(v)) for k, v in value.items())
        return {k: v for k, v in pairs if v is not _DROP}
    return _DROP


def objects_state(graph: BlockGraph) -> list[Any] | None:
    """The user objects of ``graph``'s tree for the graph digest (None without any).

    Sorted by id; each with its type, reference count and ``snapshot()``.
    """
    tree = _TREES.get(graph)
    container = tree._objects if tree is not None else None
    children = container.children() if container is not None else []
    if not children:
        return None
    return [
        [obj_id, obj.qom_type, obj.refcnt, _plain(obj.snapshot())]
        for obj_id, obj in sorted(children, key=lambda c: c[0])
    ]


register_state_source("objects", objects_state)


# -- transaction actions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddObjectUndo(Action):
    """A user object was added under ``/objects``; abort deletes it again."""

    name: ClassVar[str] = "object-add"
    container: Container
    obj_id: str

    def abort(self) -> None:
        self.container.del_child(self.obj_id)


def add_object(tran: Transaction, tree: ObjectTree, obj_id: str, obj: QomObject) -> None:
    """Add ``obj`` as ``/objects/<obj_id>`` (QEMU's error on a duplicate id)."""
    container = tree.objects_root()
    container.add_child(obj_id, obj)
    tran.add(AddObjectUndo(container, obj_id))


@dataclass(frozen=True, slots=True)
class DelObjectUndo(Action):
    """A user object was removed; abort puts it back."""

    name: ClassVar[str] = "object-del"
    container: Container
    obj_id: str
    obj: QomObject

    def abort(self) -> None:
        self.container.add_child(self.obj_id, self.obj)


def del_object(tran: Transaction, tree: ObjectTree, obj_id: str) -> None:
    """Remove ``/objects/<obj_id>`` (it must exist)."""
    container = tree.objects_root()
    obj = container.child(obj_id)
    assert obj is not None
    container.del_child(obj_id)
    tran.add(DelObjectUndo(container, obj_id, obj))


@dataclass(frozen=True, slots=True)
class ObjectRefUndo(Action):
    """An object's reference count moved by ``delta``; abort moves it back."""

    name: ClassVar[str] = "object-ref"
    obj: QomObject
    delta: int

    def abort(self) -> None:
        self.obj.refcnt -= self.delta


def ref_object(tran: Transaction, obj: QomObject, delta: int = 1) -> None:
    """Take (``delta`` 1) or drop (-1) a reference on ``obj``."""
    obj.refcnt += delta
    tran.add(ObjectRefUndo(obj, delta))


@dataclass(frozen=True, slots=True)
class ObjectStateUndo(Action):
    """An object's properties changed (``qom-set``); abort restores them."""

    name: ClassVar[str] = "object-set"
    obj: QomObject
    old: Any

    def abort(self) -> None:
        self.obj.restore(self.old)
