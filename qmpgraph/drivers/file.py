"""The ``file`` protocol driver over real files: open checks, size, image locking.

Open mirrors file-posix: a read-write open first (falling back to read-only
with ``auto-read-only``), then the regular-file check, with QEMU's messages.
The descriptor stays open for the node's lifetime because it carries the
node's image locks (``qmpgraph.drivers.filelock``); a reopen that changes
the read-only flag (blockdev-reopen, or a job making a backing image
writable and back) switches to a descriptor of the new access mode, which
takes over the lock bytes (``reopen_access_mode``).  The permission refresh
drives them through ``check_perm``/``set_perm``/``abort_perm_update``, and
they go away when the node is closed (deleted, or its blockdev-add aborted).
``locking`` is ``auto`` (lock when OFD locks exist), ``on`` or ``off``.

What does not live here: the data path (header probes read through the
descriptor, nothing else does I/O).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qmpgraph.drivers.base import Driver, OpenContext
from qmpgraph.drivers.filelock import ImageLock, ofd_supported
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.io.stats import bind_fd
from qmpgraph.transactions.actions import set_open_flags, set_runtime
from qmpgraph.transactions.engine import Action, Transaction

if TYPE_CHECKING:
    from qmpgraph.graph.graph import BlockGraph


@dataclass(frozen=True, slots=True)
class FileState:
    """Per-node state of a file node: the path, its size at open, its locks.

    ``writable``: whether the descriptor was opened read-write.
    """

    filename: str
    size: int
    lock: ImageLock
    writable: bool = False


@dataclass(frozen=True, slots=True)
class CloseOnAbort(Action):
    """A freshly opened descriptor: closed (its locks released) if the open is undone."""

    name = "file-open"
    lock: ImageLock

    def abort(self) -> None:
        self.lock.close()


@dataclass(frozen=True, slots=True)
class SwitchDescriptor(Action):
    """A reopen's new descriptor, holding the lock bytes now: the old one is
    closed on commit; on abort it takes the bytes back and the new one closes."""

    name = "file-switch-descriptor"
    old: ImageLock
    new: ImageLock

    def commit(self) -> None:
        self.old.close()

    def abort(self) -> None:
        self.old.take_back(self.new)


def _use_lock(value: Any) -> bool:
    """The ``locking`` option (OnOffAuto) as file-posix reads it."""
    if value is None or value == "auto":
        return ofd_supported()
    if value in ("on", "off"):
        # 'on' without OFD locks falls back to process-wide POSIX locks, as QEMU does.
        return bool(value == "on")
    raise GenericError(f"invalid parameter value: {value}")


def _open_fd(filename: str, flags: int) -> int:
    try:
        return os.open(filename, flags | os.O_CLOEXEC)
    except OSError as err:
        raise GenericError(f"Could not open '{filename}': {os.strerror(err.errno or 0)}") from err


class File(Driver):
    """file: a regular file on the host."""

    format_name = "file"
    protocol = True
    options = frozenset(
        {
            "filename",
            "pr-manager",
            "locking",
            "aio",
            "aio-max-batch",
            "drop-cache",
            "x-check-cache-dropped",
        }
    )
    # file-posix's mutable_opts (verified on 7.2: drop-cache and locking are not).
    mutable_options = frozenset({"x-check-cache-dropped"})

    def reopen_prepare(self, graph: BlockGraph, node: Node, options: dict[str, Any]) -> Any:
        """raw_reopen_prepare: takes the cache-drop keys; the rest come back as strings."""
        del graph, node
        options.pop("drop-cache", None)
        options.pop("x-check-cache-dropped", None)
        for key in self.options & options.keys():
            value = options[key]
            if isinstance(value, bool):
                options[key] = "on" if value else "off"
            elif isinstance(value, int):
                options[key] = str(value)
        return None

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open the file with the node's flags and keep it open; record its size."""
        self.reject_unknown(options)
        filename = options.get("filename")
        if not filename:
            raise GenericError("The 'file' block driver requires a file name")
        use_lock = _use_lock(options.get("locking"))
        if options.get("pr-manager") is not None:
            # No pr-manager objects exist in qmpgraph, so every lookup fails.
            raise GenericError(
                f"No persistent reservation manager with id '{options['pr-manager']}'"
            )
        want_rw = bool(node.open_flags & OpenFlag.RDWR)
        try:
            fd = _open_fd(filename, os.O_RDWR if want_rw else os.O_RDONLY)
        except GenericError:
            if not (want_rw and node.open_flags & OpenFlag.AUTO_RDONLY):
                raise
            fd = _open_fd(filename, os.O_RDONLY)
            set_open_flags(ctx.tran, node, node.open_flags & ~OpenFlag.RDWR)
            want_rw = False
        lock = ImageLock(fd, filename, use_lock=use_lock)
        ctx.tran.add(CloseOnAbort(lock))
        if options.get("aio") == "native" and not node.open_flags & OpenFlag.NOCACHE:
            raise GenericError(
                "aio=native was specified, but it requires cache.direct=on, "
                "which was not specified."
            )
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GenericError(f"'file' driver requires '{filename}' to be a regular file")
        node.state = FileState(filename, st.st_size, lock, want_rw)
        bind_fd(fd, node)  # query-blockstats counts writes through it

    def reopen_access_mode(self, tran: Transaction, node: Node) -> None:
        """A reopen's commit, once the node has its new flags: the descriptor
        follows the read-only flag (file-posix opens a new one when the access
        mode changes, raw_reconfigure_getfd).  The new descriptor takes over
        the lock bytes; the old one is closed when ``tran`` commits."""
        state = node.state
        if not isinstance(state, FileState) or state.lock.closed:
            return
        want_rw = bool(node.open_flags & OpenFlag.RDWR)
        if want_rw == state.writable:
            return
        fd = _open_fd(state.filename, os.O_RDWR if want_rw else os.O_RDONLY)
        lock = state.lock.moved_to(fd)  # closes fd if it raises
        tran.add(SwitchDescriptor(state.lock, lock))
        set_runtime(tran, node, state=replace(state, lock=lock, writable=want_rw))
        bind_fd(fd, node)

    @staticmethod
    def _lock(node: Node) -> ImageLock | None:
        state = node.state
        if not isinstance(state, FileState) or node.open_flags & OpenFlag.INACTIVE:
            return None  # inactive images (incoming migration) take no locks
        return state.lock

    def check_perm(self, node: Node, perm: int, shared: int) -> None:
        """Claim the lock bytes of ``(perm, shared)``; QEMU's lock errors on conflict."""
        lock = self._lock(node)
        if lock is not None:
            lock.prepare(perm, shared)

    def set_perm(self, node: Node, perm: int, shared: int) -> None:
        """Keep exactly the lock bytes of the committed permissions."""
        lock = self._lock(node)
        if lock is not None:
            lock.commit(perm, shared)
        elif isinstance(node.state, FileState):
            node.state.lock.perm, node.state.lock.shared = perm, shared

    def abort_perm_update(self, node: Node) -> None:
        """Back to the lock bytes held before ``check_perm``."""
        lock = self._lock(node)
        if lock is not None:
            lock.abort()

    def size(self, node: Node) -> int:
        """The file's current length (file-posix has a variable length: resize, writers)."""
        state = node.state
        if not isinstance(state, FileState):
            return 0
        try:
            if not state.lock.closed:
                return os.fstat(state.lock.fd).st_size
            return os.stat(state.filename).st_size
        except OSError:
            return state.size

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Read bytes for header probes of formats stacked on this node."""
        state = node.state
        assert isinstance(state, FileState)
        if state.lock.closed:  # a deleted node: its descriptor number may be reused
            with open(state.filename, "rb") as f:
                f.seek(offset)
                return f.read(length)
        return os.pread(state.lock.fd, length, offset)

    def filename(self, node: Node) -> str:
        """The host path."""
        state = node.state
        return state.filename if isinstance(state, FileState) else ""

    def close(self, node: Node) -> None:
        """Close the descriptor: every lock of the node goes with it."""
        state = node.state
        if isinstance(state, FileState):
            state.lock.close()


DRIVERS = (File(),)
