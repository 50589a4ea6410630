"""What a command handler can reach: the daemon's state and the calling session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon
    from qmpgraph.protocol.session import QMPSession


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Passed to every handler: the daemon and the session that sent the command."""

    daemon: Daemon
    session: QMPSession
