"""Encoders of the bytes an NBD server sends: option replies and transmission replies.

All functions are pure and return ``bytes`` (or a list of buffers when a
payload should go out without being copied into one string).
"""

from __future__ import annotations

import struct

from qmpgraph.nbd import constants as c

_OPT_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length


def option_reply(option: int, rep_type: int, payload: bytes = b"") -> bytes:
    """One option reply: header plus payload."""
    return _OPT_REPLY.pack(c.REP_MAGIC, option, rep_type, len(payload)) + payload


def info_reply(option: int, info: int, payload: bytes) -> bytes:
    """An ``NBD_REP_INFO`` reply of type ``info``."""
    return option_reply(option, c.REP_INFO, struct.pack(">H", info) + payload)


def server_reply(option: int, name: str, description: str) -> bytes:
    """An ``NBD_REP_SERVER`` reply to ``NBD_OPT_LIST``: name length, name, description."""
    raw = name.encode()
    return option_reply(
        option, c.REP_SERVER, struct.pack(">I", len(raw)) + raw + description.encode()
    )


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    """An ``NBD_REP_META_CONTEXT`` reply."""
    return option_reply(option, c.REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (a read's data follows it)."""
    return _SIMPLE.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, flags: int, chunk_type: int, length: int) -> bytes:
    """A structured reply chunk header."""
    return _CHUNK.pack(c.STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, length)


def done_chunk(cookie: int) -> bytes:
    """``NBD_REPLY_TYPE_NONE`` with the DONE flag: success without payload."""
    return chunk_header(cookie, c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, 0)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    """``NBD_REPLY_TYPE_ERROR`` with the DONE flag; ``error`` is an NBD error value."""
    msg = message.encode()
    payload = struct.pack(">IH", error, len(msg)) + msg
    return chunk_header(cookie, c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, len(payload)) + payload


def data_chunk(cookie: int, offset: int, data: bytes, *, final: bool) -> list[bytes]:
    """``NBD_REPLY_TYPE_OFFSET_DATA``: header and offset, then the data buffer itself."""
    flags = c.REPLY_FLAG_DONE if final else 0
    head = chunk_header(cookie, flags, c.REPLY_TYPE_OFFSET_DATA, 8 + len(data))
    return [head + struct.pack(">Q", offset), data]


def hole_chunk(cookie: int, offset: int, length: int, *, final: bool) -> bytes:
    """``NBD_REPLY_TYPE_OFFSET_HOLE``: ``length`` bytes of zeros at ``offset``."""
    flags = c.REPLY_FLAG_DONE if final else 0
    head = chunk_header(cookie, flags, c.REPLY_TYPE_OFFSET_HOLE, 12)
    return head + struct.pack(">QI", offset, length)


def block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]], *, final: bool
) -> bytes:
    """``NBD_REPLY_TYPE_BLOCK_STATUS``: ``extents`` as (length, flags) pairs."""
    flags = c.REPLY_FLAG_DONE if final else 0
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, state) for length, state in extents
    )
    return chunk_header(cookie, flags, c.REPLY_TYPE_BLOCK_STATUS, len(body)) + body
