"""Turn one parsed request into one reply: the only place exceptions become QMP errors.

The order of checks is QEMU 7.2's ``qmp_dispatch``: the request's shape
(members checked in QDict iteration order, as QEMU walks them), the command
lookup in the session's current command table, the out-of-band rule, the
arguments against the schema, and only then the handler. A failure at any
step is reported before anything changes.

An exception that is not a ``QMPError`` is a qmpgraph bug. QEMU would crash
(or abort) on many inputs that reach one; the daemon instead logs the
traceback and answers a GenericError naming the command, so it keeps
serving its other clients. ``Dispatcher(daemon, strict=True)`` lets such an
exception propagate instead: tests use it so that a bug fails the test with
its traceback rather than passing as an error reply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import REGISTRY, Command
from qmpgraph.errors import CommandNotFound, GenericError, QMPError
from qmpgraph.protocol.jsonstream import JSONParseError
from qmpgraph.protocol.qjson import qdict_order
from qmpgraph.protocol.session import Mode, QMPSession

if TYPE_CHECKING:
    from qmpgraph.daemon import Daemon

_log = logging.getLogger(__name__)

_NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"


def _check_shape(request: dict[str, Any], allow_oob: bool) -> str:
    """Validate the request's members; return the key that names the command."""
    exec_key = None
    for key in qdict_order(list(request)):
        value = request[key]
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise GenericError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise GenericError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise GenericError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise GenericError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise GenericError("QMP input lacks member 'execute'")
    return exec_key


class Dispatcher:
    """Executes requests for the sessions of one daemon."""

    def __init__(self, daemon: Daemon, *, strict: bool = False) -> None:
        self._daemon = daemon
        #: Internal errors propagate (tests) instead of becoming error replies.
        self.strict = strict

    def _lookup(self, session: QMPSession, name: str) -> Command:
        cmd = REGISTRY.get(name)
        if cmd is None or (session.mode is Mode.NEGOTIATION and not cmd.negotiation):
            raise CommandNotFound(f"The command {name} has not been found")
        return cmd

    def _execute(self, session: QMPSession, request: Any) -> dict[str, Any]:
        """The ``return`` reply of a request, or the QMPError that refuses it."""
        if not isinstance(request, dict):
            raise GenericError("QMP input must be a JSON object")
        exec_key = _check_shape(request, session.oob_enabled)
        name = request[exec_key]
        cmd = self._lookup(session, name)
        if exec_key == "exec-oob" and not cmd.allow_oob:
            raise GenericError(f"The command {name} does not support OOB")
        args = request.get("arguments", {})
        args = self._daemon.schema.validate_arguments(name, args)
        ret = cmd.handler(CommandContext(self._daemon, session), args)
        return {"return": {} if ret is None else ret}

    def dispatch(self, session: QMPSession, request: Any) -> dict[str, Any] | None:
        """The reply to one parsed request (or parse error); ``None`` if none is due."""
        if isinstance(request, JSONParseError):
            return {"error": GenericError(request.desc).to_wire()}
        rid = request.get("id") if isinstance(request, dict) else None
        has_id = isinstance(request, dict) and "id" in request
        try:
            reply = self._execute(session, request)
        except QMPError as err:
            if session.mode is Mode.NEGOTIATION and isinstance(err, CommandNotFound):
                err = CommandNotFound(_NEGOTIATION_HINT)
            reply = {"error": err.to_wire()}
        except Exception as exc:
            if self.strict:
                raise
            # request is a dict here: anything else is refused before a handler.
            name = request.get("execute") or request.get("exec-oob")
            _log.exception("internal error in %s", name)
            internal = GenericError(f"qmpgraph internal error in '{name}': {type(exc).__name__}")
            reply = {"error": internal.to_wire()}
        if has_id:
            reply["id"] = rid
        return reply
