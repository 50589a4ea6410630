"""The ``secret`` user object, and secret lookup for block drivers (luks).

QEMU 7.2 (crypto/secret_common.c, crypto/secret.c): ``data`` or ``file``
(exactly one) is loaded when the object completes; ``format=base64`` decodes
it; ``keyid`` names another secret holding an AES-256-CBC key that decrypts
it with ``iv``.  ``loaded`` is read-only.  ``lookup_secret`` is
``qcrypto_secret_lookup`` with its messages.

The AES-256-CBC decryption uses the pure-Python AES of
``qmpgraph.drivers.luks_crypto``.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING, Any, ClassVar

from qmpgraph.errors import GenericError
from qmpgraph.objects import props
from qmpgraph.objects.qom import QomObject

if TYPE_CHECKING:
    from qmpgraph.objects.qom import ObjectTree

_FORMATS = ("raw", "base64")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def qbase64_decode(data: bytes) -> bytes:
    """``qbase64_decode``: QEMU's character check, then GLib's lenient decoder."""
    if b"\0" in data:
        raise GenericError("Data contains embedded NUL characters")
    if any(c not in _BASE64_CHARS for c in data):
        raise GenericError("Base64 data contains invalid characters")
    # GLib decodes whole quads and ignores '=' and a trailing partial quad's
    # missing padding; strip '=' and re-pad so Python's decoder agrees.
    body = data.replace(b"=", b"")
    body = body[: len(body) - (len(body) % 4 == 1)]
    try:
        return base64.b64decode(body + b"=" * (-len(body) % 4))
    except binascii.Error:
        return b""


def _read_file(path: str) -> bytes:
    """``g_file_get_contents`` with GLib's error messages (the common cases)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise GenericError(
            f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
            f"{os.strerror(e.errno or 0)}"
        ) from None
    try:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:
                raise GenericError(
                    f"Unable to read {path}: Error reading file \u201c{path}\u201d: "
                    f"{os.strerror(e.errno or 0)}"
                ) from None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-256-CBC with QEMU's padding check (its length check is the cipher's)."""
    from qmpgraph.drivers.luks_crypto import AES  # noqa: PLC0415 (objects must not import drivers at load)

    if len(data) % 16:
        raise GenericError(f"Length {len(data)} must be a multiple of block size 16")
    aes = AES(key)
    out = bytearray()
    prev = iv
    for off in range(0, len(data), 16):
        block = data[off : off + 16]
        out += bytes(a ^ b for a, b in zip(aes.decrypt_block(block), prev, strict=True))
        prev = block
    pad = out[-1] if out else 0
    if pad > 16 or pad > len(out):
        raise GenericError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
    return bytes(out[: len(out) - pad])


class Secret(QomObject):
    """One ``secret`` object (its raw data once loaded)."""

    qom_type = "secret"
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = (
        ("iv", "string"),
        ("keyid", "string"),
        ("loaded", "bool"),
        ("format", "QCryptoSecretFormat"),
        ("file", "string"),
        ("data", "string"),
    )

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str | None] = {"iv": None, "keyid": None, "data": None, "file": None}
        self.format = "raw"
        self.rawdata: bytes | None = None

    def snapshot(self) -> Any:
        """String properties, format and the loaded data."""
        return (dict(self.values), self.format, self.rawdata)

    def restore(self, state: Any) -> None:
        """Put back a ``snapshot``."""
        self.values = dict(state[0])
        self.format = state[1]
        self.rawdata = state[2]

    def get(self, name: str) -> Any:
        """String properties read as "" while unset, as QEMU's visitor prints NULL."""
        if name == "loaded":
            return self.rawdata is not None
        if name == "format":
            return self.format
        return self.values[name] or ""

    def set(self, name: str, value: Any) -> None:
        """Setters store without checks; ``loaded`` has none."""
        if name == "loaded":
            super().set(name, value)
        elif name == "format":
            self.format = props.enum(name, value, _FORMATS)
        else:
            self.values[name] = props.string(name, value)

    def _load(self) -> bytes:
        data, path = self.values["data"], self.values["file"]
        if path is not None:
            if data is not None:
                raise GenericError("'file' and 'data' are mutually exclusive")
            return _read_file(path)
        if data is not None:
            return data.encode()
        raise GenericError("Either 'file' or 'data' must be provided")

    def complete(self, tree: ObjectTree) -> None:
        """``qcrypto_secret_complete``: load, then decrypt or decode."""
        raw = self._load()
        keyid = self.values["keyid"]
        if keyid is not None:
            key = lookup_secret(tree, keyid)
            if len(key) != 32:
                raise GenericError("Key should be 32 bytes in length")
            iv_text = self.values["iv"]
            if iv_text is None:
                raise GenericError("IV is required to decrypt secret")
            iv = qbase64_decode(iv_text.encode())
            if len(iv) != 16:
                raise GenericError(f"IV should be 16 bytes in length not {len(iv)}")
            if self.format == "base64":
                raw = qbase64_decode(raw)
            raw = _decrypt(key, iv, raw)
        elif self.format == "base64":
            raw = qbase64_decode(raw)
        self.rawdata = raw


def lookup_secret(tree: ObjectTree, secret_id: str) -> bytes:
    """``qcrypto_secret_lookup``: the raw data of secret ``secret_id``."""
    obj = tree.lookup(secret_id)
    if obj is None:
        raise GenericError(f"No secret with id '{secret_id}'")
    if not isinstance(obj, Secret):
        raise GenericError(f"Object with id '{secret_id}' is not a secret")
    if obj.rawdata is None:
        raise GenericError(f"Secret with id '{secret_id}' has no data")
    return obj.rawdata


def lookup_secret_utf8(tree: ObjectTree, secret_id: str) -> str:
    """``qcrypto_secret_lookup_as_utf8``."""
    data = lookup_secret(tree, secret_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise GenericError(f"Data from secret {secret_id} is not valid UTF-8") from None
