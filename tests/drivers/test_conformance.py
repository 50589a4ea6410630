"""Every registered driver runs the shared conformance suite (``conformance.py``).

One subclass per tree: the options that open, the top node's children with
their roles (QEMU-BLOCK-GRAPH.md section 1.8), and options QEMU refuses at
open time.  ``test_every_driver_has_a_conformance_class`` fails when a
driver is registered without one.
"""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any

from conformance import DriverConformance
from test_drivers import needs_qemu_img, qemu_img

from qmpgraph.drivers import REGISTRY
from qmpgraph.graph.perms import Role

FILTERED = Role.FILTERED | Role.PRIMARY
NULL = {"driver": "null-co", "size": 1 << 20}
SECRET = {"qom-type": "secret", "id": "s0", "data": "123456"}


def _file(path: pathlib.Path) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path)}


def _qcow2(tmp_path: pathlib.Path, *args: str) -> pathlib.Path:
    """``top.qcow2`` over ``base.qcow2`` (1 MiB), created once per test."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    if not top.exists():
        qemu_img("create", "-f", "qcow2", str(base), "1M")
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", *args, str(top))
    return top


def _luks(tmp_path: pathlib.Path) -> pathlib.Path:
    """A LUKS image with password ``123456`` and the minimum PBKDF iterations."""
    img = tmp_path / "img.luks"
    # qemu-img's PBKDF calibration fails now and then on a loaded machine: retry.
    for _ in range(8):
        if img.exists():
            break
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "luks", "--object",
             "secret,id=sec0,data=123456", "-o", "key-secret=sec0,iter-time=0", str(img), "1M"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    return img


class TestNullCo(DriverConformance):
    driver_name = "null-co"
    rejected = ({"latency-ns": 1 << 63},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "null-co", "node-name": "top", "size": 4096}


class TestNullAio(DriverConformance):
    driver_name = "null-aio"
    rejected = ({"latency-ns": 1 << 63},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "null-aio", "node-name": "top"}


class TestFile(DriverConformance):
    driver_name = "file"
    rejected = ({"filename": "/nonexistent/qmpgraph.img"}, {"filename": "/"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        path = tmp_path / "disk.img"
        path.write_bytes(bytes(4096))
        return {"node-name": "top", **_file(path)}


class TestRawFilterMode(DriverConformance):
    driver_name = "raw"
    children = (("file", FILTERED),)
    rejected = ({"offset": 4096}, {"size": 1000}, {"file": "nosuch"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "raw", "node-name": "top", "file": {**NULL, "size": 2048}}


class TestRawWindow(TestRawFilterMode):
    children = (("file", Role.DATA | Role.PRIMARY),)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {**super().options(tmp_path), "offset": 512, "size": 1024}


@needs_qemu_img
class TestQcow2(DriverConformance):
    driver_name = "qcow2"
    children = (("file", Role.IMAGE), ("backing", Role.COW))
    rejected = ({"file": {**NULL, "size": 4096}}, {"backing": "nosuch"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": "top", "file": _file(_qcow2(tmp_path))}


@needs_qemu_img
class TestQcow2DataFile(DriverConformance):
    driver_name = "qcow2"
    children = (
        ("file", Role.METADATA | Role.PRIMARY),
        ("data-file", Role.DATA),
        ("backing", Role.COW),
    )
    rejected = ({"data-file": "nosuch"},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        top = _qcow2(tmp_path, "-o", f"data_file={tmp_path / 'data.raw'}")
        return {"driver": "qcow2", "node-name": "top", "file": _file(top)}


@needs_qemu_img
class TestLuks(DriverConformance):
    driver_name = "luks"
    children = (("file", Role.IMAGE),)
    objects = (SECRET, {"qom-type": "secret", "id": "bad", "data": "654321"})
    rejected = ({"key-secret": "bad"}, {"key-secret": "nosuch"}, {"file": NULL})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        file = _file(_luks(tmp_path))
        return {"driver": "luks", "node-name": "top", "file": file, "key-secret": "s0"}


class TestThrottle(DriverConformance):
    driver_name = "throttle"
    children = (("file", FILTERED),)
    objects = ({"qom-type": "throttle-group", "id": "tg"}, SECRET)
    rejected = ({"throttle-group": "nosuch"}, {"throttle-group": "s0"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "throttle", "node-name": "top", "throttle-group": "tg", "file": NULL}


class TestCopyOnRead(DriverConformance):
    driver_name = "copy-on-read"
    children = (("file", FILTERED),)
    rejected = ({"bottom": "nosuch"},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "copy-on-read", "node-name": "top", "file": NULL}


@needs_qemu_img
class TestCompress(DriverConformance):
    driver_name = "compress"
    children = (("file", FILTERED),)
    rejected = ({"file": NULL},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        qcow2 = {"driver": "qcow2", "file": _file(_qcow2(tmp_path))}
        return {"driver": "compress", "node-name": "top", "file": qcow2}


class TestPreallocate(DriverConformance):
    driver_name = "preallocate"
    children = (("file", FILTERED),)
    rejected = ({"prealloc-align": 1000},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        path = tmp_path / "disk.img"
        path.write_bytes(bytes(4096))
        return {"driver": "preallocate", "node-name": "top", "file": _file(path)}


class TestCopyBeforeWrite(DriverConformance):
    driver_name = "copy-before-write"
    children = (("file", FILTERED), ("target", Role.DATA))
    rejected = ({"bitmap": {"node": "nosuch", "name": "b0"}}, {"target": "nosuch"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "copy-before-write", "node-name": "top", "file": NULL, "target": NULL}


class TestSnapshotAccess(DriverConformance):
    driver_name = "snapshot-access"
    children = (("file", Role.DATA | Role.PRIMARY),)
    rejected = ({"file": "nosuch"},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        cbw = {"driver": "copy-before-write", "file": NULL, "target": NULL}
        return {"driver": "snapshot-access", "node-name": "top", "file": cbw}


class TestQuorum(DriverConformance):
    driver_name = "quorum"
    children = (("children.0", Role.DATA), ("children.1", Role.DATA))
    rejected = ({"vote-threshold": 3}, {"vote-threshold": 0})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "quorum", "node-name": "top", "vote-threshold": 2,
                "children": [NULL, NULL]}  # fmt: skip


class TestBlkdebug(DriverConformance):
    driver_name = "blkdebug"
    children = (("image", FILTERED),)
    rejected = ({"align": 3}, {"max-transfer": 100, "align": 512}, {"config": "/nonexistent"})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "blkdebug", "node-name": "top", "image": NULL}


class TestBlkverify(DriverConformance):
    driver_name = "blkverify"
    children = (("raw", FILTERED), ("test", Role.DATA))
    rejected = ({"test": "nosuch"},)

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "blkverify", "node-name": "top", "raw": NULL, "test": NULL}


class TestBlklogwrites(DriverConformance):
    driver_name = "blklogwrites"
    children = (("file", FILTERED), ("log", Role.METADATA))
    rejected = ({"log-sector-size": 100}, {"log-append": True, "log-sector-size": 512})

    def options(self, tmp_path: pathlib.Path) -> dict[str, Any]:
        return {"driver": "blklogwrites", "node-name": "top", "file": NULL, "log": NULL}


def test_every_driver_has_a_conformance_class() -> None:
    covered = {
        cls.driver_name
        for cls in globals().values()
        if isinstance(cls, type)
        and issubclass(cls, DriverConformance)
        and cls.__name__ != "DriverConformance"
    }
    assert covered == set(REGISTRY)
