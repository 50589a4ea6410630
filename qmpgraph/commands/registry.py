"""The table of implemented QMP commands.

Each command family module registers its handlers with ``@command``; the
registry is read-only once built. A handler takes the command context and the
already-validated arguments and returns the ``return`` value (``None`` means
``{}``). It reports failure by raising a ``qmpgraph.errors.QMPError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmpgraph.commands.context import CommandContext

Handler = Callable[["CommandContext", dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One implemented command."""

    name: str
    handler: Handler
    allow_oob: bool = False
    #: Valid while the session is still negotiating capabilities.
    negotiation: bool = False


class Registry(Mapping[str, Command]):
    """A read-only mapping from command name to ``Command``."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, cmd: Command) -> None:
        """Register ``cmd``; a name may be registered only once."""
        if cmd.name in self._commands:
            raise ValueError(f"command {cmd.name} registered twice")
        self._commands[cmd.name] = cmd

    def __getitem__(self, name: str) -> Command:
        return self._commands[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._commands)

    def __len__(self) -> int:
        return len(self._commands)


REGISTRY = Registry()


def command(
    name: str, *, allow_oob: bool = False, negotiation: bool = False
) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of QMP command ``name``."""

    def register(fn: Handler) -> Handler:
        REGISTRY.add(Command(name, fn, allow_oob=allow_oob, negotiation=negotiation))
        return fn

    return register
