"""Session and daemon commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit."""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import REGISTRY, command
from qmpgraph.errors import CommandNotFound
from qmpgraph.protocol.session import Mode


@command("qmp_capabilities", allow_oob=True, negotiation=True)
def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Leave negotiation mode, enabling the requested capabilities."""
    if ctx.session.mode is Mode.COMMAND:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    ctx.session.accept_capabilities(list(args.get("enable", [])))


@command("query-version")
def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """The emulated QEMU version and the package that provides it."""
    return ctx.daemon.version_info()


@command("query-commands")
def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    """Every command this daemon implements (the same set query-qmp-schema lists)."""
    return [{"name": name} for name in reversed(list(REGISTRY))]


@command("query-qmp-schema")
def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> Any:
    """QEMU's introspection data, restricted to what is implemented."""
    return ctx.daemon.schema.introspection()


@command("quit")
def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop the daemon once this reply has been sent."""
    ctx.daemon.request_quit()
