"""The qcow2 data path judged by QEMU's own tools.

Random sequences of writes, write-zeroes, discards and resizes go through
``Qcow2Image`` on images that ``qemu-img create`` made (v2 and v3, cluster
sizes 512 B to 2 MiB, refcount widths 1 to 64 bits, with and without a
backing file, with external data files) and, in step, into a plain bytes
reference.  Afterwards ``qemu-img check`` must find no errors or leaks and
``qemu-img compare`` must find the image (through its backing chain) equal
to the reference.  Reads are checked against ``qemu-img convert -O raw`` of
images that ``qemu-io`` and ``qemu-img convert -c`` wrote, and snapshot
views against ``qemu-img convert -l``.  Expected data always comes from
QEMU or from the reference, never from what the library read before.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import require_qemu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpgraph.drivers.qcow2_io import (
    FdFile,
    Qcow2Error,
    Qcow2Image,
    Status,
    open_image,
)
from qmpgraph.errors import GenericError

pytestmark = pytest.mark.qemu


@pytest.fixture(autouse=True, scope="module")
def _qemu() -> None:
    require_qemu()


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a QEMU tool; fail the test with its output when it fails."""
    done = subprocess.run(list(args), capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {done.stdout!r} {done.stderr!r}")
    return done


def check_clean(path: pathlib.Path) -> None:
    """qemu-img check: no errors and no leaks."""
    done = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    report = json.loads(done.stdout or b"{}")
    assert done.returncode == 0, (report, done.stderr)
    assert not report.get("corruptions") and not report.get("leaks"), report


def assert_equal_to(path: pathlib.Path, ref: bytes, tmp: pathlib.Path) -> None:
    """qemu-img compare of the image (through its chain) with a raw reference."""
    raw = tmp / "ref.raw"
    raw.write_bytes(ref)
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(path), str(raw))


def convert_raw(path: pathlib.Path, tmp: pathlib.Path, *extra: str) -> bytes:
    out = tmp / "converted.raw"
    run("qemu-img", "convert", "-O", "raw", *extra, str(path), str(out))
    return out.read_bytes()


# -- the random-operation model -----------------------------------------------


@dataclass(frozen=True)
class Config:
    """An image's creation options and chain."""

    cluster_size: int
    v3: bool
    refcount_bits: int
    backing: str | None  # None, "raw" or "qcow2"
    size: int
    snapshot: bool  # data written and an internal snapshot taken first


@st.composite
def configs(draw: Any) -> Config:
    cluster_bits = draw(st.sampled_from([9, 9, 10, 12, 16, 16, 21]))
    v3 = draw(st.booleans())
    refcount_bits = draw(st.sampled_from([1, 2, 8, 16, 16, 64])) if v3 else 16
    backing = draw(st.sampled_from([None, None, "raw", "qcow2"]))
    cs = 1 << cluster_bits
    # Enough clusters for several L2 tables at 512 B, a handful at 2 MiB.
    clusters = draw(st.integers(4, 160 if cs <= 1024 else 40 if cs < 1 << 20 else 5))
    size = clusters * cs - draw(st.sampled_from([0, 0, 512, cs // 2 // 512 * 512]))
    # A snapshot needs refcounts of 2: not with 1-bit refcounts.
    snapshot = refcount_bits > 1 and draw(st.booleans())
    return Config(cs, v3, refcount_bits, backing, max(512, size), snapshot)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "zero", "discard", "truncate"]),
        st.floats(0, 1),
        st.floats(0, 1),
        st.integers(1, 255),
        st.booleans(),
    ),
    min_size=1,
    max_size=14,
)


def scatter_writes(path: pathlib.Path, fmt: str, size: int, cs: int, seed: int) -> None:
    """A few pattern writes with qemu-io, in places that depend on ``seed``."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(4):
        off = rng.randrange(0, size, 512)
        n = min(size - off, rng.randrange(512, 3 * cs + 1024, 512))
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    qemu_io(path, *cmds, fmt=fmt)


def make_image(tmp: pathlib.Path, cfg: Config) -> tuple[pathlib.Path, bytes]:
    """The image, and the guest data its backing file shows (zeros without one)."""
    img = tmp / "top.qcow2"
    opts = [f"cluster_size={cfg.cluster_size}", f"refcount_bits={cfg.refcount_bits}"]
    opts.append("compat=1.1" if cfg.v3 else "compat=0.10")
    base_data = b""
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if cfg.backing:
        base = tmp / f"base.{cfg.backing}"
        # The backing file is a little shorter than the image, so that the
        # tail reads as zeros, and has data in places.
        base_size = max(512, cfg.size // 512 * 512 - 1024)
        run("qemu-img", "create", "-q", "-f", cfg.backing, str(base), str(base_size))
        scatter_writes(base, cfg.backing, base_size, cfg.cluster_size, cfg.size)
        base_data = convert_raw(base, tmp, "-f", cfg.backing)
        args += ["-b", base.name, "-F", cfg.backing]
    run(*args, str(img), str(cfg.size))
    if cfg.snapshot:
        scatter_writes(img, "qcow2", cfg.size // 512 * 512, cfg.cluster_size, cfg.size + 1)
        run("qemu-img", "snapshot", "-c", "snap", str(img))
    return img, base_data


def apply(img: Qcow2Image, ref: bytearray, base: bytes, op: tuple[Any, ...], cfg: Config) -> None:
    """One operation on the image and, as QEMU defines it, on the reference."""
    kind, f_off, f_len, byte, flag = op
    size = img.size
    cs = cfg.cluster_size
    off = min(size - 1, int(f_off * size))
    if flag:
        off = off // 512 * 512
    n = max(1, min(size - off, int(f_len * f_len * (4 * cs + 20000))))
    if kind == "write":
        data = bytes([byte]) * n
        img.write(off, data)
        ref[off : off + n] = data
    elif kind == "zero":
        img.write_zeroes(off, n, may_unmap=byte & 1 == 1)
        ref[off : off + n] = bytes(n)
    elif kind == "discard":
        img.discard(off, n)
        start = -(-off // cs) * cs
        stop = off + n if off + n == size else (off + n) // cs * cs
        if stop > start:
            shown = base[start:stop].ljust(stop - start, b"\0")
            ref[start:stop] = bytes(stop - start) if cfg.v3 or not base else shown
    else:
        new_size = max(512, int(f_off * 2 * cfg.size) // 512 * 512)
        if img.snapshots and not cfg.v3:
            with pytest.raises(GenericError, match="Can't resize a v2 image which has snapshots"):
                img.truncate(new_size)
            return
        img.truncate(new_size)
        if new_size < len(ref):
            del ref[new_size:]
        else:
            ref.extend(bytes(new_size - len(ref)))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=configs(), ops=OPS)
def test_random_operations_keep_image_clean_and_equal(cfg: Config, ops: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = pathlib.Path(name)
        path, base = make_image(tmp, cfg)
        ref = bytearray(convert_raw(path, tmp))
        snap = convert_raw(path, tmp, "-l", "snap") if cfg.snapshot else b""
        with open_image(path) as img:
            for op in ops:
                apply(img, ref, base, op, cfg)
            assert img.read(0, img.size) == ref
            if cfg.snapshot:
                view = img.snapshot("snap")
                assert view.read(0, view.size) == snap[: view.size]
        check_clean(path)
        assert_equal_to(path, bytes(ref), tmp)


# -- reading what QEMU wrote ------------------------------------------------------


def qemu_io(path: pathlib.Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = [arg for cmd in cmds for arg in ("-c", cmd)]
    run("qemu-io", "-f", fmt, *args, str(path))


def read_all(path: pathlib.Path) -> bytes:
    with open_image(path, read_only=True) as img:
        return img.read(0, img.size)


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_reads_match_qemu_img_convert(
    tmp_path: pathlib.Path, cluster_size: int, compat: str
) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    opts = f"cluster_size={cluster_size},compat={compat}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(base), "7M")
    qemu_io(base, "write -P 0x11 0 3M", "write -P 0x12 5M 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", base.name, "-F", "qcow2",
        str(mid), "8M")  # fmt: skip
    qemu_io(mid, "write -P 0x21 1M 64k", "write -z 2M 1M", "write -P 0x22 6M 300k")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", mid.name, "-F", "qcow2",
        str(top), "9M")  # fmt: skip
    qemu_io(top, "write -P 0xab 512 1000", "write -z -u 5M 64k", "discard 0 2M")
    assert read_all(top) == convert_raw(top, tmp_path)
    assert read_all(mid) == convert_raw(mid, tmp_path)


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
def test_compressed_clusters_read_as_qemu_img_convert(
    tmp_path: pathlib.Path, cluster_size: int
) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(cluster_size)
    # Compressible text with random stretches, zeros, and a little noise.
    chunks = [
        bytes(rng.getrandbits(8) for _ in range(3000)),
        b"qmpgraph " * 20000,
        bytes(70000),
        bytes(rng.getrandbits(3) for _ in range(100000)),
    ]
    src.write_bytes(b"".join(chunks * 3))
    dst = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        f"cluster_size={cluster_size}", str(src), str(dst))  # fmt: skip
    expect = convert_raw(dst, tmp_path)
    assert read_all(dst) == expect
    with open_image(dst, read_only=True) as img:
        statuses = img.block_status(0, img.size)
        assert sum(e.length for e in statuses) == img.size


def test_writes_over_compressed_clusters(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes((b"compress me " * 40000)[: 512 << 10])
    dst = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        str(src), str(dst))  # fmt: skip
    ref = bytearray(src.read_bytes())
    with open_image(dst) as img:
        for off, n in [(100, 10), (4096 * 3, 4096), (20000, 50000), (0, 5)]:
            img.write(off, b"\xee" * n)
            ref[off : off + n] = b"\xee" * n
        img.write_zeroes(8192, 4096 * 4, may_unmap=True)
        ref[8192 : 8192 + 4096 * 4] = bytes(4096 * 4)
        img.discard(4096 * 40, 4096 * 3)
        ref[4096 * 40 : 4096 * 43] = bytes(4096 * 3)
    check_clean(dst)
    assert_equal_to(dst, bytes(ref), tmp_path)


def test_zstd_clusters_need_the_zstandard_module(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"zstd " * 100000)
    dst = tmp_path / "z.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        "compression_type=zstd", str(src), str(dst))  # fmt: skip
    try:
        import zstandard  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with open_image(dst, read_only=True) as img, pytest.raises(Qcow2Error, match="zstandard"):
            img.read(0, 4096)
    else:
        assert read_all(dst) == convert_raw(dst, tmp_path)


def test_block_status_matches_qemu_img_map(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 1 0 1M", "write -z 2M 256k")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top), "5M")
    qemu_io(top, "write -P 2 512k 128k", "write -z -u 3M 64k", "write -P 3 4M 64k")
    done = run("qemu-img", "map", "--output=json", str(top))
    expected = []
    for ext in json.loads(done.stdout):
        flags = (Status.DATA if ext["data"] else 0) | (Status.ZERO if ext["zero"] else 0)
        depth = ext["depth"] + 1 if ext["present"] else 0
        expected.append((ext["start"], ext["length"], flags, depth))
    with open_image(top, read_only=True) as img:
        got = [(e.offset, e.length, e.flags & ~Status.ALLOCATED, e.depth) for e in
               img.block_status(0, img.size)]  # fmt: skip
        assert got == expected
        assert all(bool(e.flags & Status.ALLOCATED) == (e.depth == 1) for e in
                   img.block_status(0, img.size))  # fmt: skip


# -- external data files ----------------------------------------------------------


@pytest.mark.parametrize("raw_flag", ["on", "off"])
def test_external_data_file(tmp_path: pathlib.Path, raw_flag: str) -> None:
    img_path = tmp_path / "d.qcow2"
    opts = f"data_file={tmp_path}/d.data,data_file_raw={raw_flag},cluster_size=4096"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img_path), "1M")
    qemu_io(img_path, "write -P 0x5a 8k 20k")
    ref = bytearray(1 << 20)
    ref[8192 : 8192 + 20480] = b"\x5a" * 20480
    with open_image(img_path) as img:
        assert img.read(0, img.size) == ref
        ops = [(100, 5000, 1), (300000, 70000, 2), (12000, 3, 3)]
        for off, n, byte in ops:
            img.write(off, bytes([byte]) * n)
            ref[off : off + n] = bytes([byte]) * n
        img.write_zeroes(0, 8192, may_unmap=True)
        ref[0:8192] = bytes(8192)
        img.flush()
    check_clean(img_path)
    assert_equal_to(img_path, bytes(ref), tmp_path)
    if raw_flag == "on":
        assert (tmp_path / "d.data").read_bytes()[: len(ref)] == ref


# -- internal snapshots -----------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_snapshot_view_survives_active_writes(tmp_path: pathlib.Path, cluster_size: int) -> None:
    path = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
        str(path), "2M")  # fmt: skip
    qemu_io(path, "write -P 0x31 0 300k", "write -P 0x32 1M 100k", "write -z 1536k 64k")
    run("qemu-img", "snapshot", "-c", "first", str(path))
    qemu_io(path, "write -P 0x41 100k 64k")
    run("qemu-img", "resize", "-q", str(path), "3M")
    run("qemu-img", "snapshot", "-c", "second", str(path))
    first = convert_raw(path, tmp_path, "-l", "first")
    second = convert_raw(path, tmp_path, "-l", "second")
    rng = random.Random(cluster_size)
    with open_image(path) as img:
        ref = bytearray(img.read(0, img.size))
        assert bytes(ref) == second
        for _ in range(30):
            off = rng.randrange(0, img.size - 1)
            n = min(img.size - off, rng.randrange(1, 200000))
            choice = rng.randrange(3)
            if choice == 0:
                img.write(off, b"\x77" * n)
                ref[off : off + n] = b"\x77" * n
            elif choice == 1:
                img.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
                ref[off : off + n] = bytes(n)
            else:
                cs = cluster_size
                start, stop = -(-off // cs) * cs, (off + n) // cs * cs
                if off + n == img.size:
                    stop = off + n
                img.discard(off, n)
                ref[start : max(start, stop)] = bytes(max(0, stop - start))
        view = img.snapshot("first")
        # qemu-img convert -l reads a snapshot at the image's current size
        # (bdrv_snapshot_load_tmp keeps it); the view has the snapshot's own.
        assert view.size == 2 << 20
        assert view.read(0, view.size) == first[: view.size]
        assert not any(first[view.size :])
        assert img.snapshot("2").read(0, 3 << 20) == second
        with pytest.raises(Qcow2Error, match="Can't find snapshot"):
            img.snapshot("third")
    check_clean(path)
    assert_equal_to(path, bytes(ref), tmp_path)
    assert convert_raw(path, tmp_path, "-l", "first") == first


# -- refusals and limits ----------------------------------------------------------


def test_refusals(tmp_path: pathlib.Path) -> None:
    ext = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(ext), "1M")
    with pytest.raises(Qcow2Error, match="extended L2"):
        open_image(ext)
    path = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M")
    with open_image(path, read_only=True) as img:
        with pytest.raises(Qcow2Error, match="read-only"):
            img.write(0, b"x")
        with pytest.raises(ValueError, match="outside the image"):
            img.read(1 << 20, 1)
    with open_image(path) as img:
        with pytest.raises(GenericError, match="The new size must be a multiple of 512"):
            img.truncate(1000)
        with pytest.raises(ValueError, match="outside the image"):
            img.write((1 << 20) - 1, b"ab")
    # A dirty image (lazy refcounts) opens read-only, not read-write.
    with path.open("r+b") as f:
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
    with pytest.raises(Qcow2Error, match="dirty"):
        open_image(path)
    open_image(path, read_only=True).close()


def test_v2_snapshot_resize_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(path), "1M")
    run("qemu-img", "snapshot", "-c", "s", str(path))
    with open_image(path) as img, pytest.raises(GenericError, match="Can't resize a v2 image"):
        img.truncate(2 << 20)


def test_large_sequential_copy_stays_clean(tmp_path: pathlib.Path) -> None:
    """A 64 MiB sequential fill in 256 KiB requests, as nbdcopy would send them."""
    path = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M")
    chunk = bytes(range(256)) * 1024
    with open_image(path) as img:
        for off in range(0, 64 << 20, len(chunk)):
            img.write(off, chunk)
        img.flush()
        assert img.read(5 << 20, len(chunk)) == chunk
    check_clean(path)
    assert_equal_to(path, chunk * 256, tmp_path)


@pytest.mark.parametrize("refcount_bits", [32, 64])
def test_refcount_table_grows(tmp_path: pathlib.Path, refcount_bits: int) -> None:
    """Small clusters and wide refcounts: the refcount table must move, twice."""
    path = tmp_path / "g.qcow2"
    opts = f"cluster_size=512,refcount_bits={refcount_bits}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "24M")
    ref = bytearray(24 << 20)
    rng = random.Random(refcount_bits)
    with open_image(path) as img:
        table_clusters = img.refcounts.table_clusters
        for _ in range(60):
            off = rng.randrange(0, img.size - 300000)
            n = rng.randrange(1, 300000)
            data = bytes([rng.randrange(1, 256)]) * n
            img.write(off, data)
            ref[off : off + n] = data
        assert img.refcounts.table_clusters > table_clusters
        assert img.read(0, img.size) == ref
    check_clean(path)
    assert_equal_to(path, bytes(ref), tmp_path)


def test_fd_file_is_a_host_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "h.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M")
    fd = os.open(path, os.O_RDWR)
    try:
        img = Qcow2Image(FdFile(fd), barriers=True)
        img.write(4096, b"hello", fua=True)
        assert img.read(4090, 16) == bytes(6) + b"hello" + bytes(5)
        img.write(65536 * 3 - 2, b"spans")
        img.discard(0, 65536)
        img.write_zeroes(65536 * 2, 65536, may_unmap=True)
        assert img.read(65536 * 2, 65536 + 3) == bytes(65536) + b"ans"
    finally:
        os.close(fd)
    check_clean(path)
