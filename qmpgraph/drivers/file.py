"""The ``file`` protocol driver over real files (control plane: open checks and size).

Open mirrors file-posix: a read-write open first (falling back to read-only
with ``auto-read-only``), then the regular-file check, with QEMU's messages.
The file is not kept open; the data path will own descriptors later.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers.base import Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag
from qmpgraph.transactions.actions import set_open_flags


@dataclass(frozen=True, slots=True)
class FileState:
    """Per-node state of a file node."""

    filename: str
    size: int


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
    mutable_options = frozenset({"locking", "drop-cache", "x-check-cache-dropped"})

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """Open the file with the node's flags; record its size."""
        self.reject_unknown(options)
        filename = options.get("filename")
        if not filename:
            raise GenericError("The 'file' block driver requires a file name")
        want_rw = bool(node.open_flags & OpenFlag.RDWR)
        try:
            fd = os.open(filename, os.O_RDWR if want_rw else os.O_RDONLY)
        except OSError as err:
            if not (want_rw and node.open_flags & OpenFlag.AUTO_RDONLY):
                raise GenericError(
                    f"Could not open '{filename}': {os.strerror(err.errno or 0)}"
                ) from err
            try:
                fd = os.open(filename, os.O_RDONLY)
            except OSError as err2:
                raise GenericError(
                    f"Could not open '{filename}': {os.strerror(err2.errno or 0)}"
                ) from err2
            set_open_flags(ctx.tran, node, node.open_flags & ~OpenFlag.RDWR)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GenericError(f"'file' driver requires '{filename}' to be a regular file")
        node.state = FileState(filename, st.st_size)

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Read bytes for header probes of formats stacked on this node."""
        state = node.state
        assert isinstance(state, FileState)
        with open(state.filename, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def filename(self, node: Node) -> str:
        """The host path."""
        state = node.state
        return state.filename if isinstance(state, FileState) else ""


DRIVERS = (File(),)
