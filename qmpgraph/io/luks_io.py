"""The luks driver's data path: guest data encrypted by 512-byte sectors.

QEMU 7.2 (block/crypto.c) reads and writes the payload, which starts at the
header's payload offset in ``file``; sector N of the guest's view is
encrypted with the IV of sector N (numbered from the payload start, not
from the file start). Its request alignment is the cipher's sector size,
so the generic layer reads, patches and writes back partial sectors, with
the request serialised against overlapping ones; here one lock per node
orders every write (a partial sector's read-modify-write must not
interleave with another write to the same sector).

Like QEMU's driver it has no block-status, write-zeroes or discard of its
own: block status is "data, allocated" everywhere, zeroes are written as
encrypted zeros, and a discard does nothing.

Not here: the header and key slots (``qmpgraph.drivers.luks``), the ciphers
(``qmpgraph.drivers.luks_crypto``).
"""

from __future__ import annotations

import errno

import trio

from qmpgraph.drivers import luks_crypto
from qmpgraph.drivers.luks import LuksState
from qmpgraph.graph.model import Edge, Node
from qmpgraph.io.hooks import IOHook, child_read, child_write, register_hook
from qmpgraph.io.request import BlockIOError

SECTOR = 512


def _parts(node: Node) -> tuple[LuksState, bytes, Edge, int]:
    state = node.state
    edge = node.file
    if not isinstance(state, LuksState) or edge is None:
        raise BlockIOError(errno.ENOMEDIUM)
    if state.key is None:  # opened without I/O
        raise BlockIOError(errno.EIO)
    return state, state.key, edge, state.header.payload_offset_sector * SECTOR


def _cipher(state: LuksState) -> tuple[str, str, str]:
    header = state.header
    return header.cipher_name, header.cipher_mode, header.ivgen


class LuksIO(IOHook):
    """luks: decrypt on read, encrypt on write (see the module docstring)."""

    def __init__(self) -> None:
        # One write lock per opened luks state (a reopen keeps the state).
        self._locks: dict[int, tuple[LuksState, trio.Lock]] = {}

    def _lock(self, state: LuksState) -> trio.Lock:
        entry = self._locks.get(id(state))
        if entry is None or entry[0] is not state:
            entry = (state, trio.Lock())
            self._locks[id(state)] = entry
        return entry[1]

    async def _read_sectors(self, node: Node, start: int, end: int) -> bytes:
        state, key, edge, payload = _parts(node)
        raw = await child_read(edge, payload + start, end - start)
        first = start // SECTOR
        try:
            return luks_crypto.decrypt_sectors(*_cipher(state), key, raw, first_sector=first)
        except luks_crypto.Unsupported as err:
            raise BlockIOError(errno.ENOTSUP, str(err)) from None

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        start = offset - offset % SECTOR
        end = -(-(offset + length) // SECTOR) * SECTOR
        plain = await self._read_sectors(node, start, end)
        return plain[offset - start : offset - start + length]

    async def write(self, node: Node, offset: int, data: bytes, flags: int) -> None:
        state, key, edge, payload = _parts(node)
        async with self._lock(state):
            start = offset - offset % SECTOR
            end = -(-(offset + len(data)) // SECTOR) * SECTOR
            if start != offset or end != offset + len(data):
                buf = bytearray(await self._read_sectors(node, start, end))
                buf[offset - start : offset - start + len(data)] = data
                data = bytes(buf)
            first = start // SECTOR
            try:
                raw = luks_crypto.encrypt_sectors(*_cipher(state), key, data, first_sector=first)
            except luks_crypto.Unsupported as err:
                raise BlockIOError(errno.ENOTSUP, str(err)) from None
            await child_write(edge, payload + start, raw, flags)


register_hook("luks", LuksIO())
