"""A libnbd client session printed as a canonical JSON transcript.

Run by the system python (``/usr/bin/python3``: Debian's python3-libnbd is
not in the venv): ``libnbd_transcript.py SOCKET EXPORT [rw]``.  Every step's
answer goes into the transcript, errors as their errno name, so the same
session against qemu-storage-daemon and qmpgraph must print the same text:

* option mode: NBD_OPT_LIST (names, descriptions), NBD_OPT_LIST_META_CONTEXT
  with no query, with ``qemu:`` and with ``base:``, NBD_OPT_INFO, then GO
  with base:allocation and qemu:allocation-depth;
* the export's flags and block sizes;
* block status of the whole export (both contexts; also with REQ_ONE);
* structured reads: every chunk's type (data, hole), offset and length, and
  a digest of the bytes; with "cache", NBD_CMD_CACHE of the same ranges;
* on a writable export: a FUA write, flush, trim, write zeroes with and
  without NO_HOLE (and FAST_ZERO), cache, then status and reads again;
* or, instead of all that, a session without structured replies, or one
  choosing its export with NBD_OPT_EXPORT_NAME (no fixed newstyle).

Nothing from qmpgraph is imported: this is a client.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

# python3-libnbd, for the system python only; looked up at run time because
# "nbd" would otherwise name this very directory to the type checker.
nbd: Any = importlib.import_module("nbd")

CONTEXTS = ("base:allocation", "qemu:allocation-depth")


def _err(exc: Any) -> dict[str, Any]:
    """An nbd.Error as its errno (the message text is libnbd's, not the server's)."""
    return {"error": exc.errno}


def _try(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except nbd.Error as exc:
        return _err(exc)


def _options(h: Any, name: str) -> list[Any]:
    out: list[Any] = []
    listed: list[list[str]] = []
    out.append(["list", h.opt_list(lambda n, d: listed.append([n, d])), listed])
    for queries in ([], ["qemu:"], ["base:"], ["qemu:allocation-depth", "nope:x"]):
        h.set_export_name(name)
        h.clear_meta_contexts()
        for q in queries:
            h.add_meta_context(q)
        found: list[str] = []
        n = _try(h.opt_list_meta_context, found.append)
        out.append(["list_meta_context", queries, n, found])
    h.clear_meta_contexts()
    h.set_export_name(name)
    out.append(["info", _try(h.opt_info), _try(h.get_size)])
    for ctx in CONTEXTS:
        h.add_meta_context(ctx)
    h.opt_go()
    return out


def _flags(h: Any) -> dict[str, Any]:
    names = [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "is_read_only",
        "is_rotational",
        "get_structured_replies_negotiated",
    ]
    out: dict[str, Any] = {n: getattr(h, n)() for n in names}
    out["size"] = h.get_size()
    out["block_size"] = [
        h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)
    ]
    out["contexts"] = {ctx: h.can_meta_context(ctx) for ctx in CONTEXTS}
    return out


def _status(h: Any, flags: int = 0) -> list[Any]:
    size = h.get_size()
    got: list[Any] = []

    def cb(ctx: str, offset: int, entries: list[int], err: Any) -> int:
        got.append([ctx, offset, list(entries)])
        return 0

    pos = 0
    while pos < size:
        before = len(got)
        res = _try(h.block_status, min(size - pos, 1 << 30), pos, cb, flags)
        if isinstance(res, dict):
            got.append(res)
            break
        # Advance by what the first context covered (the server may answer less).
        step = sum(got[before][2][0::2]) if len(got) > before else 0
        if not step:
            break
        pos += step
    return got


def _chunk_recorder(chunks: list[Any]) -> Callable[..., int]:
    """A pread_structured chunk callback that notes each chunk's type and place."""

    def cb(buf: Any, off: int, status: int, err: Any) -> int:
        kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, status)
        chunks.append([kind, off, len(buf)])
        return 0

    return cb


def _reads(h: Any, ranges: list[tuple[int, int]], flags: int = 0) -> list[Any]:
    out: list[Any] = []
    for offset, length in ranges:
        chunks: list[Any] = []
        res = _try(h.pread_structured, length, offset, _chunk_recorder(chunks), flags)
        if not isinstance(res, dict):
            res = hashlib.sha256(res).hexdigest()[:16]
        out.append([offset, length, chunks, res])
    return out


def _writes(h: Any, size: int, fast_zero: bool) -> list[Any]:
    mid = (size // 2) & ~4095
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("pwrite_fua", lambda: h.pwrite(b"\x5a" * 8192, 4096, nbd.CMD_FLAG_FUA)),
        ("pwrite", lambda: h.pwrite(b"\x01\x02" * 32768, mid, 0)),
        ("flush", h.flush),
        ("trim", lambda: h.trim(65536, mid)),
        ("trim_fua", lambda: h.trim(4096, 0, nbd.CMD_FLAG_FUA)),
        ("zero", lambda: h.zero(65536, 131072, 0)),
        ("zero_no_hole", lambda: h.zero(65536, 262144, nbd.CMD_FLAG_NO_HOLE)),
        ("zero_fua", lambda: h.zero(4096, 8192, nbd.CMD_FLAG_FUA)),
        ("cache", lambda: h.cache(65536, 0)),
        ("pwrite_past_end", lambda: h.pwrite(b"x" * 512, size, 0)),
    ]
    if fast_zero:
        fast = nbd.CMD_FLAG_FAST_ZERO
        steps[-2:-2] = [
            ("zero_fast", lambda: h.zero(4096, 12288, fast)),
            ("zero_fast_aligned", lambda: h.zero(65536, mid & ~65535, fast)),
            ("zero_fast_near_end", lambda: h.zero(4096, size - 8192, fast)),
            ("zero_fast_at_5m", lambda: h.zero(4096, (5 << 20) + 4096, fast)),
        ]
    out: list[Any] = []
    for name, fn in steps:
        res = _try(fn)
        out.append([name, res if isinstance(res, dict) else "ok"])
    return out


def _plain(sock: str, name: str, mode: str) -> dict[str, Any]:
    """Without structured replies ("simple"), or without fixed newstyle, so
    the export is chosen by NBD_OPT_EXPORT_NAME ("oldstyle")."""
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(False)
    if mode == "oldstyle":
        h.set_handshake_flags(0)
    h.add_meta_context("base:allocation")
    h.connect_unix(sock)
    out: dict[str, Any] = {"protocol": h.get_protocol(), "flags": _flags(h)}
    size = h.get_size()
    reads = []
    for offset, length in [(0, min(size, 1 << 20)), (12345, 4321)]:
        res = _try(h.pread, length, offset)
        reads.append(res if isinstance(res, dict) else hashlib.sha256(res).hexdigest()[:16])
    out["reads"] = reads
    out["status"] = _try(h.block_status, min(size, 65536), 0, lambda *a: 0)
    h.shutdown()
    return out


def main() -> None:
    """Connect to ``argv[1]``'s export ``argv[2]``; ``argv[3]`` "rw" also writes
    ("rw-nofast": without the FAST_ZERO request; "simple", "oldstyle": see
    ``_plain``; "reads:OFFSET+LENGTH,...": only structured reads of those;
    "cache": the read-only session, then NBD_CMD_CACHE)."""
    sock, name = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "ro"
    if mode in ("simple", "oldstyle"):
        print(json.dumps(_plain(sock, name, mode), indent=1, sort_keys=True))
        return
    if mode.startswith("reads:"):  # "reads:OFFSET+LENGTH,...": structured reads only
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(sock)
        pairs = [item.split("+") for item in mode[6:].split(",")]
        print(json.dumps(_reads(h, [(int(o), int(n)) for o, n in pairs]), indent=1))
        h.shutdown()
        return
    writable = mode.startswith("rw")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(sock)
    transcript: dict[str, Any] = {"options": _options(h, name)}
    transcript["flags"] = _flags(h)
    size = h.get_size()
    ranges = [(0, min(size, 1 << 20)), (max(0, size - 70000), min(size, 70000)), (12345, 4321)]
    transcript["status"] = _status(h)
    transcript["status_req_one"] = _status(h, nbd.CMD_FLAG_REQ_ONE)
    transcript["reads"] = _reads(h, ranges)
    transcript["reads_df"] = _reads(h, ranges[:1], nbd.CMD_FLAG_DF)
    if mode == "cache":
        # NBD_CMD_CACHE is a copy-on-read prefetch in QEMU (EPERM on read-only
        # nodes), then the status again.
        transcript["cache"] = [_try(h.cache, n, o) for o, n in ranges]
        transcript["status_after"] = _status(h)
    if writable:
        transcript["writes"] = _writes(h, size, mode != "rw-nofast")
        transcript["status_after"] = _status(h)
        transcript["reads_after"] = _reads(h, ranges)
    h.shutdown()
    print(json.dumps(transcript, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
