"""A byte-exact model of QEMU 7.2's JSON reader: lexer, message streamer, parser.

QEMU splits a QMP byte stream in three stages, and each stage is visible to
clients through what it reports and where it resynchronizes:

* The *lexer* is a table-driven state machine over bytes. It emits tokens;
  numbers and keywords end only when the next byte arrives (lookahead). A byte
  that fits no transition makes an error token (including that byte), after
  which the lexer skips input until a structural character, an ASCII control
  character other than TAB, or one of the impossible bytes 0xFE/0xFF.
* The *streamer* counts braces and brackets. Tokens accumulate while either
  count is positive and neither is negative; then the collected tokens are
  parsed as one value. It also enforces the size, count and nesting limits.
  Every error empties the token queue, so later tokens start afresh.
* The *parser* is a recursive descent over one balanced token list that
  reports only the first error it meets.

This module is the slow, exact path; ``jsonstream`` wraps it with a fast path
for well-formed input. Error message texts are QEMU's. What does not live
here: writing JSON (``qjson``), QMP semantics (``session``, the dispatcher).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
# parse_error() formats its message into a 1024-byte buffer.
_PARSE_MESSAGE_MAX = 1023


@dataclass(frozen=True, slots=True)
class JSONParseError:
    """A parse failure, reported to the client as a GenericError with ``desc``."""

    desc: str


# Token types.
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA = range(6)
INTEGER, FLOAT, KEYWORD, STRING, ERROR, OVERSIZE = range(6, 12)

# Lexer states.
(
    START,
    RECOVERY,
    DQ,
    DQ_ESC,
    SQ,
    SQ_ESC,
    ZERO,
    SIGN,
    DIGITS,
    MANTISSA,
    MANTISSA_DIGITS,
    EXP_E,
    EXP_SIGN,
    EXP_DIGITS,
    KEYWORD_CHARS,
) = range(15)

_STRUCTURAL = {
    ord("{"): LCURLY,
    ord("}"): RCURLY,
    ord("["): LSQUARE,
    ord("]"): RSQUARE,
    ord(":"): COLON,
    ord(","): COMMA,
}
_WS_RUN = re.compile(rb"[ \t\r\n]*")
# Bytes that continue a string: 0x20..0xFD except the quote and backslash.
_DQ_RUN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]*")
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# Bytes skipped while recovering: all but structural characters, control
# characters other than TAB, and 0xFE/0xFF.
_RECOVERY_RUN = re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*")
_RUNS = {
    DQ: _DQ_RUN,
    SQ: _SQ_RUN,
    DIGITS: _DIGIT_RUN,
    MANTISSA_DIGITS: _DIGIT_RUN,
    EXP_DIGITS: _DIGIT_RUN,
    KEYWORD_CHARS: _KEYWORD_RUN,
}
_D = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_EXP = frozenset(b"eE")
_PLUS_MINUS = frozenset(b"+-")


# --- Unicode, as util/unicode.c sees it ------------------------------------------


def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False  # noncharacter
    return not 0xD800 <= cp <= 0xDFFF


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def mod_utf8_codepoint(data: bytes, i: int) -> tuple[int, int]:
    """Decode one modified-UTF-8 sequence at ``data[i]``: (codepoint or -1, end)."""
    n = len(data)
    if i >= n or data[i] == 0:
        return -1, i
    byte = data[i]
    if byte < 0x80:
        return byte, i + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, i + 1
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    p = i + 1
    for _ in range(1, length):
        nxt = data[p] if p < n else 0
        if nxt & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        return -1, p
    return cp, p


def c_text(raw: bytes) -> str:
    """The text QEMU's JSON writer produces for the C string ``raw``.

    The string ends at the first NUL byte; every invalid sequence becomes
    U+FFFD, as ``quoted_str`` does when it serializes an error message.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    if raw.isascii():
        return raw.decode("ascii")
    out = []
    i = 0
    while i < len(raw):
        cp, i = mod_utf8_codepoint(raw, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
    "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff"
    "\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
    "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff"
    "\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
    "\U000ffffe\U000fffff\U0010fffe\U0010ffff]"
)


def has_noncharacter(text: str) -> bool:
    """Whether ``text`` holds one of Unicode's 66 noncharacters (QEMU rejects them)."""
    return _NONCHARACTER.search(text) is not None


# --- The parser ------------------------------------------------------------------


class _ParseError(Exception):
    def __init__(self, message: bytes) -> None:
        super().__init__(message)
        self.message = message


_EOI = b"premature EOI"


def _hex4(text: bytes, i: int) -> int:
    """cvt4hex(): four hex digits at ``text[i]``, or -1."""
    chunk = text[i : i + 4]
    if len(chunk) < 4 or not all(c in _HEX for c in chunk):
        return -1
    return int(chunk, 16)


def _decode_plain(seg: bytes) -> str:
    """Unescaped string bytes: modified UTF-8, valid codepoints only."""
    if seg.isascii():
        return seg.decode("ascii")
    try:
        # Modified UTF-8 spells U+0000 as C0 80; everything else it rejects,
        # strict UTF-8 rejects as well, except noncharacters.
        text = seg.replace(b"\xc0\x80", b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseError(b"invalid UTF-8 sequence in string") from None
    if has_noncharacter(text):
        raise _ParseError(b"invalid UTF-8 sequence in string")
    return text


_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


def parse_string(token: bytes) -> str:
    """The value of a string token (quotes included), or raise _ParseError."""
    end = len(token) - 1  # the closing quote
    if token.find(b"\\", 1, end) < 0:
        return _decode_plain(token[1:end])
    parts: list[str] = []
    i = 1
    while i < end:
        bs = token.find(b"\\", i, end)
        if bs < 0:
            parts.append(_decode_plain(token[i:end]))
            break
        if bs > i:
            parts.append(_decode_plain(token[i:bs]))
        esc = token[bs + 1]
        simple = _ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            i = bs + 2
            continue
        if esc != ord("u"):
            raise _ParseError(b"invalid escape sequence in string")
        cp = _hex4(token, bs + 2)
        i = bs + 6
        if 0xD800 <= cp <= 0xDBFF and token[i : i + 2] == b"\\u":
            trailing = _hex4(token, i + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            raise _ParseError(token[bs:i] + b" is not a valid Unicode character")
        parts.append(chr(cp))
    return "".join(parts)


def _literal(kind: int, text: bytes) -> Any:
    if kind == STRING:
        return parse_string(text)
    if kind == INTEGER:
        value = int(text)
        if -(1 << 63) <= value < (1 << 63) or (value >= 0 and value < (1 << 64)):
            return value
        return float(text)
    if kind == FLOAT:
        return float(text)
    # KEYWORD
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise _ParseError(b"invalid keyword '" + text + b"'")


_VALUE_TOKENS = frozenset((INTEGER, FLOAT, STRING, KEYWORD))


def parse_tokens(tokens: list[tuple[int, bytes]]) -> Any:
    """Parse one balanced token list as json_parser_parse() does.

    Iterative (QEMU recurses; nesting reaches 1024) but with the same order
    of checks, so the first error met is the one QEMU reports.
    """
    n = len(tokens)
    pos = 0
    # Each frame: [container, pending key or None]; lists have key None always.
    stack: list[list[Any]] = []
    while True:
        # -- parse_value()
        if pos >= n:
            raise _ParseError(_EOI)
        kind, text = tokens[pos]
        if kind in (LCURLY, LSQUARE):
            pos += 1
            if pos >= n:
                raise _ParseError(_EOI)
            closer = RCURLY if kind == LCURLY else RSQUARE
            if tokens[pos][0] == closer:
                pos += 1
                value: Any = {} if kind == LCURLY else []
            else:
                stack.append([{} if kind == LCURLY else [], None])
                continue
        elif kind in _VALUE_TOKENS:
            pos += 1
            value = _literal(kind, text)
        else:
            raise _ParseError(b"expecting value")
        # -- hand the value to the enclosing container
        while True:
            if not stack:
                return value
            frame = stack[-1]
            container = frame[0]
            if type(container) is list:
                container.append(value)
                if pos >= n:
                    raise _ParseError(_EOI)
                sep = tokens[pos][0]
                pos += 1
                if sep == RSQUARE:
                    stack.pop()
                    value = container
                    continue
                if sep != COMMA:
                    raise _ParseError(b"expected separator in list")
                break
            if frame[1] is None:
                # ``value`` is a key.
                if type(value) is not str:
                    raise _ParseError(b"key is not a string in object")
                frame[1] = value
                if pos >= n:
                    raise _ParseError(_EOI)
                sep = tokens[pos][0]
                pos += 1
                if sep != COLON:
                    raise _ParseError(b"missing : in object pair")
                break
            key = frame[1]
            if key in container:
                raise _ParseError(b"duplicate key")
            container[key] = value
            frame[1] = None
            if pos >= n:
                raise _ParseError(_EOI)
            sep = tokens[pos][0]
            pos += 1
            if sep == RCURLY:
                stack.pop()
                value = container
                continue
            if sep != COMMA:
                raise _ParseError(b"expected separator in dict")
            break


def _parse_error_desc(message: bytes) -> str:
    return "JSON parse error, " + c_text(message[:_PARSE_MESSAGE_MAX])


# --- The lexer and streamer --------------------------------------------------------


class JSONMachine:
    """QEMU's lexer feeding QEMU's streamer, one byte stream, exact results.

    ``feed`` appends completed values and ``JSONParseError`` items to ``out``.
    """

    __slots__ = ("_brace", "_bracket", "_size", "_state", "_tok", "_tokens", "out")

    def __init__(self) -> None:
        self._state = START
        self._tok = bytearray()
        self._tokens: list[tuple[int, bytes]] = []
        self._brace = 0
        self._bracket = 0
        self._size = 0
        self.out: list[Any] = []

    @property
    def clean(self) -> bool:
        """Whether no token, partial token or error recovery is pending."""
        return self._state == START and not self._tokens

    # -- streamer

    def _reset(self) -> None:
        self._brace = self._bracket = 0
        self._tokens = []
        self._size = 0

    def _token(self, kind: int, text: bytes) -> None:
        if kind <= RSQUARE:
            if kind == LCURLY:
                self._brace += 1
            elif kind == RCURLY:
                self._brace -= 1
            elif kind == LSQUARE:
                self._bracket += 1
            else:
                self._bracket -= 1
        elif kind == ERROR:
            self._reset()
            self.out.append(JSONParseError("JSON parse error, stray '" + c_text(text) + "'"))
            return
        if self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._reset()
            self.out.append(JSONParseError("JSON token size limit exceeded"))
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._reset()
            self.out.append(JSONParseError("JSON token count limit exceeded"))
            return
        if self._brace + self._bracket > MAX_NESTING:
            self._reset()
            self.out.append(JSONParseError("JSON nesting depth limit exceeded"))
            return
        self._tokens.append((kind, text))
        self._size += len(text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        tokens = self._tokens
        self._reset()
        try:
            self.out.append(parse_tokens(tokens))
        except _ParseError as err:
            self.out.append(JSONParseError(_parse_error_desc(err.message)))

    # -- lexer

    def _error(self, byte: int) -> None:
        self._tok.append(byte)
        text = bytes(self._tok)
        self._tok.clear()
        self._state = RECOVERY
        self._token(ERROR, text)

    def _emit(self, kind: int) -> None:
        text = bytes(self._tok)
        self._tok.clear()
        self._state = START
        self._token(kind, text)

    def feed(self, data: bytes, pos: int = 0, *, until_clean: bool = False) -> int:
        """Lex ``data[pos:]``; return where it stopped.

        With ``until_clean`` it stops as soon as the machine is clean again
        after consuming at least one byte, so a caller can take over there.
        """
        n = len(data)
        i = pos
        tok = self._tok
        while i < n:
            state = self._state
            if state == START:
                if until_clean and i > pos and not self._tokens:
                    return i
                i = _WS_RUN.match(data, i).end()  # type: ignore[union-attr]
                if i >= n:
                    break
                if until_clean and i > pos and not self._tokens:
                    return i
                c = data[i]
                i += 1
                kind = _STRUCTURAL.get(c)
                if kind is not None:
                    self._token(kind, bytes((c,)))
                elif c == 0x22:
                    tok.append(c)
                    self._state = DQ
                elif c == 0x27:
                    tok.append(c)
                    self._state = SQ
                elif c == 0x30:
                    tok.append(c)
                    self._state = ZERO
                elif 0x31 <= c <= 0x39:
                    tok.append(c)
                    self._state = DIGITS
                elif c == 0x2D:
                    tok.append(c)
                    self._state = SIGN
                elif 0x61 <= c <= 0x7A:
                    tok.append(c)
                    self._state = KEYWORD_CHARS
                else:
                    self._error(c)
                continue
            if state == RECOVERY:
                i = _RECOVERY_RUN.match(data, i).end()  # type: ignore[union-attr]
                if i < n:
                    self._state = START  # lookahead: the byte is lexed afresh
                continue
            run = _RUNS.get(state)
            if run is not None:
                end = run.match(data, i).end()  # type: ignore[union-attr]
                room = MAX_TOKEN_SIZE + 1 - len(tok)
                if end - i >= room:
                    tok += data[i : i + room]
                    i += room
                    self._emit(OVERSIZE)
                    continue
                tok += data[i:end]
                i = end
                if i >= n:
                    break
            c = data[i]
            if state in (DQ, SQ):
                i += 1
                if c == (0x22 if state == DQ else 0x27):
                    tok.append(c)
                    self._emit(STRING)
                elif c == 0x5C:
                    tok.append(c)
                    self._state = DQ_ESC if state == DQ else SQ_ESC
                else:
                    self._error(c)
            elif state in (DQ_ESC, SQ_ESC):
                i += 1
                if 0x20 <= c <= 0xFD:
                    tok.append(c)
                    self._state = DQ if state == DQ_ESC else SQ
                else:
                    self._error(c)
            elif state == KEYWORD_CHARS:
                self._emit(KEYWORD)
            elif state == ZERO:
                if c in _D:
                    i += 1
                    self._error(c)
                elif c == 0x2E:
                    i += 1
                    tok.append(c)
                    self._state = MANTISSA
                else:
                    self._emit(INTEGER)
            elif state == DIGITS:
                if c == 0x2E:
                    i += 1
                    tok.append(c)
                    self._state = MANTISSA
                elif c in _EXP:
                    i += 1
                    tok.append(c)
                    self._state = EXP_E
                else:
                    self._emit(INTEGER)
            elif state == MANTISSA_DIGITS:
                if c in _EXP:
                    i += 1
                    tok.append(c)
                    self._state = EXP_E
                else:
                    self._emit(FLOAT)
            elif state == EXP_DIGITS:
                self._emit(FLOAT)
            else:
                # SIGN, MANTISSA, EXP_E, EXP_SIGN: one byte decides.
                i += 1
                if state == SIGN and c == 0x30:
                    tok.append(c)
                    self._state = ZERO
                elif state == SIGN and 0x31 <= c <= 0x39:
                    tok.append(c)
                    self._state = DIGITS
                elif state == MANTISSA and c in _D:
                    tok.append(c)
                    self._state = MANTISSA_DIGITS
                elif state == EXP_E and c in _PLUS_MINUS:
                    tok.append(c)
                    self._state = EXP_SIGN
                elif (state in (EXP_E, EXP_SIGN)) and c in _D:
                    tok.append(c)
                    self._state = EXP_DIGITS
                else:
                    self._error(c)
        return i
