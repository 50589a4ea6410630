"""Session and daemon commands: qmp_capabilities, query-version, query-commands,
query-qmp-schema, quit."""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import REGISTRY, command
from qmpgraph.errors import CommandNotFound
from qmpgraph.protocol.session import Mode


# QEMU 7.2 gives no qemu-storage-daemon command allow-oob (query-qmp-schema shows none).
@command("qmp_capabilities", negotiation=True)
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
    """Every command this daemon implements (the same set query-qmp-schema lists).

    QEMU registers commands in schema definition order and its
    ``query-commands`` prepends each one to the reply, so the reply runs
    in reverse definition order.
    """
    names = ctx.daemon.schema.ordered_commands(REGISTRY)
    return [{"name": name} for name in reversed(names)]


@command("query-qmp-schema")
def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> Any:
    """QEMU's introspection data, restricted to what is implemented."""
    return ctx.daemon.schema.introspection(REGISTRY)


@command("quit")
def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Stop the daemon once this reply has been sent."""
    ctx.daemon.request_quit()
