"""One client's QMP session, without I/O.

Rules (QEMU 7.2 ``monitor/qmp.c``):

* The server speaks first: the greeting, then it waits.
* The session starts in NEGOTIATION mode, where only ``qmp_capabilities`` is
  a command; it moves to COMMAND mode when that command succeeds, and never
  back. Events reach only sessions in COMMAND mode.
* Out-of-band execution is allowed only when the client enabled the ``oob``
  capability during negotiation.
* Every message the server writes ends with CRLF; in pretty mode every
  newline inside a message is CRLF too (QEMU's monitor writes ``\\r\\n``
  for each ``\\n``).

The transition table below is the only place the mode changes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from qmpgraph.errors import GenericError
from qmpgraph.protocol import qjson
from qmpgraph.protocol.jsonstream import JSONStreamer


class Mode(enum.Enum):
    """The QMP session modes."""

    NEGOTIATION = "negotiation"
    COMMAND = "command"


#: (mode, event) -> new mode. Anything missing is an illegal transition.
_TRANSITIONS: dict[tuple[Mode, str], Mode] = {
    (Mode.NEGOTIATION, "capabilities-accepted"): Mode.COMMAND,
}


class QMPSession:
    """The protocol state of one QMP client connection."""

    def __init__(
        self,
        greeting: dict[str, Any],
        *,
        pretty: bool = False,
        capabilities_offered: Iterable[str] = ("oob",),
    ) -> None:
        self._greeting = greeting
        self.pretty = pretty
        self.capabilities_offered = frozenset(capabilities_offered)
        self.capabilities_enabled: frozenset[str] = frozenset()
        self.mode = Mode.NEGOTIATION
        self._streamer = JSONStreamer()

    @property
    def oob_enabled(self) -> bool:
        """Whether the client enabled out-of-band execution."""
        return "oob" in self.capabilities_enabled

    def greeting_bytes(self) -> bytes:
        """The greeting the server sends first."""
        return self.encode(self._greeting)

    def receive_data(self, data: bytes) -> list[Any]:
        """Feed received bytes; return the parsed requests and parse errors."""
        return self._streamer.feed(data)

    def encode(self, message: dict[str, Any]) -> bytes:
        """One outgoing message as wire bytes, CRLF included."""
        text = qjson.dumps(message, pretty=self.pretty)
        if self.pretty:
            text = text.replace("\n", "\r\n")
        return text.encode("ascii") + b"\r\n"

    def accept_capabilities(self, enable: list[str]) -> None:
        """Finish negotiation with the capabilities the client asked for.

        Raises before any state changes when a capability is not offered.
        """
        for cap in enable:
            if cap not in self.capabilities_offered:
                raise GenericError(f"This monitor does not support '{cap}'")
        self.mode = _TRANSITIONS[(self.mode, "capabilities-accepted")]
        self.capabilities_enabled = frozenset(enable)
