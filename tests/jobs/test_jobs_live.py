"""Jobs against qemu-storage-daemon on the same images: the files they leave.

The same QMP sequence runs on qsd and on qmpgraph (subprocesses, each in
its own directory of identical images); the images are then compared:
blockdev-create's qcow2 images byte for byte (and ``qemu-img check``
accepts them), block-stream's and block-commit's results by content
(``qemu-img compare``, image by image) and by their header's backing file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu


def wait_concluded(d: LiveDaemon, job_id: str) -> dict[str, Any]:
    """Poll query-jobs until ``job_id`` is concluded (or gone: then {})."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in d.ok("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            return {}
        if job["status"] == "concluded":
            return dict(job)
        time.sleep(0.02)
    raise AssertionError(f"{d.kind}: job {job_id} did not conclude")


def both(tmp_path: Path, qsd: str, setup: str) -> list[tuple[LiveDaemon, Path]]:
    """A directory per daemon with ``setup`` run in it, and the daemons."""
    out = []
    for kind in ("qsd", "qmpgraph"):
        work = tmp_path / kind
        work.mkdir()
        if setup:
            subprocess.run(setup, shell=True, cwd=work, check=True, timeout=TIMEOUT)
        out.append((LiveDaemon(kind, qsd, work, []), work))
    return out


CREATE_CASES = [
    {"size": 1048576},
    {"size": 3145728, "version": "v2", "cluster-size": 4096},
    {"size": 1048576, "refcount-bits": 1, "lazy-refcounts": True},
    {"size": 8388608, "extended-l2": True, "cluster-size": 131072, "compression-type": "zstd"},
    {"size": 2097152, "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
]


@pytest.mark.parametrize("options", CREATE_CASES, ids=lambda o: ",".join(map(str, o.values())))
def test_blockdev_create_qcow2_matches_qsd(
    tmp_path: Path, qsd_path: str, options: dict[str, Any]
) -> None:
    daemons = both(tmp_path, qsd_path, "qemu-img create -q -f qcow2 base.qcow2 2M")
    try:
        for d, work in daemons:
            img = str(work / "new.qcow2")
            file_opts = {"driver": "file", "filename": img, "size": 0}
            d.ok("blockdev-create", job_id="f", options=file_opts)
            assert "error" not in wait_concluded(d, "f")
            d.ok("blockdev-add", driver="file", node_name="fn", filename=img)
            qcow2_opts = {"driver": "qcow2", "file": "fn", **options}
            d.ok("blockdev-create", job_id="q", options=qcow2_opts)
            assert "error" not in wait_concluded(d, "q")
    finally:
        for d, _ in daemons:
            d.stop()
    images = [(work / "new.qcow2").read_bytes() for _, work in daemons]
    assert images[0] == images[1]
    qmpgraph_image = daemons[1][1] / "new.qcow2"
    run("qemu-img", "check", "-q", str(qmpgraph_image))


STREAM_SETUP = (
    "qemu-img create -q -f qcow2 base.qcow2 1M"
    " && qemu-io -c 'write -P 1 0 64k' -c 'write -P 4 256k 64k' -c 'write -z 768k 64k' base.qcow2"
    " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2"
    " && qemu-io -c 'write -P 3 128k 64k' -c 'write -P 5 512k 128k' mid.qcow2"
    " && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2"
    " && qemu-io -c 'write -P 2 64k 64k' top.qcow2 >/dev/null"
)


@pytest.mark.parametrize("base", [None, "base"])
def test_block_stream_result_matches_qsd(tmp_path: Path, qsd_path: str, base: str | None) -> None:
    daemons = both(tmp_path, qsd_path, STREAM_SETUP)
    try:
        for d, work in daemons:
            for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
                extra = {"backing": backing} if backing else {}
                d.ok(
                    "blockdev-add", driver="qcow2", node_name=name,
                    file={"driver": "file", "filename": str(work / f"{name}.qcow2")}, **extra,
                )  # fmt: skip
            args = {"base_node": base} if base else {}
            d.ok("block-stream", job_id="s", device="top", **args)
            assert wait_concluded(d, "s") == {}
            assert [e["event"] for e in d.events if e["event"] != "JOB_STATUS_CHANGE"] == [
                "BLOCK_JOB_COMPLETED"
            ]
    finally:
        for d, _ in daemons:
            d.stop()
    tops = [str(work / "top.qcow2") for _, work in daemons]
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", *tops)
    infos = [json.loads(run("qemu-img", "info", "-U", "--output=json", t)) for t in tops]
    for info, (_, work) in zip(infos, daemons, strict=True):
        want = str(work / "base.qcow2") if base else None
        assert info.get("full-backing-filename") == want
    run("qemu-img", "check", "-q", tops[1])


def add_chain(d: LiveDaemon, work: Path) -> None:
    """base <- mid <- top, as qcow2 nodes."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        extra = {"backing": backing} if backing else {}
        d.ok(
            "blockdev-add", driver="qcow2", node_name=name,
            file={"driver": "file", "filename": str(work / f"{name}.qcow2")}, **extra,
        )  # fmt: skip


def compare_images(daemons: list[tuple[LiveDaemon, Path]], names: list[str]) -> None:
    """Each image has the same content and backing file name under both daemons."""
    for name in names:
        pair = [str(work / f"{name}.qcow2") for _, work in daemons]
        run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", *pair)
        infos = [json.loads(run("qemu-img", "info", "-U", "--output=json", p)) for p in pair]
        backing = [i.get("backing-filename", "").replace(str(w), "$W") for i, (_, w) in
                   zip(infos, daemons, strict=True)]  # fmt: skip
        assert backing[0] == backing[1], (name, backing)
        run("qemu-img", "check", "-q", "-U", pair[1])


@pytest.mark.parametrize("active", [False, True])
def test_block_commit_result_matches_qsd(tmp_path: Path, qsd_path: str, active: bool) -> None:
    daemons = both(tmp_path, qsd_path, STREAM_SETUP)
    try:
        for d, work in daemons:
            add_chain(d, work)
            if active:
                d.ok("block-commit", job_id="c", device="top", base_node="base")
                deadline = time.monotonic() + TIMEOUT
                while d.ok("query-jobs")[0]["status"] != "ready":
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                d.ok("job-complete", id="c")
            else:
                d.ok("block-commit", job_id="c", device="top", top_node="mid")
            assert wait_concluded(d, "c") == {}
            kinds = [e["event"] for e in d.events if e["event"] != "JOB_STATUS_CHANGE"]
            assert kinds == (["BLOCK_JOB_READY"] if active else []) + ["BLOCK_JOB_COMPLETED"]
    finally:
        for d, _ in daemons:
            d.stop()
    compare_images(daemons, ["base", "mid", "top"])
