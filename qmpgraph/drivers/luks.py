"""The ``luks`` format driver (control plane): header, key slots, password.

QEMU 7.2 (block/crypto.c, crypto/block-luks.c), in its order: ``file``
(IMAGE) is opened first; then, unless the node is opened without I/O,
``key-secret`` is required ("Parameter 'key-secret' is required for
cipher") and must name a loaded secret whose data is UTF-8
(``qmpgraph.objects.secret``); the 592-byte LUKS1 header is read and
checked (magic, version, key slot sanity, cipher mode string, cipher and
hash names); the password must unlock an active key slot (PBKDF2, sector
decryption of the key material, anti-forensic merge, master key digest),
else "Invalid password, cannot unlock any keyslot".  The virtual size is
the file's size minus the payload offset.

Permissions: the default rule for an IMAGE child, then WRITE and RESIZE are
taken only when the parents take them, and shared whenever the parents
share them (crypto's own rule, probed on 7.2); while an amend job updates
the key slots (``updating_keys``), WRITE is taken and CONSISTENT_READ and
WRITE are not shared.

The unlocked master key stays in the node's state for the data path
(``qmpgraph.io.luks_io``). Not modelled: ESSIV and non-AES ciphers cannot be
unlocked here (the open is refused with a qmpgraph message).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from qmpgraph.drivers import luks_crypto
from qmpgraph.drivers.base import ChildSpec, Driver, OpenContext
from qmpgraph.errors import GenericError
from qmpgraph.graph.model import Node
from qmpgraph.graph.perms import OpenFlag, Perm, Role
from qmpgraph.objects import tree_for
from qmpgraph.objects.secret import lookup_secret_utf8

_MAGIC = b"LUKS\xba\xbe"
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
_NUM_SLOTS = 8
_SLOT_ENABLED = 0x00AC71F3
_SLOT_DISABLED = 0x0000DEAD
_SECTOR = 512
_KEY_SLOT_OFFSET = 4096
_DIGEST_LEN = 20
_CIPHERS = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32), "twofish": (16, 24, 32)}
_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGENS = ("plain", "plain64", "essiv")
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


@dataclass(frozen=True, slots=True)
class KeySlot:
    """One LUKS1 key slot."""

    active: int
    iterations: int
    salt: bytes
    key_offset_sector: int
    stripes: int


@dataclass(frozen=True, slots=True)
class LuksHeader:
    """The parsed LUKS1 header (QEMU's view after load and parse)."""

    version: int
    cipher_name: str
    cipher_mode: str
    ivgen: str
    hash_spec: str
    payload_offset_sector: int
    master_key_len: int
    master_key_digest: bytes
    master_key_salt: bytes
    master_key_iterations: int
    uuid: str
    slots: tuple[KeySlot, ...]


@dataclass(frozen=True, slots=True)
class LuksState:
    """Per-node state of a luks node."""

    header: LuksHeader
    size: int
    # The key-secret the node was opened with (amend unlocks with it).
    secret: str | None = None
    # During x-blockdev-amend: exclusive write access to the header.
    updating_keys: bool = False
    # The master key (None when opened without I/O): the payload's cipher key.
    key: bytes | None = None


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def parse_header(raw: bytes) -> LuksHeader:
    """Load, check and parse the header as QEMU does, with its messages."""
    raw = raw.ljust(_HEADER.size + _NUM_SLOTS * _SLOT.size, b"\0")
    fields = _HEADER.unpack_from(raw)
    magic, version, cname, cmode, hspec, payload, mklen, digest, salt, iters, uuid = fields
    slots = tuple(
        KeySlot(*_SLOT.unpack_from(raw, _HEADER.size + i * _SLOT.size)) for i in range(_NUM_SLOTS)
    )
    if magic != _MAGIC:
        raise GenericError("Volume is not in LUKS format")
    if version != 1:
        raise GenericError(f"LUKS version {version} is not supported")
    header_sectors = _KEY_SLOT_OFFSET // _SECTOR
    mask32 = 0xFFFFFFFF

    def key_sectors(stripes: int) -> int:
        sectors = -(-(int(mklen) * stripes) // _SECTOR)
        return int(-(-sectors // header_sectors) * header_sectors)

    for i, s1 in enumerate(slots):
        start1, len1 = s1.key_offset_sector, key_sectors(s1.stripes)
        if s1.stripes == 0:
            raise GenericError(f"Keyslot {i} is corrupted (stripes == 0)")
        if s1.active not in (_SLOT_DISABLED, _SLOT_ENABLED):
            raise GenericError(f"Keyslot {i} state (active/disable) is corrupted")
        if (start1 + len1) & mask32 > payload:
            raise GenericError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, _NUM_SLOTS):
            start2, len2 = slots[j].key_offset_sector, key_sectors(slots[j].stripes)
            if (start1 + len1) & mask32 > start2 and (start2 + len2) & mask32 > start1:
                raise GenericError(f"Keyslots {i} and {j} are overlapping in the header")
    mode_text = _cstr(cmode)
    mode, sep, ivgen = mode_text.partition("-")
    if not sep:
        raise GenericError(f"Unexpected cipher mode string format {mode_text}")
    ivgen, colon, ivhash = ivgen.partition(":")
    if colon and ivhash not in _HASHES:
        raise GenericError(f"Unsupported hash algorithm {ivhash}")
    if mode not in _MODES:
        raise GenericError(f"Unsupported cipher mode {mode}")
    cipher = _cstr(cname)
    key_len = mklen // 2 if mode == "xts" else mklen
    sizes = _CIPHERS.get(cipher)
    if sizes is None:
        raise GenericError(f"Unsupported cipher algorithm {cipher}")
    if key_len not in sizes:
        raise GenericError(f"Unsupported cipher '{cipher}' with key size {mklen}")
    hash_spec = _cstr(hspec)
    if hash_spec not in _HASHES:
        raise GenericError(f"Unsupported hash algorithm {hash_spec}")
    if ivgen not in _IVGENS:
        raise GenericError(f"Unsupported IV generator {ivgen}")
    if ivgen == "essiv" and not colon:
        raise GenericError("Missing IV generator hash specification")
    return LuksHeader(
        version, cipher, mode, ivgen, hash_spec, payload, mklen, digest, salt, iters,
        _cstr(uuid), slots,
    )  # fmt: skip


def load_key(header: LuksHeader, slot: KeySlot, password: str, material: bytes) -> bytes | None:
    """The master key if ``password`` opens ``slot`` (its ``material`` read), else None."""
    slot_key = hashlib.pbkdf2_hmac(
        header.hash_spec, password.encode(), slot.salt, slot.iterations, header.master_key_len
    )
    try:
        split = luks_crypto.decrypt_sectors(
            header.cipher_name, header.cipher_mode, header.ivgen, slot_key, material
        )
    except luks_crypto.Unsupported as exc:
        raise GenericError(f"qmpgraph cannot unlock this LUKS volume: {exc}") from None
    master = luks_crypto.af_merge(header.hash_spec, header.master_key_len, slot.stripes, split)
    digest = hashlib.pbkdf2_hmac(
        header.hash_spec, master, header.master_key_salt, header.master_key_iterations, _DIGEST_LEN
    )
    return master if digest == header.master_key_digest else None


def _unlock(node: Node, header: LuksHeader, password: str, read: Any) -> bytes | None:
    """The master key if ``password`` opens one active key slot (QEMU's find_key)."""
    for slot in header.slots:
        if slot.active != _SLOT_ENABLED:
            continue
        length = header.master_key_len * slot.stripes
        material = read(node, slot.key_offset_sector * _SECTOR, length)
        key = load_key(header, slot, password, material)
        if key is not None:
            return key
    return None


class Luks(Driver):
    """luks: a LUKS1 encrypted image over ``file``."""

    format_name = "luks"
    is_format = True
    options = frozenset({"key-secret"})
    children = (ChildSpec("file", Role.IMAGE),)

    def open(self, ctx: OpenContext, node: Node, options: dict[str, Any]) -> None:
        """See the module docstring for the order of the checks."""
        self.reject_unknown(options)
        edge = ctx.open_child(node, options, "file", Role.IMAGE)
        assert edge is not None and edge.child is not None
        child = edge.child
        assert child.driver is not None
        password = None
        if not node.open_flags & OpenFlag.NO_IO:
            secret_id = options.get("key-secret")
            if secret_id is None:
                raise GenericError("Parameter 'key-secret' is required for cipher")
            password = lookup_secret_utf8(tree_for(ctx.graph), str(secret_id))
        raw = child.driver.read(child, 0, _HEADER.size + _NUM_SLOTS * _SLOT.size)
        header = parse_header(raw)
        key = None
        if password is not None:
            key = _unlock(child, header, password, lambda n, o, ln: n.driver.read(n, o, ln))
            if key is None:
                raise GenericError("Invalid password, cannot unlock any keyslot")
        payload = header.payload_offset_sector * _SECTOR
        size = max(child.driver.size(child) - payload, 0)
        secret = options.get("key-secret")
        node.state = LuksState(header, size, None if secret is None else str(secret), key=key)

    def adjust_default_perms(
        self, node: Node, perm: int, shared: int, nperm: int, nshared: int
    ) -> tuple[int, int]:
        """WRITE/RESIZE taken and shared only as the parents do; while key
        slots are updated, WRITE is taken and neither CONSISTENT_READ nor
        WRITE shared (block_crypto_child_perms with updating_keys)."""
        both = Perm.WRITE | Perm.RESIZE
        nshared |= shared & both
        nperm = (nperm & ~both) | (perm & both)
        state = node.state
        if isinstance(state, LuksState) and state.updating_keys:
            nperm |= Perm.WRITE
            nshared &= ~(Perm.CONSISTENT_READ | Perm.WRITE)
        return int(nperm), int(nshared)

    def read(self, node: Node, offset: int, length: int) -> bytes:
        """Guest data is ciphertext to qmpgraph: format probes see zeros."""
        del node, offset
        return bytes(length)


DRIVERS = (Luks(),)
