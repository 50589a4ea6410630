"""Driver checks outside the shared conformance suite (``test_conformance.py``)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from qmpgraph.drivers import REGISTRY, get_driver
from qmpgraph.drivers.qcow2 import parse_header
from qmpgraph.errors import GenericError

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=30)


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        REGISTRY["x"] = REGISTRY["raw"]  # type: ignore[index]
    with pytest.raises(GenericError, match=r"^Unknown driver: 'nosuch'$"):
        get_driver("nosuch")


def test_qcow2_header_rejects_other_data() -> None:
    with pytest.raises(GenericError, match=r"^Image is not in qcow2 format$"):
        parse_header(b"notqcow\n")
    with pytest.raises(GenericError, match=r"^Image is not in qcow2 format$"):
        parse_header(bytes(4096))


@needs_qemu_img
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qcow2_header_fields(tmp_path: pathlib.Path, compat: str) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4096",
        "-u", "-b", "/some/base.raw", "-F", "raw", str(img), "3M",
    )  # fmt: skip
    h = parse_header(img.read_bytes()[:4096])
    assert (h.version, h.size, h.cluster_size) == (2 if compat == "0.10" else 3, 3 << 20, 4096)
    assert (h.backing_file, h.backing_format, h.data_file) == ("/some/base.raw", "raw", None)


@needs_qemu_img
def test_qcow2_external_data_file_header(tmp_path: pathlib.Path) -> None:
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", str(img), "1M")
    h = parse_header(img.read_bytes()[:4096])
    assert h.has_data_file and h.data_file == str(tmp_path / "d.raw")
