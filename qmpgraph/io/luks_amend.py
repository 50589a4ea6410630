"""Amending the key slots of a luks node (QEMU 7.2's x-blockdev-amend with
``driver: luks``: crypto/block-luks.c's amend and block/crypto.c's wrapper).

``state: active`` adds a key: ``new-secret`` goes into ``keyslot`` or the
first inactive slot; the master key is recovered with ``secret`` (default:
the node's ``key-secret``); the slot gets a fresh salt, PBKDF2 iterations
scaled to ``iter-time`` (default 2000 ms), the anti-forensic split of the
master key encrypted with the volume's cipher, then the header is written.
``state: inactive`` erases slots, the one given by ``keyslot`` (checked
against ``old-secret`` when given) or every slot ``old-secret`` opens: the
header first, then the key material overwritten with random bytes.  Every
refusal has QEMU's message and order; ``force`` skips the refusals that
protect the last active key or an active slot.

Iterations: QEMU counts how many PBKDF2 iterations its thread runs in a
second, so the number differs from run to run there too; here the rate is
measured once per hash per process (on a shorter sample), then scaled the
same way (at least 1000).

Permissions (block_crypto_amend_prepare/cleanup, run before the job starts
and when it is cleaned): ``set_updating_keys`` flips the node's
``updating_keys`` and refreshes the permissions below it, so a read-only
node or another user of ``file`` that needs consistent reads refuses the
command.

Not modelled: the header and key material are written straight through
the file node's I/O hook, so dirty bitmaps on that node are not marked.

What does not live here: the job (``qmpgraph.commands.amend``), opening
and the header parser (``qmpgraph.drivers.luks``), the ciphers
(``qmpgraph.drivers.luks_crypto``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from qmpgraph.drivers import luks_crypto
from qmpgraph.drivers.luks import (
    KeySlot,
    LuksHeader,
    LuksState,
    load_key,
    parse_header,
)
from qmpgraph.errors import QMPError
from qmpgraph.graph.model import Node
from qmpgraph.io.hooks import JOB_YIELD, hook_of
from qmpgraph.jobs.core import JobFailed
from qmpgraph.objects.qom import ObjectTree
from qmpgraph.objects.secret import lookup_secret_utf8
from qmpgraph.transactions.refresh import refresh_subtrees

NUM_SLOTS = 8
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
SECTOR = 512
SALT_LEN = 32
MIN_SLOT_ITERS = 1000
DEFAULT_ITER_TIME_MS = 2000
ERASE_ITERATIONS = 40
# Where the key slot table starts in the 592-byte header, and one entry.
_SLOTS_AT = 208
_SLOT = struct.Struct(">II32sII")
_HEADER_LEN = _SLOTS_AT + NUM_SLOTS * _SLOT.size
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_ERANGE = os.strerror(errno.ERANGE)

_rates: dict[str, int] = {}


def _fail(message: str) -> JobFailed:
    return JobFailed(errno.EINVAL, message)


def iterations_per_second(hash_name: str, key_len: int) -> int:
    """PBKDF2 iterations per second of thread CPU time (qcrypto_pbkdf2_count_iters)."""
    rate = _rates.get(hash_name)
    if rate is None:
        iterations = 1 << 12
        while True:
            start = time.thread_time()
            hashlib.pbkdf2_hmac(hash_name, b"qmpgraph", bytes(SALT_LEN), iterations, key_len)
            spent = time.thread_time() - start
            if spent >= 0.05 or iterations >= 1 << 24:
                break
            iterations *= 2
        rate = max(int(iterations / max(spent, 1e-6)), 1)
        _rates[hash_name] = rate
    return rate


def slot_iterations(hash_name: str, key_len: int, iter_time: int) -> int:
    """The slot's iteration count for ``iter_time`` ms, with QEMU's range errors."""
    rate = iterations_per_second(hash_name, key_len)
    if iter_time and rate > _U64_MAX // iter_time:
        raise _fail(f"PBKDF iterations {rate} too large to scale: {_ERANGE}")
    iters = rate * iter_time // 1000
    if iters > _U32_MAX:
        raise _fail(f"PBKDF iterations {iters} larger than {_U32_MAX}: {_ERANGE}")
    return max(iters, MIN_SLOT_ITERS)


def set_updating_keys(daemon: Any, node: Node, on: bool) -> None:
    """Flip ``updating_keys`` and refresh the permissions of ``node``'s subtree.

    Turning it on may fail (the error propagates, the flag is back off);
    turning it off never fails (QEMU ignores the error there).
    """
    state = node.state
    assert isinstance(state, LuksState)
    node.state = dataclasses.replace(state, updating_keys=on)
    try:
        with daemon.graph_transaction("luks-updating-keys", {"node": node.node_name}) as tran:
            refresh_subtrees(tran, daemon.graph, [node])
    except QMPError:
        node.state = dataclasses.replace(node.state, updating_keys=False)
        if on:
            raise


def _secret(tree: ObjectTree, secret_id: str) -> str:
    try:
        return lookup_secret_utf8(tree, secret_id)
    except QMPError as exc:
        raise _fail(str(exc)) from None


class _Io:
    """Reads and writes of the LUKS area of the ``file`` node.

    ``io_point`` (the job's) comes before each of QEMU's reads and writes:
    the command's reply goes out before the job's first I/O, as in QEMU.
    """

    def __init__(
        self, file_node: Node, io_point: Callable[[], Awaitable[None]], base: int = 0
    ) -> None:
        self.node = file_node
        self.io_point = io_point
        self.base = base

    async def header(self, length: int) -> bytes:
        """The header as it is (QEMU keeps it in memory: no I/O point, and no
        wait for the disk either, so a check failing on it fails the job
        before the command's reply, as in qsd)."""
        token = JOB_YIELD.set(None)
        try:
            return await hook_of(self.node).read(self.node, self.base, length)
        finally:
            JOB_YIELD.reset(token)

    async def read(self, offset: int, length: int) -> bytes:
        await self.io_point()
        return await hook_of(self.node).read(self.node, self.base + offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.io_point()
        await hook_of(self.node).write(self.node, self.base + offset, data, 0)


async def _load_key(io: _Io, header: LuksHeader, index: int, password: str) -> bytes | None:
    """qcrypto_block_luks_load_key: the master key if ``password`` opens slot ``index``."""
    slot = header.slots[index]
    if slot.active != SLOT_ENABLED:
        return None
    material = await io.read(slot.key_offset_sector * SECTOR, header.master_key_len * slot.stripes)
    try:
        return await trio.to_thread.run_sync(load_key, header, slot, password, material)
    except QMPError as exc:
        raise _fail(str(exc)) from None


async def _find_key(io: _Io, header: LuksHeader, password: str) -> bytes:
    for index in range(NUM_SLOTS):
        master = await _load_key(io, header, index, password)
        if master is not None:
            return master
    raise _fail("Invalid password, cannot unlock any keyslot")


def _pack_slot(slot: KeySlot) -> bytes:
    return _SLOT.pack(slot.active, slot.iterations, slot.salt, slot.key_offset_sector, slot.stripes)


async def _store_header(io: _Io, raw: bytearray, header: LuksHeader) -> None:
    for index, slot in enumerate(header.slots):
        at = _SLOTS_AT + index * _SLOT.size
        raw[at : at + _SLOT.size] = _pack_slot(slot)
    await io.write(0, bytes(raw))


def _with_slot(header: LuksHeader, index: int, slot: KeySlot) -> LuksHeader:
    slots = list(header.slots)
    slots[index] = slot
    return dataclasses.replace(header, slots=tuple(slots))


def slot_material(
    header: LuksHeader, slot: KeySlot, password: str, master: bytes, iter_time: int
) -> tuple[KeySlot, bytes]:
    """qcrypto_block_luks_store_key's computation: the new slot and its material."""
    salt = os.urandom(SALT_LEN)
    iters = slot_iterations(header.hash_spec, header.master_key_len, iter_time)
    slot_key = hashlib.pbkdf2_hmac(
        header.hash_spec, password.encode(), salt, iters, header.master_key_len
    )
    randoms = os.urandom(header.master_key_len * (slot.stripes - 1))
    split = luks_crypto.af_split(header.hash_spec, master, slot.stripes, randoms)
    material = luks_crypto.encrypt_sectors(
        header.cipher_name, header.cipher_mode, header.ivgen, slot_key, split
    )
    new = dataclasses.replace(slot, active=SLOT_ENABLED, iterations=iters, salt=salt)
    return new, material


def _active_count(header: LuksHeader) -> int:
    return sum(1 for slot in header.slots if slot.active == SLOT_ENABLED)


async def _add_keyslot(
    io: _Io, tree: ObjectTree, header: LuksHeader, opts: dict[str, Any], open_secret: str | None
) -> LuksHeader:
    """qcrypto_block_luks_amend_add_keyslot."""
    iter_time = int(opts.get("iter-time", DEFAULT_ITER_TIME_MS))
    if "new-secret" not in opts:
        raise _fail("'new-secret' is required to activate a keyslot")
    if "old-secret" in opts:
        raise _fail("'old-secret' must not be given when activating keyslots")
    if "keyslot" in opts:
        keyslot = int(opts["keyslot"])
        if not 0 <= keyslot < NUM_SLOTS:
            # QEMU prints the index with %u.
            shown = keyslot & _U32_MAX
            raise _fail(f"Invalid keyslot {shown} specified, must be between 0 and {NUM_SLOTS - 1}")
    else:
        free = [i for i, s in enumerate(header.slots) if s.active != SLOT_ENABLED]
        if not free:
            raise _fail("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not opts.get("_force") and header.slots[keyslot].active == SLOT_ENABLED:
        raise _fail(f"Refusing to overwrite active keyslot {keyslot} - please erase it first")
    secret_id = opts.get("secret", open_secret)
    old_password = _secret(tree, str(secret_id))
    master = await _find_key(io, header, old_password)
    new_password = _secret(tree, str(opts["new-secret"]))
    slot, material = await trio.to_thread.run_sync(
        slot_material, header, header.slots[keyslot], new_password, master, iter_time
    )
    await io.write(slot.key_offset_sector * SECTOR, material)
    return _with_slot(header, keyslot, slot)


async def _erase_key(io: _Io, raw: bytearray, header: LuksHeader, index: int) -> LuksHeader:
    """qcrypto_block_luks_erase_key: the header first, then random material."""
    slot = header.slots[index]
    length = header.master_key_len * slot.stripes
    erased = dataclasses.replace(slot, active=SLOT_DISABLED, iterations=0, salt=bytes(SALT_LEN))
    header = _with_slot(header, index, erased)
    await _store_header(io, raw, header)
    for _ in range(ERASE_ITERATIONS):
        await io.write(slot.key_offset_sector * SECTOR, os.urandom(length))
    return header


async def _erase_keyslots(
    io: _Io, raw: bytearray, tree: ObjectTree, header: LuksHeader, opts: dict[str, Any]
) -> LuksHeader:
    """qcrypto_block_luks_amend_erase_keyslots."""
    force = bool(opts.get("_force"))
    for name in ("new-secret", "iter-time", "secret"):
        if name in opts:
            raise _fail(f"'{name}' must not be given when erasing keyslots")
    old_password = _secret(tree, str(opts["old-secret"])) if "old-secret" in opts else None
    if "keyslot" in opts:
        keyslot = int(opts["keyslot"])
        if not 0 <= keyslot < NUM_SLOTS:
            raise _fail(
                f"Invalid keyslot {keyslot} specified, must be between 0 and {NUM_SLOTS - 1}"
            )
        if old_password is not None and await _load_key(io, header, keyslot, old_password) is None:
            raise _fail(
                f"Given keyslot {keyslot} doesn't contain the given old password "
                "for erase operation"
            )
        if not force and header.slots[keyslot].active != SLOT_ENABLED:
            raise _fail(f"Given keyslot {keyslot} is already erased (inactive) ")
        if not force and _active_count(header) == 1:
            raise _fail(
                f"Attempt to erase the only active keyslot {keyslot} which will erase "
                "all the data in the image irreversibly - refusing operation"
            )
        return await _erase_key(io, raw, header, keyslot)
    if old_password is not None:
        matching = [
            i for i in range(NUM_SLOTS) if await _load_key(io, header, i, old_password) is not None
        ]
        if not matching:
            raise _fail("No keyslots match given (old) password for erase operation")
        if not force and len(matching) == _active_count(header):
            raise _fail(
                "All the active keyslots match the (old) password that was given and "
                "erasing them will erase all the data in the image irreversibly - "
                "refusing operation"
            )
        for index in matching:
            header = await _erase_key(io, raw, header, index)
        return header
    raise _fail(
        "To erase keyslot(s), either explicit keyslot index or the password currently "
        "contained in them must be given"
    )


async def amend_luks_node(
    tree: ObjectTree,
    node: Node,
    options: dict[str, Any],
    force: bool,
    io_point: Callable[[], Awaitable[None]],
) -> None:
    """block_crypto_co_amend_luks: amend the key slots of luks node ``node``."""
    state = node.state
    assert isinstance(state, LuksState)
    file_edge = node.file
    assert file_edge is not None and file_edge.child is not None
    io = _Io(file_edge.child, io_point)
    raw = bytearray(await io.header(_HEADER_LEN))
    header = parse_header(bytes(raw))
    opts = dict(options, _force=force)
    if opts.get("state") == "active":
        header = await _add_keyslot(io, tree, header, opts, state.secret)
        await _store_header(io, raw, header)
    else:
        header = await _erase_keyslots(io, raw, tree, header, opts)
    node.state = dataclasses.replace(state, header=header)
