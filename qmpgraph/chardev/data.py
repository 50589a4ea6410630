"""The bytes of ``ringbuf-write`` and ``ringbuf-read``, as QEMU 7.2 converts them.

QEMU works on C strings: the JSON parser hands ``ringbuf-write`` modified
UTF-8 (U+0000 as ``C0 80``); base64 input is checked against the alphabet
(``qbase64_decode``) and decoded by GLib (whole quartets only, ``=`` pads
the quartet it ends, newlines skipped); ``ringbuf-read``'s bytes go to the
JSON writer as a C string (cut at the first NUL), each invalid sequence
(``mod_utf8_codepoint``) becoming one U+FFFD.

What does not live here: the ring itself (``qmpgraph.chardev.model``).
"""

from __future__ import annotations

import base64

from qmpgraph.errors import GenericError

__all__ = ["base64_text", "glib_base64_decode", "json_text", "qmp_string_bytes"]


def _codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """QEMU's ``mod_utf8_codepoint`` at ``data[pos]`` (no NUL there): the code
    point (-1 if invalid) and where the sequence ends."""
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = data[pos] if pos < len(data) else 0
        if nxt & 0xC0 != 0x80:
            return -1, pos
        pos += 1
        cp = (cp << 6) | (nxt & 0x3F)
    min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if (
        cp > 0x10FFFF
        or 0xFDD0 <= cp <= 0xFDEF
        or cp & 0xFFFE == 0xFFFE
        or 0xD800 <= cp <= 0xDFFF
        or (cp < min_cp and not (cp == 0 and length == 2))
    ):
        return -1, pos
    return cp, pos


def json_text(data: bytes) -> str:
    """The string QEMU's JSON writer makes of C string ``data``: cut at the
    first NUL, each invalid (modified) UTF-8 sequence one U+FFFD."""
    data = data.split(b"\0", 1)[0]
    out: list[str] = []
    pos = 0
    while pos < len(data):
        cp, pos = _codepoint(data, pos)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)


def qmp_string_bytes(text: str) -> bytes:
    """The C string QEMU's JSON parser makes of ``text``: UTF-8, with U+0000
    as modified UTF-8's ``C0 80``."""
    return text.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


_B64_VALID = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
_B64_RANK = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_B64_RANK[ord("=")] = 0


def glib_base64_decode(text: bytes) -> bytes:
    """``qbase64_decode`` of a C string: QEMU's check of the alphabet, then
    GLib's decoder (whole quartets only; ``=`` pads the quartet it ends)."""
    if not set(text) <= _B64_VALID:
        raise GenericError("Base64 data contains invalid characters")
    out = bytearray()
    value = count = 0
    last = [0, 0]
    for c in text:
        rank = _B64_RANK.get(c)
        if rank is None:
            continue
        last = [c, last[0]]
        value = ((value << 6) | rank) & 0xFFFFFFFF
        count += 1
        if count == 4:
            out.append((value >> 16) & 0xFF)
            if last[1] != ord("="):
                out.append((value >> 8) & 0xFF)
            if last[0] != ord("="):
                out.append(value & 0xFF)
            count = 0
    return bytes(out)


def base64_text(data: bytes) -> str:
    """``g_base64_encode``: standard alphabet, padded."""
    return base64.b64encode(data).decode("ascii")
