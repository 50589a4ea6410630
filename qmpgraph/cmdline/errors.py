"""The one exception of command-line processing."""

from __future__ import annotations


class CmdlineError(Exception):
    """An option was rejected; ``msg`` is QEMU's text (possibly several lines).

    The location prefix (``--chardev ARG: ``) is added by whoever knows which
    option was being processed. ``warnings`` are messages QEMU printed for
    the same option before it failed.
    """

    def __init__(self, msg: str, warnings: list[str] | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.warnings = warnings or []
