"""One NBD client connection as a state machine: bytes in, events and bytes out.

``ServerConnection(exports)`` speaks the server side of the fixed newstyle
protocol as QEMU 7.2's ``nbd/server.c`` does: the same replies, error codes,
error texts and the same points where it hangs up.  The caller feeds received
bytes to ``receive_data``, sends ``data_to_send()``, and acts on the returned
events:

* ``Ready(export)``: the client entered transmission on ``export``.
* ``Request(...)``: a validated transmission request to execute; encode the
  answer with ``reply_*`` (they need the negotiated reply mode).
* ``Closed(reason)``: hang up once the pending bytes are sent; ``reason`` is
  QEMU's text for the failure (``None`` for an orderly end).

Rules: the phase only moves forward (HANDSHAKE -> OPTIONS -> TRANSMISSION ->
CLOSED); an option is handled only once all its bytes arrived (QEMU reads
them piecemeal, which gives the same replies); after ``Closed`` every further
byte is ignored.

What does not live here: executing requests (``qmpgraph.io``), the export
list (the caller's ``ExportDirectory``), sockets.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from qmpgraph.nbd import constants as c
from qmpgraph.nbd import wire

__all__ = [
    "Closed",
    "ExportDirectory",
    "ExportInfo",
    "Ready",
    "Request",
    "ServerConnection",
]


class ExportInfo(Protocol):
    """What negotiation needs to know about an export."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    @property
    def nbdflags(self) -> int: ...
    @property
    def request_alignment(self) -> int: ...
    @property
    def max_transfer(self) -> int: ...
    @property
    def allocation_depth(self) -> bool: ...
    @property
    def bitmap_names(self) -> tuple[str, ...]:
        """Names of the exported dirty bitmaps (context ``qemu:dirty-bitmap:NAME``)."""
        ...


class ExportDirectory(Protocol):
    """The server's exports, in creation order."""

    def find(self, name: str) -> ExportInfo | None:
        """The export called ``name``, if any."""
        ...

    def all(self) -> Iterable[ExportInfo]:
        """Every export, oldest first (``NBD_OPT_LIST`` order)."""
        ...


@dataclass(frozen=True, slots=True)
class Ready:
    """The client chose ``export`` and the transmission phase began."""

    export: ExportInfo


@dataclass(frozen=True, slots=True)
class Request:
    """A validated transmission request (``data`` is a write's payload)."""

    cookie: int
    type: int
    flags: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is to be closed; ``reason`` is QEMU's text for an error."""

    reason: str | None


Event = Ready | Request | Closed


class Phase(enum.Enum):
    """Where the connection is; it only moves down this list."""

    HANDSHAKE = "handshake"  # waiting for the client flags
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Short(Exception):
    """An option payload ended before a field did."""


class _OptionReader:
    """Reads fields off one option's payload, as QEMU's ``nbd_opt_read``."""

    def __init__(self, payload: bytes, option: int) -> None:
        self.payload = payload
        self.pos = 0
        self.option = option

    @property
    def remaining(self) -> int:
        return len(self.payload) - self.pos

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise _Short
        data = self.payload[self.pos : self.pos + size]
        self.pos += size
        return data

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])


class _OptionError(Exception):
    """An option answered with an error reply (the rest of it is dropped)."""

    def __init__(self, rep_type: int, message: str) -> None:
        super().__init__(message)
        self.rep_type = rep_type
        self.message = message


@dataclass(slots=True)
class _Meta:
    """The selected meta contexts (QEMU's ``NBDExportMetaContexts``)."""

    export: str | None = None
    base_allocation: bool = False
    allocation_depth: bool = False
    # Selected exported bitmaps, by their index in the export's list.
    bitmaps: set[int] = field(default_factory=set)
    count: int = 0


_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, from, len
_OPTION = struct.Struct(">QII")  # magic, option, length


def _sanitize(name: bytes) -> str:
    """QEMU's ``nbd_sanitize_name``: names of 80 bytes or more are cut with '...'."""
    text = name.decode("utf-8", "surrogateescape")
    if len(name) < 80:
        return text
    return name[:80].decode("utf-8", "replace") + "..."


class ServerConnection:
    """The server side of one NBD connection (see the module docstring)."""

    def __init__(self, exports: ExportDirectory) -> None:
        self.exports = exports
        self.phase = Phase.HANDSHAKE
        self.structured = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self.check_align = 0
        self.meta = _Meta()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending_write: tuple[int, int, int, int, int] | None = None
        header = c.NBDMAGIC + struct.pack(
            ">QH", c.IHAVEOPT, c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES
        )
        self._out.append(header)

    # -- output ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the client so far (negotiation replies, errors)."""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # -- input -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the client; returns the events they complete, in order."""
        if self.phase is Phase.CLOSED:
            return []
        self._buf += data
        events: list[Event] = []
        while True:
            step = self._step()
            if step is None:
                return events
            if not isinstance(step, _Nothing):
                events.append(step)
            if isinstance(step, Closed):
                return events

    def _close(self, reason: str | None) -> Closed:
        self.phase = Phase.CLOSED
        self._buf.clear()
        return Closed(reason)

    def _step(self) -> Event | _Nothing | None:
        if self.phase is Phase.HANDSHAKE:
            return self._handshake()
        if self.phase is Phase.OPTIONS:
            return self._option()
        return self._request()

    def _handshake(self) -> Closed | _Nothing | None:
        if len(self._buf) < 4:
            return None
        (flags,) = struct.unpack(">I", self._buf[:4])
        del self._buf[:4]
        if flags & c.FLAG_C_FIXED_NEWSTYLE:
            self.fixed_newstyle = True
            flags &= ~c.FLAG_C_FIXED_NEWSTYLE
        if flags & c.FLAG_C_NO_ZEROES:
            self.no_zeroes = True
            flags &= ~c.FLAG_C_NO_ZEROES
        if flags:
            return self._close(
                f"option negotiation failed: Unknown client flags 0x{flags:x} received"
            )
        self.phase = Phase.OPTIONS
        return _NOTHING

    # -- options -----------------------------------------------------------------

    def _option(self) -> Event | _Nothing | None:
        if len(self._buf) < _OPTION.size:
            return None
        magic, option, length = _OPTION.unpack(self._buf[: _OPTION.size])
        if magic != c.IHAVEOPT:
            return self._close("option negotiation failed: Bad magic received")
        if length > c.MAX_BUFFER_SIZE:
            return self._close(
                f"option negotiation failed: len ({length}) is larger than max len "
                f"({c.MAX_BUFFER_SIZE})"
            )
        if option == c.OPT_EXPORT_NAME and length > c.MAX_STRING_SIZE:
            return self._close("option negotiation failed: Bad length received")
        if len(self._buf) < _OPTION.size + length:
            return None
        payload = bytes(self._buf[_OPTION.size : _OPTION.size + length])
        del self._buf[: _OPTION.size + length]
        if not self.fixed_newstyle and option != c.OPT_EXPORT_NAME:
            return self._close(
                f"option negotiation failed: Unsupported option {option} ({c.opt_name(option)})"
            )
        reader = _OptionReader(payload, option)
        try:
            return self._handle_option(option, reader)
        except _Short:
            err = _OptionError(
                c.REP_ERR_INVALID, f"Inconsistent lengths in option {c.opt_name(option)}"
            )
            self._out.append(wire.option_reply(option, err.rep_type, err.message.encode()))
        except _OptionError as err:
            self._out.append(wire.option_reply(option, err.rep_type, err.message.encode()))
        return _NOTHING

    def _reject_length(self, option: int) -> _OptionError:
        return _OptionError(
            c.REP_ERR_INVALID, f"option '{c.opt_name(option)}' has unexpected length"
        )

    def _handle_option(self, option: int, reader: _OptionReader) -> Event | _Nothing:
        length = reader.remaining
        if option == c.OPT_EXPORT_NAME:
            return self._export_name(reader.payload)
        if option == c.OPT_ABORT:
            self._out.append(wire.option_reply(option, c.REP_ACK))
            return self._close(None)
        if option == c.OPT_LIST:
            if length:
                raise self._reject_length(option)
            for exp in self.exports.all():
                self._out.append(wire.server_reply(option, exp.name, exp.description or ""))
            self._out.append(wire.option_reply(option, c.REP_ACK))
            return _NOTHING
        if option in (c.OPT_INFO, c.OPT_GO):
            return self._info(option, reader)
        if option == c.OPT_STARTTLS:
            if length:
                raise self._reject_length(option)
            raise _OptionError(c.REP_ERR_POLICY, "TLS not configured")
        if option == c.OPT_STRUCTURED_REPLY:
            if length:
                raise self._reject_length(option)
            if self.structured:
                raise _OptionError(c.REP_ERR_INVALID, "structured reply already negotiated")
            self._out.append(wire.option_reply(option, c.REP_ACK))
            self.structured = True
            return _NOTHING
        if option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            self._meta_queries(option, reader)
            return _NOTHING
        raise _OptionError(c.REP_ERR_UNSUP, f"Unsupported option {option} ({c.opt_name(option)})")

    def _transmission_flags(self, exp: ExportInfo) -> int:
        return exp.nbdflags | (c.FLAG_SEND_DF if self.structured else 0)

    def _enter(self, exp: ExportInfo, check_align: int) -> Ready:
        self.export = exp
        self.check_align = check_align
        if self.meta.export != exp.name:
            self.meta.count = 0
        self.phase = Phase.TRANSMISSION
        return Ready(exp)

    def _export_name(self, name: bytes) -> Event:
        exp = self.exports.find(name.decode("utf-8", "surrogateescape"))
        if exp is None:
            return self._close("option negotiation failed: export not found")
        reply = struct.pack(">QH", exp.size, self._transmission_flags(exp))
        if not self.no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        return self._enter(exp, 0)

    def _read_name(self, reader: _OptionReader) -> bytes:
        length = reader.u32()
        if length > c.MAX_STRING_SIZE:
            raise _OptionError(c.REP_ERR_INVALID, f"Invalid name length: {length}")
        return self._read_string(reader, length)

    @staticmethod
    def _read_string(reader: _OptionReader, length: int) -> bytes:
        raw = reader.take(length)
        if b"\0" in raw:
            raise _OptionError(
                c.REP_ERR_INVALID, f"Unexpected embedded NUL in option {c.opt_name(reader.option)}"
            )
        return raw

    def _info(self, option: int, reader: _OptionReader) -> Event | _Nothing:
        name = self._read_name(reader)
        requests = reader.u16()
        send_name = blocksize = False
        for _ in range(requests):
            info = reader.u16()
            if info == c.INFO_NAME:
                send_name = True
            elif info == c.INFO_BLOCK_SIZE:
                blocksize = True
        if reader.remaining:
            raise self._reject_length(option)
        exp = self.exports.find(name.decode("utf-8", "surrogateescape"))
        if exp is None:
            raise _OptionError(c.REP_ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
        if send_name:
            self._out.append(wire.info_reply(option, c.INFO_NAME, name))
        if exp.description is not None:
            self._out.append(wire.info_reply(option, c.INFO_DESCRIPTION, exp.description.encode()))
        check_align = 0
        if option == c.OPT_INFO or blocksize:
            minimum = check_align = exp.request_alignment
        else:
            minimum = 1
        sizes = struct.pack(
            ">III", minimum, max(4096, minimum), min(exp.max_transfer, c.MAX_BUFFER_SIZE)
        )
        self._out.append(wire.info_reply(option, c.INFO_BLOCK_SIZE, sizes))
        export = struct.pack(">QH", exp.size, self._transmission_flags(exp))
        self._out.append(wire.info_reply(option, c.INFO_EXPORT, export))
        if option == c.OPT_INFO and not blocksize and exp.request_alignment > 1:
            raise _OptionError(
                c.REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"
            )
        self._out.append(wire.option_reply(option, c.REP_ACK))
        if option == c.OPT_GO:
            return self._enter(exp, check_align)
        return _NOTHING

    def _meta_queries(self, option: int, reader: _OptionReader) -> None:
        listing = option == c.OPT_LIST_META_CONTEXT
        if not listing and not self.structured:
            raise _OptionError(
                c.REP_ERR_INVALID,
                f"request option '{c.opt_name(option)}' when structured reply is not negotiated",
            )
        meta = _Meta()
        if not listing:
            self.meta = meta  # a SET forgets the old selection even when it fails
        name = self._read_name(reader)
        exp = self.exports.find(name.decode("utf-8", "surrogateescape"))
        if exp is None:
            raise _OptionError(c.REP_ERR_UNKNOWN, f"export '{_sanitize(name)}' not present")
        meta.export = exp.name
        queries = reader.u32()
        if listing and not queries:
            meta.base_allocation = True
            meta.allocation_depth = exp.allocation_depth
            meta.bitmaps = set(range(len(exp.bitmap_names)))
        else:
            for _ in range(queries):
                self._meta_query(reader, meta, exp, listing)
        if meta.base_allocation:
            ctx_id = 0 if listing else c.META_ID_BASE_ALLOCATION
            self._out.append(wire.meta_context_reply(option, ctx_id, "base:allocation"))
        if meta.allocation_depth:
            ctx_id = 0 if listing else c.META_ID_ALLOCATION_DEPTH
            self._out.append(wire.meta_context_reply(option, ctx_id, "qemu:allocation-depth"))
        for i, bitmap in enumerate(exp.bitmap_names):
            if i in meta.bitmaps:
                ctx_id = 0 if listing else c.META_ID_DIRTY_BITMAP + i
                context = f"qemu:dirty-bitmap:{bitmap}"
                self._out.append(wire.meta_context_reply(option, ctx_id, context))
        self._out.append(wire.option_reply(option, c.REP_ACK))
        meta.count = int(meta.base_allocation) + int(meta.allocation_depth) + len(meta.bitmaps)

    def _meta_query(
        self, reader: _OptionReader, meta: _Meta, exp: ExportInfo, listing: bool
    ) -> None:
        length = reader.u32()
        if length > c.MAX_STRING_SIZE:
            reader.take(length)  # skipped, as QEMU does with over-long queries
            return
        query = self._read_string(reader, length)
        if query.startswith(b"base:"):
            rest = query[5:]
            if (not rest and listing) or rest == b"allocation":
                meta.base_allocation = True
        elif query.startswith(b"qemu:"):
            rest = query[5:]
            if (not rest and listing) or rest == b"allocation-depth":
                meta.allocation_depth = exp.allocation_depth
            if not rest and listing:
                meta.bitmaps = set(range(len(exp.bitmap_names)))
            elif rest.startswith(b"dirty-bitmap:"):
                wanted = rest[len(b"dirty-bitmap:") :]
                if not wanted and listing:
                    meta.bitmaps = set(range(len(exp.bitmap_names)))
                for i, bitmap in enumerate(exp.bitmap_names):
                    if wanted and bitmap.encode() == wanted:
                        meta.bitmaps.add(i)
                        break

    # -- transmission ------------------------------------------------------------

    def _request(self) -> Event | _Nothing | None:
        if self._pending_write is None:
            if len(self._buf) < _HEADER.size:
                return None
            magic, flags, cmd, cookie, offset, length = _HEADER.unpack(self._buf[: _HEADER.size])
            del self._buf[: _HEADER.size]
            if magic != c.REQUEST_MAGIC:
                # QEMU still answers (EINVAL, the parsed cookie) before hanging up.
                message = f"invalid magic (got 0x{magic:x})"
                self._out.append(self.reply_error(cookie, c.NBD_EINVAL, message))
                return self._close("Request handling failed in intermediate state")
            if cmd == c.CMD_DISC:
                return self._close(None)
            if cmd in (c.CMD_READ, c.CMD_WRITE, c.CMD_CACHE) and length > c.MAX_BUFFER_SIZE:
                # QEMU 7.2's text has this stray space.
                message = f"len ({length} ) is larger than max len ({c.MAX_BUFFER_SIZE})"
                self._out.append(self.reply_error(cookie, c.NBD_EINVAL, message))
                if cmd == c.CMD_WRITE:
                    # The payload was never read: the stream is lost, so hang up.
                    return self._close("Request handling failed in intermediate state")
                return _NOTHING
            if cmd == c.CMD_WRITE:
                self._pending_write = (flags, cmd, cookie, offset, length)
            else:
                return self._validate(Request(cookie, cmd, flags, offset, length))
        flags, cmd, cookie, offset, length = self._pending_write
        if len(self._buf) < length:
            return None
        with memoryview(self._buf) as view:
            data = bytes(view[:length])  # one copy (slicing the bytearray would add one)
        del self._buf[:length]
        self._pending_write = None
        return self._validate(Request(cookie, cmd, flags, offset, length, data))

    def _validate(self, req: Request) -> Request | _Nothing:
        """QEMU 7.2's sanity checks, in its order; failures are answered here."""
        cookie, cmd, flags, offset, length = req.cookie, req.type, req.flags, req.offset, req.length
        exp = self.export
        assert exp is not None
        error: str | None = None
        if exp.nbdflags & c.FLAG_READ_ONLY and cmd in (
            c.CMD_WRITE,
            c.CMD_WRITE_ZEROES,
            c.CMD_TRIM,
        ):
            error = "Export is read-only"
        elif offset > exp.size or length > exp.size - offset:
            error = f"operation past EOF; From: {offset}, Len: {length}, Size: {exp.size}"
        else:
            valid = c.CMD_FLAG_FUA
            if cmd == c.CMD_READ and self.structured:
                valid |= c.CMD_FLAG_DF
            elif cmd == c.CMD_WRITE_ZEROES:
                valid |= c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO
            elif cmd == c.CMD_BLOCK_STATUS:
                valid |= c.CMD_FLAG_REQ_ONE
            if flags & ~valid:
                error = f"unsupported flags for command {c.cmd_name(cmd)} (got 0x{flags:x})"
        if error is not None:
            # QEMU answers every validation failure with EINVAL, whatever its cause.
            self._out.append(self.reply_error(cookie, c.NBD_EINVAL, error))
            return _NOTHING
        if cmd == c.CMD_BLOCK_STATUS:
            if not length:
                self._out.append(self.reply_error(cookie, c.NBD_EINVAL, "need non-zero length"))
                return _NOTHING
            if not self.meta.count:
                self._out.append(
                    self.reply_error(cookie, c.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
                )
                return _NOTHING
        elif cmd not in c.CMD_NAMES:
            message = f"invalid request type ({cmd}) received"
            self._out.append(self.reply_error(cookie, c.NBD_EINVAL, message))
            return _NOTHING
        return req

    # -- reply encoders for the caller -------------------------------------------

    def reply_error(self, cookie: int, error: int, message: str) -> bytes:
        """An error reply (``error`` is an NBD error value) in the negotiated mode."""
        if self.structured:
            return wire.error_chunk(cookie, error, message)
        return wire.simple_reply(cookie, error)

    def reply_ok(self, cookie: int) -> bytes:
        """Success without payload (write, flush, trim, write zeroes, cache)."""
        return wire.simple_reply(cookie, 0)

    def reply_read(
        self, cookie: int, offset: int, pieces: list[bytes | int], *, done: bool = True
    ) -> list[bytes]:
        """A read's answer: ``pieces`` are data buffers or hole lengths, in order.

        Without structured replies the holes become zeros in one simple reply.
        With ``done=False`` (structured only) no chunk carries the DONE flag:
        more follow, e.g. an error chunk.
        """
        if not self.structured:
            out = [wire.simple_reply(cookie, 0)]
            out.extend(p if isinstance(p, bytes) else bytes(p) for p in pieces)
            return out
        if not pieces:
            return [wire.done_chunk(cookie)] if done else []
        out = []
        pos = offset
        for i, piece in enumerate(pieces):
            final = done and i == len(pieces) - 1
            if isinstance(piece, int):
                out.append(wire.hole_chunk(cookie, pos, piece, final=final))
                pos += piece
            else:
                out.extend(wire.data_chunk(cookie, pos, piece, final=final))
                pos += len(piece)
        return out

    def meta_contexts(self) -> list[int]:
        """The selected context ids, in the order QEMU answers block status."""
        ids = []
        if self.meta.base_allocation:
            ids.append(c.META_ID_BASE_ALLOCATION)
        if self.meta.allocation_depth:
            ids.append(c.META_ID_ALLOCATION_DEPTH)
        ids.extend(c.META_ID_DIRTY_BITMAP + i for i in sorted(self.meta.bitmaps))
        return ids


class _Nothing:
    """An internal step that produced no event (bytes may have been queued)."""

    __slots__ = ()


_NOTHING = _Nothing()


class ExtentArray:
    """QEMU's ``NBDExtentArray``: extents joined with equal neighbours, at most ``max_count``.

    ``add`` returns False once an extent no longer fits; the caller stops
    asking for block status then (QEMU sends what it has).
    """

    def __init__(self, max_count: int = c.MAX_BLOCK_STATUS_EXTENTS) -> None:
        self.max_count = max_count
        self.extents: list[tuple[int, int]] = []

    def add(self, length: int, flags: int) -> bool:
        """Append (length, flags), joining with the last extent when the flags match."""
        if not length:
            return True
        ext = self.extents
        if ext and ext[-1][1] == flags and ext[-1][0] + length <= 0xFFFFFFFF:
            ext[-1] = (ext[-1][0] + length, flags)
            return True
        if len(ext) >= self.max_count:
            return False
        ext.append((length, flags))
        return True
