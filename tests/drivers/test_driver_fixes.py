"""Unit checks of driver behaviour matched to qemu-storage-daemon 7.2.

The expected messages come from the differential scripts
``tests/differential/scripts/driver-*.qmp`` (recorded against QEMU); these
tests pin the pieces without a daemon.
"""

from __future__ import annotations

import pathlib
import shutil
import struct
import subprocess

import pytest

from qmpgraph.drivers.open import _protocol_options, protocol_prefix
from qmpgraph.drivers.qcow2 import parse_header, read_snapshots
from qmpgraph.errors import GenericError

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def _image(tmp_path: pathlib.Path, *opts: str) -> bytes:
    img = tmp_path / "a.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(img), "1M"],
        check=True,
        timeout=30,
    )
    return img.read_bytes()


def _patch(raw: bytes, offset: int, data: bytes) -> bytes:
    return raw[:offset] + data + raw[offset + len(data) :]


@needs_qemu_img
@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (4, struct.pack(">I", 4), "Unsupported qcow2 version 4"),
        (20, struct.pack(">I", 8), "Unsupported cluster size: 2^8"),
        (100, struct.pack(">I", 50), "qcow2 header too short"),
        (72, struct.pack(">Q", 1 << 5),
         "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
        (104, b"\x02", "qcow2: unknown compression type: 2"),
        (96, struct.pack(">I", 7), "Reference count entry width too large; may not exceed 64 bits"),
        (56, struct.pack(">I", 0), "Image does not contain a reference count table"),
        (36, struct.pack(">I", 0), "L1 table is too small"),
    ],
)  # fmt: skip
def test_qcow2_header_refusals(
    tmp_path: pathlib.Path, offset: int, data: bytes, message: str
) -> None:
    raw = _patch(_image(tmp_path), offset, data)
    with pytest.raises(GenericError) as err:
        parse_header(raw)
    assert err.value.desc == message


@needs_qemu_img
def test_qcow2_corrupt_only_refused_writable(tmp_path: pathlib.Path) -> None:
    raw = _patch(_image(tmp_path), 72, struct.pack(">Q", 2))
    assert parse_header(raw).incompatible_features == 2
    with pytest.raises(GenericError, match="Image is corrupt; cannot be opened read/write"):
        parse_header(raw, writable=True)


@needs_qemu_img
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache-size": 1 << 20, "l2-cache-size": 1, "refcount-cache-size": 1},
         "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
        ({"cache-size": 65536, "l2-cache-size": 131072}, "l2-cache-size may not exceed cache-size"),
        ({"l2-cache-entry-size": 1000},
         "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
        ({"cache-clean-interval": -1}, "Cache clean interval too big"),
        ({"cache-size": -1}, "Parameter 'cache-size' expects a non-negative number below 2^64"),
        ({"encrypt": {"format": "aes"}},
         "No encryption in image header, but options specified format 'aes'"),
    ],
)  # fmt: skip
def test_qcow2_option_refusals(
    tmp_path: pathlib.Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(GenericError) as err:
        parse_header(_image(tmp_path), options=dict(options))
    assert err.value.desc == message


@needs_qemu_img
def test_qcow2_snapshot_table(tmp_path: pathlib.Path) -> None:
    _image(tmp_path)
    img = tmp_path / "a.qcow2"
    for name in ("one", "two"):
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(img)], check=True, timeout=30)
    raw = img.read_bytes()
    header = parse_header(raw)
    snaps = read_snapshots(
        lambda off, n: raw[off : off + n], header.snapshots_offset, header.nb_snapshots
    )
    assert [(s.id, s.name, s.icount) for s in snaps] == [("1", "one", 0), ("2", "two", 0)]


@pytest.mark.parametrize(
    ("filename", "prefix"),
    [("a/b:c", None), ("file:x", "file"), ("null-co://", "null-co"), ("/abs", None), ("x", None)],
)
def testprotocol_prefix(filename: str, prefix: str | None) -> None:
    assert protocol_prefix(filename) == prefix


def test_protocol_options() -> None:
    assert _protocol_options("file:rel.img") == {"driver": "file", "filename": "rel.img"}
    assert _protocol_options("null-aio://") == {"driver": "null-aio"}
    with pytest.raises(GenericError, match=r"^Unknown protocol 'foo'$"):
        _protocol_options("foo:bar")
    with pytest.raises(GenericError, match="only allowed filename for this driver is 'null-co://'"):
        _protocol_options("null-co://x")
