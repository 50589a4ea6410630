"""The qcow2 writer against qemu-img: byte-identical images, clean checks, header rewrites.

Expected values come from qemu-img itself (``create``, ``info``, ``check``,
``rebase -u``), never from what qmpgraph writes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

from qmpgraph.drivers.qcow2 import parse_header
from qmpgraph.drivers.qcow2_image import create_image, image_bytes, layout, rewrite_backing
from qmpgraph.errors import GenericError

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing"),
]


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)
    return done.stdout.decode()


def info(path: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(qemu_img("info", "-U", "--output=json", str(path)))
    return out


@pytest.mark.parametrize("size", [0, 1024, 1 << 20, 3 << 30, 10 << 40])
def test_bytes_match_qemu_img_without_backing(tmp_path: pathlib.Path, size: int) -> None:
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(ref), str(size))
    assert image_bytes(size, None, None) == ref.read_bytes()


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "null-co"])
def test_bytes_match_qemu_img_with_backing(tmp_path: pathlib.Path, fmt: str) -> None:
    ref = tmp_path / "ref.qcow2"
    backing = f"{tmp_path}/base.img"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, str(ref), "2M")
    assert image_bytes(2 << 20, backing, fmt) == ref.read_bytes()


def test_created_image_passes_qemu_img_check(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "5M")
    top = tmp_path / "top.qcow2"
    create_image(str(top), 5 << 20, str(base), "qcow2")
    qemu_img("check", str(top))
    got = info(top)
    assert got["virtual-size"] == 5 << 20
    assert got["backing-filename"] == str(base)
    assert got["backing-filename-format"] == "qcow2"
    assert got["cluster-size"] == 65536
    # The allocation matches QEMU's too (everything written, nothing sparse).
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(ref), "5M")
    assert os.stat(top).st_blocks == os.stat(ref).st_blocks
    header = parse_header(top.read_bytes()[:65536], writable=True)
    assert (header.backing_file, header.backing_format) == (str(base), "qcow2")


def test_create_replaces_an_existing_file_and_counts_opens(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"junk" * 100000)
    opens: list[int] = []
    create_image(str(path), 1 << 20, opened=lambda: opens.append(1))
    assert len(opens) == 3  # QEMU's creation opens three nodes (three auto names)
    assert path.stat().st_size == layout(1 << 20).file_length
    qemu_img("check", str(path))


def test_create_errors_are_qemus(tmp_path: pathlib.Path) -> None:
    with pytest.raises(GenericError) as err:
        create_image(f"{tmp_path}/nodir/x.qcow2", 1 << 20)
    assert (
        err.value.desc == f"Could not create '{tmp_path}/nodir/x.qcow2': No such file or directory"
    )
    with pytest.raises(GenericError) as err:
        create_image(str(tmp_path), 1 << 20)
    assert err.value.desc == f"Could not create '{tmp_path}': Is a directory"
    long_name = "x" * 1024
    path = tmp_path / "long.qcow2"
    with pytest.raises(GenericError) as err:
        create_image(str(path), 1 << 20, long_name, "raw")
    assert err.value.desc.startswith(f"Could not assign backing file '{long_name}'")
    qemu_img("check", str(path))  # written, without a backing file, as QEMU leaves it


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_rewrite_backing_matches_qemu_img_rebase(tmp_path: pathlib.Path, compat: str) -> None:
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    new_base = f"{tmp_path}/new-base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", new_base, "1M")
    for path in (ours, ref):
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-u",
                 "-b", "/old/base.raw", "-F", "raw", str(path), "1M")  # fmt: skip
    qemu_img("rebase", "-u", "-b", new_base, "-F", "qcow2", str(ref))
    header = parse_header(ours.read_bytes()[:65536])
    new = rewrite_backing(str(ours), header, new_base, "qcow2")
    assert (new.backing_file, new.backing_format) == (new_base, "qcow2")
    assert ours.read_bytes() == ref.read_bytes()
    qemu_img("check", str(ours))


def test_rewrite_backing_too_long_is_einval(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 1 << 20, "/b", "raw")
    header = parse_header(path.read_bytes()[:65536])
    before = path.read_bytes()
    with pytest.raises(OSError) as err:
        rewrite_backing(str(path), header, "y" * 1024, "raw")
    assert err.value.errno == 22
    assert path.read_bytes() == before
