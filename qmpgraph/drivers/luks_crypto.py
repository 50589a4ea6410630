"""What unlocking and storing a LUKS1 key slot needs, in pure Python: AES,
XTS/CBC/ECB encryption and decryption by 512-byte sectors with
plain/plain64 IVs, and the anti-forensic merge and split.

Only the key material (a few hundred KiB) is ever decrypted, once per
open, so a table-driven AES is fast enough; PBKDF2 comes from ``hashlib``.
The guest data path is not here (qmpgraph has none).

Not covered (``Unsupported`` is raised, the caller then cannot verify the
password): ciphers other than AES, ESSIV IVs, modes other than XTS/CBC/ECB.
"""

from __future__ import annotations

import hashlib


class Unsupported(Exception):
    """A cipher, mode or IV generator this module cannot run."""


def _xtime(a: int) -> int:
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


def _build_sbox() -> tuple[list[int], list[int]]:
    inv = [0] * 256
    for x in range(1, 256):
        for y in range(1, 256):
            if _mul(x, y) == 1:
                inv[x] = y
                break
    sbox = [0] * 256
    for x in range(256):
        b = inv[x]
        s = b
        for shift in range(1, 5):
            s ^= ((b << shift) | (b >> (8 - shift))) & 0xFF
        sbox[x] = s ^ 0x63
    inv_sbox = [0] * 256
    for x, s in enumerate(sbox):
        inv_sbox[s] = x
    return sbox, inv_sbox


_SBOX, _INV_SBOX = _build_sbox()
_M9 = [_mul(x, 9) for x in range(256)]
_M11 = [_mul(x, 11) for x in range(256)]
_M13 = [_mul(x, 13) for x in range(256)]
_M14 = [_mul(x, 14) for x in range(256)]
_M2 = [_mul(x, 2) for x in range(256)]
_M3 = [_mul(x, 3) for x in range(256)]


class AES:
    """One AES key schedule (128, 192 or 256 bits): block encrypt and decrypt."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise Unsupported(f"AES key of {len(key)} bytes")
        nk = len(key) // 4
        self.rounds = nk + 6
        words = [list(key[4 * i : 4 * i + 4]) for i in range(nk)]
        rcon = 1
        for i in range(nk, 4 * (self.rounds + 1)):
            t = list(words[i - 1])
            if i % nk == 0:
                t = [_SBOX[t[1]] ^ rcon, _SBOX[t[2]], _SBOX[t[3]], _SBOX[t[0]]]
                rcon = _xtime(rcon)
            elif nk > 6 and i % nk == 4:
                t = [_SBOX[b] for b in t]
            words.append([a ^ b for a, b in zip(words[i - nk], t, strict=True)])
        self.round_keys = [
            [b for w in words[4 * r : 4 * r + 4] for b in w] for r in range(self.rounds + 1)
        ]

    def encrypt_block(self, block: bytes) -> bytes:
        """One 16-byte block, encrypted."""
        s = [a ^ b for a, b in zip(block, self.round_keys[0], strict=True)]
        for r in range(1, self.rounds + 1):
            s = [_SBOX[s[(i + 4 * (i % 4)) % 16]] for i in range(16)]
            if r != self.rounds:
                mixed = []
                for c in range(4):
                    a0, a1, a2, a3 = s[4 * c : 4 * c + 4]
                    mixed += [
                        _M2[a0] ^ _M3[a1] ^ a2 ^ a3,
                        a0 ^ _M2[a1] ^ _M3[a2] ^ a3,
                        a0 ^ a1 ^ _M2[a2] ^ _M3[a3],
                        _M3[a0] ^ a1 ^ a2 ^ _M2[a3],
                    ]
                s = mixed
            s = [a ^ b for a, b in zip(s, self.round_keys[r], strict=True)]
        return bytes(s)

    def decrypt_block(self, block: bytes) -> bytes:
        """One 16-byte block, decrypted."""
        s = [a ^ b for a, b in zip(block, self.round_keys[self.rounds], strict=True)]
        for r in range(self.rounds - 1, -1, -1):
            s = [_INV_SBOX[s[(i - 4 * (i % 4)) % 16]] for i in range(16)]
            s = [a ^ b for a, b in zip(s, self.round_keys[r], strict=True)]
            if r:
                mixed = []
                for c in range(4):
                    a0, a1, a2, a3 = s[4 * c : 4 * c + 4]
                    mixed += [
                        _M14[a0] ^ _M11[a1] ^ _M13[a2] ^ _M9[a3],
                        _M9[a0] ^ _M14[a1] ^ _M11[a2] ^ _M13[a3],
                        _M13[a0] ^ _M9[a1] ^ _M14[a2] ^ _M11[a3],
                        _M11[a0] ^ _M13[a1] ^ _M9[a2] ^ _M14[a3],
                    ]
                s = mixed
        return bytes(s)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


_SECTOR = 512


def _iv(sector: int, ivgen: str) -> bytes:
    if ivgen == "plain64":
        return (sector & (2**64 - 1)).to_bytes(8, "little") + bytes(8)
    if ivgen == "plain":
        return (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
    raise Unsupported(f"IV generator {ivgen}")


def _xts(key: bytes, ivgen: str, data: bytes, *, decrypt: bool) -> bytes:
    """XTS over consecutive 512-byte sectors (the tweak is the sector's IV)."""
    half = len(key) // 2
    data_key, tweak_key = AES(key[:half]), AES(key[half:])
    block = data_key.decrypt_block if decrypt else data_key.encrypt_block
    out = bytearray()
    for start in range(0, len(data), _SECTOR):
        tweak = int.from_bytes(tweak_key.encrypt_block(_iv(start // _SECTOR, ivgen)), "little")
        for off in range(start, min(start + _SECTOR, len(data)), 16):
            t = tweak.to_bytes(16, "little")
            out += _xor(block(_xor(data[off : off + 16], t)), t)
            tweak <<= 1
            if tweak >> 128:
                tweak = (tweak & (2**128 - 1)) ^ 0x87
    return bytes(out)


def decrypt_sectors(cipher: str, mode: str, ivgen: str, key: bytes, data: bytes) -> bytes:
    """Decrypt ``data`` as consecutive 512-byte sectors numbered from 0."""
    if cipher != "aes":
        raise Unsupported(f"cipher {cipher}")
    out = bytearray()
    if mode == "xts":
        return _xts(key, ivgen, data, decrypt=True)
    aes = AES(key)
    if mode == "ecb":
        for off in range(0, len(data), 16):
            out += aes.decrypt_block(data[off : off + 16])
        return bytes(out)
    if mode == "cbc":
        for start in range(0, len(data), _SECTOR):
            prev = _iv(start // _SECTOR, ivgen)
            for off in range(start, min(start + _SECTOR, len(data)), 16):
                block = data[off : off + 16]
                out += _xor(aes.decrypt_block(block), prev)
                prev = block
        return bytes(out)
    raise Unsupported(f"mode {mode}")


def encrypt_sectors(cipher: str, mode: str, ivgen: str, key: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` as consecutive 512-byte sectors numbered from 0."""
    if cipher != "aes":
        raise Unsupported(f"cipher {cipher}")
    out = bytearray()
    if mode == "xts":
        return _xts(key, ivgen, data, decrypt=False)
    aes = AES(key)
    if mode == "ecb":
        for off in range(0, len(data), 16):
            out += aes.encrypt_block(data[off : off + 16])
        return bytes(out)
    if mode == "cbc":
        for start in range(0, len(data), _SECTOR):
            prev = _iv(start // _SECTOR, ivgen)
            for off in range(start, min(start + _SECTOR, len(data)), 16):
                prev = aes.encrypt_block(_xor(data[off : off + 16], prev))
                out += prev
        return bytes(out)
    raise Unsupported(f"mode {mode}")


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
