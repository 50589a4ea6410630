"""LUKS1's ciphers and key-slot helpers: AES in XTS/CBC/ECB modes by
512-byte sectors with plain/plain64 IVs (from the ``cryptography``
package, as both the key material and the guest data path need them),
and the anti-forensic merge and split (PBKDF2 comes from ``hashlib``).

Sectors are numbered from ``first_sector`` (the payload's sector 0 is the
first sector after the header, QEMU's numbering for luks images).

Not covered (``Unsupported`` is raised, the caller then cannot verify the
password or refuses I/O): ciphers other than AES, ESSIV IVs, modes other
than XTS/CBC/ECB.
"""

from __future__ import annotations

import hashlib

# ``cryptography`` is imported where it is used, on first use: it costs the
# daemon 8 MiB of resident memory, and most runs never open a LUKS image.


class Unsupported(Exception):
    """A cipher, mode or IV generator this module cannot run."""


class AES:
    """One AES key (128, 192 or 256 bits): single-block encrypt and decrypt."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: PLC0415

        self._cipher = Cipher(algorithms.AES(key), modes.ECB())

    def encrypt_block(self, block: bytes) -> bytes:
        """Encrypt one 16-byte block."""
        enc = self._cipher.encryptor()
        return enc.update(block) + enc.finalize()

    def decrypt_block(self, block: bytes) -> bytes:
        """Decrypt one 16-byte block."""
        dec = self._cipher.decryptor()
        return dec.update(block) + dec.finalize()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


_SECTOR = 512


def _iv(sector: int, ivgen: str) -> bytes:
    if ivgen == "plain64":
        return (sector & (2**64 - 1)).to_bytes(8, "little") + bytes(8)
    if ivgen == "plain":
        return (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
    raise Unsupported(f"IV generator {ivgen}")


def _crypt(
    cipher: str, mode: str, ivgen: str, key: bytes, data: bytes, *, first: int, enc: bool
) -> bytes:
    if cipher != "aes":
        raise Unsupported(f"cipher {cipher}")
    if mode == "xts" and len(key) not in (32, 64):
        return _xts_by_blocks(key, ivgen, data, first, enc=enc)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: PLC0415

    algo = algorithms.AES(key)
    if mode == "ecb":
        ecb = Cipher(algo, modes.ECB())
        ctx = ecb.encryptor() if enc else ecb.decryptor()
        return ctx.update(data) + ctx.finalize()
    if mode not in ("xts", "cbc"):
        raise Unsupported(f"mode {mode}")
    out = bytearray()
    for start in range(0, len(data), _SECTOR):
        iv = _iv(first + start // _SECTOR, ivgen)
        one = Cipher(algo, modes.XTS(iv) if mode == "xts" else modes.CBC(iv))
        ctx = one.encryptor() if enc else one.decryptor()
        out += ctx.update(data[start : start + _SECTOR])
        out += ctx.finalize()
    return bytes(out)


def _xts_by_blocks(key: bytes, ivgen: str, data: bytes, first: int, *, enc: bool) -> bytes:
    """XTS built on AES-ECB, for key sizes ``cryptography``'s XTS lacks (AES-192,
    which QEMU allows): the tweaks of a sector's blocks are doubled in GF(2^128)
    and applied to the whole sector at once around one ECB call."""
    half = len(key) // 2
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: PLC0415

    ecb = Cipher(algorithms.AES(key[:half]), modes.ECB())
    tweak_cipher = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor()
    out = bytearray()
    for start in range(0, len(data), _SECTOR):
        sector = data[start : start + _SECTOR]
        tweak = int.from_bytes(tweak_cipher.update(_iv(first + start // _SECTOR, ivgen)), "little")
        mask = bytearray()
        for _ in range(len(sector) // 16):
            mask += tweak.to_bytes(16, "little")
            tweak <<= 1
            if tweak >> 128:
                tweak = (tweak & (2**128 - 1)) ^ 0x87
        ctx = ecb.encryptor() if enc else ecb.decryptor()
        out += _xor(ctx.update(_xor(sector, bytes(mask))) + ctx.finalize(), bytes(mask))
    return bytes(out)


def decrypt_sectors(
    cipher: str, mode: str, ivgen: str, key: bytes, data: bytes, *, first_sector: int = 0
) -> bytes:
    """Decrypt ``data`` as consecutive 512-byte sectors numbered from ``first_sector``."""
    return _crypt(cipher, mode, ivgen, key, data, first=first_sector, enc=False)


def encrypt_sectors(
    cipher: str, mode: str, ivgen: str, key: bytes, data: bytes, *, first_sector: int = 0
) -> bytes:
    """Encrypt ``data`` as consecutive 512-byte sectors numbered from ``first_sector``."""
    return _crypt(cipher, mode, ivgen, key, data, first=first_sector, enc=True)


def _diffuse(hash_name: str, block: bytes) -> bytes:
    digest_len = hashlib.new(hash_name).digest_size
    diffused = bytearray()
    for j in range(0, len(block), digest_len):
        piece = block[j : j + digest_len]
        h = hashlib.new(hash_name, (j // digest_len).to_bytes(4, "big") + piece).digest()
        diffused += h[: len(piece)]
    return bytes(diffused)


def af_split(hash_name: str, master: bytes, stripes: int, random: bytes) -> bytes:
    """The anti-forensic split of ``master`` into ``stripes`` blocks.

    ``random`` gives the first ``stripes - 1`` blocks; the last one is
    chosen so that ``af_merge`` gives ``master`` back.
    """
    blocklen = len(master)
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_name, _xor(block, random[i * blocklen : (i + 1) * blocklen]))
    return random[: (stripes - 1) * blocklen] + _xor(block, master)


def af_merge(hash_name: str, blocklen: int, stripes: int, split: bytes) -> bytes:
    """The anti-forensic merge: XOR and diffuse every stripe but the last."""
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_name, _xor(block, split[i * blocklen : (i + 1) * blocklen]))
    last = split[(stripes - 1) * blocklen : stripes * blocklen]
    return _xor(block, last)
