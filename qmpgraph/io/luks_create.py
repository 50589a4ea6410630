"""Creating a LUKS1 volume (QEMU 7.2's qcrypto_block_luks_create, reached by
blockdev-create with ``driver: luks``: block/crypto.c's create).

In QEMU's order: the defaults (aes-256, xts, plain64, sha256, 2000 ms),
``key-secret`` required and looked up, the cipher algorithm named for the
header, a random master key and salt, the master key digest's iterations
(the PBKDF2 rate scaled to ``iter-time``, divided by 8, at least 1000), the
eight key slot areas (4000 stripes each, aligned to the 4 KiB header), the
file truncated to the payload offset plus ``size`` (with the preallocation
asked for, ``metadata`` meaning none), then key slot 0 stored with the
password and the header written.

Shared with other creators: ``check_key_secret`` and ``check_cipher`` (the
checks qcow2's ``encrypt`` options get too, with the ``encrypt.`` prefix)
and ``truncate_file`` (file-posix's truncate with preallocation, also the
``file`` driver's create and a qcow2 data file's growth).

Not modelled (refused with a qmpgraph message): ciphers other than AES,
ESSIV IVs and modes other than xts/cbc/ecb (``luks_crypto`` cannot run
them).

What does not live here: the job (``qmpgraph.commands.create``), the key
slot computations (``luks_amend``), the header parser (``luks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from qmpgraph.drivers.file import FileState
from qmpgraph.drivers.luks import KeySlot, LuksHeader
from qmpgraph.errors import QMPError
from qmpgraph.graph.model import Node
from qmpgraph.io.luks_amend import (
    NUM_SLOTS,
    SALT_LEN,
    SECTOR,
    SLOT_DISABLED,
    iterations_per_second,
    slot_material,
)
from qmpgraph.jobs.core import JobFailed
from qmpgraph.objects.qom import ObjectTree
from qmpgraph.objects.secret import lookup_secret_utf8

_MAGIC = b"LUKS\xba\xbe"
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
_STRIPES = 4000
_HEADER_SECTORS = 4096 // SECTOR
_DIGEST_LEN = 20
_MIN_MASTER_ITERS = 1000
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_AES = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
_LUKS_CIPHERS = frozenset(
    {"aes-128", "aes-192", "aes-256", "cast5-128", "serpent-128", "serpent-192",
     "serpent-256", "twofish-128", "twofish-192", "twofish-256"}
)  # fmt: skip


def _fail(message: str, code: int = errno.EINVAL) -> JobFailed:
    return JobFailed(code, message)


@dataclass(frozen=True, slots=True)
class LuksVolume:
    """What the create job writes: the header, slot 0's material, the file length."""

    header: bytes
    material_offset: int
    material: bytes
    length: int
    preallocation: str


def _pack(header: LuksHeader, cipher_mode_spec: str) -> bytes:
    raw = _HEADER.pack(
        _MAGIC,
        header.version,
        header.cipher_name.encode(),
        cipher_mode_spec.encode(),
        header.hash_spec.encode(),
        header.payload_offset_sector,
        header.master_key_len,
        header.master_key_digest,
        header.master_key_salt,
        header.master_key_iterations,
        header.uuid.encode(),
    )
    for slot in header.slots:
        raw += _SLOT.pack(
            slot.active, slot.iterations, slot.salt, slot.key_offset_sector, slot.stripes
        )
    return raw


def check_key_secret(tree: ObjectTree, opts: dict[str, Any], prefix: str = "") -> str:
    """The password: ``key-secret`` required and looked up (QEMU's first
    create checks, for LUKS and for qcow2's legacy AES alike); ``prefix``
    is where the options sit (``encrypt.`` inside a qcow2 image)."""
    if "key-secret" not in opts:
        raise _fail(f"Parameter '{prefix}key-secret' is required for cipher")
    try:
        return lookup_secret_utf8(tree, str(opts["key-secret"]))
    except QMPError as exc:
        raise _fail(str(exc)) from None


def check_cipher(opts: dict[str, Any]) -> None:
    """The cipher algorithm must be one LUKS has a name for."""
    cipher_alg = str(opts.get("cipher-alg", "aes-256"))
    if cipher_alg not in _LUKS_CIPHERS:
        raise _fail(f"Algorithm '{cipher_alg}' not supported")


def plan_volume(tree: ObjectTree, opts: dict[str, Any]) -> LuksVolume:
    """qcrypto_block_luks_create's computation (CPU only: run it in a thread)."""
    iter_time = int(opts.get("iter-time", 2000))
    cipher_alg = str(opts.get("cipher-alg", "aes-256"))
    cipher_mode = str(opts.get("cipher-mode", "xts"))
    ivgen_alg = str(opts.get("ivgen-alg", "plain64"))
    hash_alg = str(opts.get("hash-alg", "sha256"))
    ivgen_hash = opts.get("ivgen-hash-alg")
    if ivgen_alg == "essiv" and ivgen_hash is None:
        ivgen_hash = "sha256"
    password = check_key_secret(tree, opts)
    check_cipher(opts)
    if cipher_alg not in _AES or ivgen_alg == "essiv" or cipher_mode not in ("xts", "cbc", "ecb"):
        raise _fail(
            "qmpgraph cannot create this LUKS volume: "
            f"{cipher_alg} {cipher_mode}-{ivgen_alg} is not supported",
            errno.ENOTSUP,
        )
    spec = f"{cipher_mode}-{ivgen_alg}" + (f":{ivgen_hash}" if ivgen_hash is not None else "")
    key_len = _AES[cipher_alg] * (2 if cipher_mode == "xts" else 1)
    master_salt = os.urandom(SALT_LEN)
    master = os.urandom(key_len)
    rate = iterations_per_second(hash_alg, _DIGEST_LEN)
    if iter_time and rate > _U64_MAX // iter_time:
        raise _fail(f"PBKDF iterations {rate} too large to scale: {os.strerror(errno.ERANGE)}")
    iters = rate * iter_time // 1000 // 8
    if iters > _U32_MAX:
        raise _fail(f"PBKDF iterations {iters} larger than {_U32_MAX}: {os.strerror(errno.ERANGE)}")
    iters = max(iters, _MIN_MASTER_ITERS)
    digest = hashlib.pbkdf2_hmac(hash_alg, master, master_salt, iters, _DIGEST_LEN)
    split_sectors = -(-(key_len * _STRIPES) // SECTOR)
    split_sectors = -(-split_sectors // _HEADER_SECTORS) * _HEADER_SECTORS
    slots = tuple(
        KeySlot(SLOT_DISABLED, 0, bytes(SALT_LEN), _HEADER_SECTORS + i * split_sectors, _STRIPES)
        for i in range(NUM_SLOTS)
    )
    payload = _HEADER_SECTORS + NUM_SLOTS * split_sectors
    header = LuksHeader(
        1, "aes", cipher_mode, ivgen_alg, hash_alg, payload, key_len, digest, master_salt,
        iters, str(uuid.uuid4()), slots,
    )  # fmt: skip
    size = int(opts["size"])
    payload_bytes = payload * SECTOR
    if size > 2**63 - 1 or payload_bytes > 2**63 - 1 - size:
        raise _fail("The requested file size is too large", errno.EFBIG)
    slot0, material = slot_material(header, slots[0], password, master, iter_time)
    header = dataclasses.replace(header, slots=(slot0, *slots[1:]))
    prealloc = str(opts.get("preallocation", "off"))
    return LuksVolume(
        _pack(header, spec),
        slot0.key_offset_sector * SECTOR,
        material,
        payload_bytes + size,
        "off" if prealloc == "metadata" else prealloc,
    )


def truncate_file(fd: int, length: int, prealloc: str) -> None:
    """blk_truncate of a regular file to ``length`` with ``prealloc``
    (file-posix's handle_aiocb_truncate, its messages and errnos)."""
    current = os.fstat(fd).st_size
    if prealloc != "off" and length < current:
        raise _fail("Cannot use preallocation for shrinking files", errno.ENOTSUP)
    if prealloc == "falloc":
        if length != current:
            _os_call(
                "Could not preallocate new data", os.posix_fallocate, fd, current, length - current
            )
            if current == 0:
                allocate_first_block(fd, length)
        return
    if prealloc == "full":
        _os_call("Could not resize file", os.ftruncate, fd, length)
        chunk = bytes(min(max(length - current, 1), 1 << 16))
        for offset in range(current, length, len(chunk)):
            _os_call(
                "Could not write zeros for preallocation",
                os.pwrite, fd, chunk[: length - offset], offset,
            )  # fmt: skip
        _os_call("Could not flush file to disk", os.fsync, fd)
        return
    if prealloc != "off":
        raise _fail(f"Unsupported preallocation mode: {prealloc}", errno.ENOTSUP)
    _os_call("Could not resize file", os.ftruncate, fd, length)
    if current == 0 and length > 0:
        allocate_first_block(fd, length)


def allocate_first_block(fd: int, length: int) -> None:
    """file-posix writes the first block of a file grown from empty (to speed
    up its alignment probe): what QEMU's images have allocated at first."""
    with contextlib.suppress(OSError):  # QEMU ignores failures
        os.pwrite(fd, bytes(512 if length < 4096 else 4096), 0)


def _os_call(what: str, func: Callable[..., object], *args: int | bytes) -> None:
    try:
        func(*args)
    except OSError as err:
        code = err.errno or errno.EIO
        raise _fail(f"{what}: {os.strerror(code)}", code) from err
    except OverflowError as err:
        raise _fail(f"{what}: {os.strerror(errno.EFBIG)}", errno.EFBIG) from err


async def write_volume(tree: ObjectTree, file_node: Node, opts: dict[str, Any]) -> None:
    """The volume computed (in a thread), the file sized, slot 0 and the header written."""
    state = file_node.state
    if not isinstance(state, FileState) or state.lock.closed:
        raise _fail("qmpgraph creates LUKS volumes on 'file' nodes only", errno.ENOTSUP)
    volume = await trio.to_thread.run_sync(plan_volume, tree, opts)
    fd = state.lock.fd
    truncate_file(fd, volume.length, volume.preallocation)
    try:
        for offset, data in ((volume.material_offset, volume.material), (0, volume.header)):
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], offset + pos)
    except OSError as err:
        raise JobFailed(err.errno or errno.EIO) from err
