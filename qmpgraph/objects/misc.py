"""Cheap user object types: ``iothread``, ``main-loop`` and ``authz-simple``.

QEMU 7.2 (util/event-loop-base.c, iothread.c, util/main-loop.c,
authz/simple.c), probed on qemu-storage-daemon: every event-loop parameter
is an int64 that must not be negative; the thread pool bounds are checked
whenever the loop exists (after completion, or at completion), and a
refused value stays stored, as in QEMU.  There is one ``main-loop`` at most,
and it can never be deleted.  No thread or event loop is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qmpgraph.errors import GenericError
from qmpgraph.objects import props
from qmpgraph.objects.qom import QomObject

if TYPE_CHECKING:
    from qmpgraph.objects.qom import ObjectTree

_INT64_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1


class EventLoopBase(QomObject):
    """What ``iothread`` and ``main-loop`` share: int64 parameters, pool bounds."""

    defaults: ClassVar[dict[str, int]] = {
        "aio-max-batch": 0,
        "thread-pool-min": 0,
        "thread-pool-max": 64,
    }

    def __init__(self) -> None:
        super().__init__()
        self.params = dict(self.defaults)
        self.running = False

    def get(self, name: str) -> Any:
        """The stored parameter."""
        return self.params[name]

    def set(self, name: str, value: Any) -> None:
        """Store a non-negative int64; re-check the pool bounds once running."""
        number = props.int64(name, value)
        if number < 0:
            raise GenericError(f"{name} value must be in range [0, {_INT64_MAX}]")
        self.params[name] = number
        if self.running:
            self._check_pool()

    def _check_pool(self) -> None:
        lo, hi = self.params["thread-pool-min"], self.params["thread-pool-max"]
        if lo > hi or not hi or lo > _INT_MAX or hi > _INT_MAX:
            raise GenericError("bad thread-pool-min/thread-pool-max values")

    def complete(self, tree: ObjectTree) -> None:
        """The loop starts: its pool bounds must be sane."""
        self.running = True
        self._check_pool()


class IOThread(EventLoopBase):
    """``iothread``: adds the polling parameters."""

    qom_type = "iothread"
    defaults: ClassVar[dict[str, int]] = {
        **EventLoopBase.defaults,
        "poll-max-ns": 32768,
        "poll-grow": 0,
        "poll-shrink": 0,
    }
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = (
        ("thread-pool-min", "int"),
        ("aio-max-batch", "int"),
        ("thread-pool-max", "int"),
        ("poll-max-ns", "int"),
        ("poll-grow", "int"),
        ("poll-shrink", "int"),
    )


class MainLoop(EventLoopBase):
    """``main-loop``: a singleton that cannot be deleted."""

    qom_type = "main-loop"
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = (
        ("thread-pool-min", "int"),
        ("aio-max-batch", "int"),
        ("thread-pool-max", "int"),
    )

    def complete(self, tree: ObjectTree) -> None:
        """Refused when another main-loop exists."""
        root = tree.objects_root()
        if any(isinstance(o, MainLoop) and o is not self for _, o in root.children()):
            raise GenericError("only one main-loop instance allowed")
        super().complete(tree)

    def can_be_deleted(self) -> bool:
        """Never."""
        return False


class AuthzSimple(QomObject):
    """``authz-simple``: one ``identity`` string."""

    qom_type = "authz-simple"
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = (("identity", "string"),)

    def __init__(self) -> None:
        super().__init__()
        self.identity: str | None = None

    def get(self, name: str) -> Any:
        """The identity ("" while unset)."""
        return self.identity or ""

    def set(self, name: str, value: Any) -> None:
        """Any string."""
        self.identity = props.string(name, value)
