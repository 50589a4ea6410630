"""``--blockdev``, compared live with qemu-storage-daemon.

Errors: each case runs the real ``qemu-storage-daemon`` and ``qmpgraph
daemon`` with the same arguments in a directory holding a raw image
(``$D/a.img``), a qcow2 image (``$D/b.qcow2``) and an empty file; exit
status and stderr must match once the program name and the directory are
normalized. Many cases end with ``--monitor x`` (a chardev that does not
exist): the run then stops right after the ``--blockdev`` options succeeded,
and any warning they printed is compared too.

Successes: the differential harness starts both daemons with the
``--blockdev`` options and compares what QMP then reports
(``query-named-block-nodes``, ``blockdev-del`` of a command-line node).
The expected values are always QEMU's, never qmpgraph's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_qemu

from cli.helpers import run_in_dir

# The harness is imported as the differential tests import it (top-level
# ``harness``), so that it has one module name for pytest and mypy alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "differential"))
from harness import parse_script, run_differential

IMG = "file.driver=file,file.filename=$D/a.img"
QCOW = "file.driver=file,file.filename=$D/b.qcow2"
NOMON = ["--monitor", "x"]


def bd(*options: str) -> list[str]:
    """``--blockdev`` once per option."""
    return [word for option in options for word in ("--blockdev", option)]


CASES = [
    # the keyval visitor: types, names, order of checks
    ["--blockdev", "driver=null-co,size=abc"],
    ["--blockdev", "null-co,size=abc"],
    ["--blockdev", "size=1"],
    ["--blockdev", ""],
    ["--blockdev", "bogus"],
    ["--blockdev", "NULL-CO,node-name=n"],
    ["--blockdev", "null-co,read-only=maybe"],
    ["--blockdev", "null-co,node-name=n,read-only=ON"],
    ["--blockdev", "null-co,node-name=n,read-only="],
    ["--blockdev", "null-co,node-name=n,read-only=1"],
    ["--blockdev", "null-co,node-name=n,size=1k"],
    ["--blockdev", "null-co,node-name=n,size="],
    ["--blockdev", "null-co,node-name=n,size=5 "],
    ["--blockdev", "null-co,node-name=n,size=0x"],
    ["--blockdev", "null-co,node-name=n,size=08"],
    ["--blockdev", "null-co,node-name=n,size=9223372036854775808"],
    ["--blockdev", "null-co,node-name=n,latency-ns=1k"],
    ["--blockdev", "null-co,node-name=n,latency-ns=18446744073709551616"],
    ["--blockdev", "null-co,node-name=n,latency-ns=-18446744073709551616"],
    ["--blockdev", "null-co,discard=bogus"],
    ["--blockdev", "null-co,bogus=1"],
    ["--blockdev", "null-co,bogus=1,other=2,node-name=n"],
    ["--blockdev", "null-co,node-name=x,cache.direct=maybe"],
    ["--blockdev", "null-co,node-name=x,cache=1"],
    ["--blockdev", "null-co,node-name=x,cache.bogus=1"],
    ["--blockdev", "null-co,node-name.a=1"],
    ["--blockdev", "null-co,size.0=1"],
    ["--blockdev", "null-co,node-name=n2,file=x"],
    ["--blockdev", "raw,node-name=r"],
    ["--blockdev", "raw,node-name=r,file.bogus=1"],
    ["--blockdev", "raw,node-name=r,file.driver=null-co,file.size=abc"],
    ["--blockdev", "raw,node-name=r,file.driver=null-co,file.bogus=1"],
    ["--blockdev", "raw,node-name=n,file.0=x"],
    ["--blockdev", "raw,node-name=r," + IMG + ",offset=abc"],
    ["--blockdev", "quorum,node-name=n,children.0=a,children.x=b"],
    ["--blockdev", "quorum,node-name=n,children=a"],
    ["--blockdev", "quorum,node-name=n,children.1=a"],
    ["--blockdev", "quorum,node-name=n,children.0.driver=bogus"],
    ["--blockdev", "quorum,node-name=n,children.0.driver=null-co,children.0.size=x"],
    ["--blockdev", "quorum,node-name=n,children.0.driver=null-co,children.0.x=1"],
    ["--blockdev", "quorum,node-name=n,children.0.size=1"],
    ["--blockdev", "quorum,node-name=n,children.0=a,vote-threshold=x"],
    ["--blockdev", "blkdebug,node-name=n,image=x,max-transfer=2147483648"],
    ["--blockdev", "blkdebug,node-name=n,image=x,max-transfer=-2147483649"],
    ["--blockdev", "nbd,node-name=n,server.type=unix,server.path=x,reconnect-delay=4294967296"],
    ["--blockdev", "nbd,node-name=n,server.type=unix,server.path=x,reconnect-delay=-1"],
    ["--blockdev", "qcow2,node-name=n,file=x,overlap-check=bogus"],
    ["--blockdev", "qcow2,node-name=n,file=x,overlap-check.template=bogus"],
    ["--blockdev", "qcow2,node-name=n,file=x,overlap-check.0=x"],
    ["--blockdev", "qcow2,node-name=n,file=x,cache-size=x"],
    ["--blockdev", "nbd,node-name=n,server.type=bogus"],
    ["--blockdev", "nbd,node-name=n,server.type=unix,server.path.x=1"],
    ["--blockdev", "null-co,help"],
    ["--blockdev", "help"],
    ["--blockdev", "null-co,node-name=n,,x"],
    ["--blockdev", "null-co,node-name=n,=x"],
    # the JSON form: the QMP visitor
    ["--blockdev", '{"driver":"null-co","size":"1"}'],
    ["--blockdev", '{"driver":"null-co","size":1'],
    ["--blockdev", '{"driver":"null-co","read-only":"on","node-name":"n"}'],
    ["--blockdev", '{"driver":"quorum","node-name":"n","children":[{"driver":1}]}'],
    ["--blockdev", '{"driver":"null-co","node-name":"n","bogus":1,"size":"x"}'],
    ["--blockdev", '{"driver":"null-co"} x'],
    ["--blockdev", '{"driver":"null-co"} {'],
    ["--blockdev", '{"driver":"null-co"} {"a":1}'],
    ["--blockdev", "{'driver':'null-co','node-name':'n'}", *NOMON],
    # blockdev-add's own checks and the open path
    ["--blockdev", "raw,file=nonode"],
    ["--blockdev", "null-co,size=-1"],
    ["--blockdev", "null-co,node-name=1n"],
    ["--blockdev", "null-co,node-name=n,detect-zeroes=unmap"],
    ["--blockdev", "raw,node-name=r,file=nonode"],
    ["--blockdev", "file,node-name=f,filename=$D/nonexistent"],
    ["--blockdev", "raw,node-name=r,file.driver=file,file.filename=$D/nonexistent"],
    ["--blockdev", "raw,node-name=r," + IMG + ",file.node-name=r"],
    ["--blockdev", "raw,node-name=r," + IMG + ",offset=2M"],
    ["--blockdev", "raw,node-name=r," + IMG + ",size=511"],
    ["--blockdev", "raw,node-name=r," + IMG + ",file.locking=maybe"],
    ["--blockdev", "file,node-name=f,filename=$D/a.img,aio=bogus"],
    ["--blockdev", "qcow2,node-name=q,file.driver=file,file.filename=$D/empty"],
    ["--blockdev", "qcow2,node-name=q," + IMG],
    ["--blockdev", "qcow2,node-name=q," + QCOW + ",backing=nonode"],
    ["--blockdev", "qcow2,node-name=q," + QCOW + ",l2-cache-size=1k"],
    ["--blockdev", "qcow2,node-name=1q," + QCOW + ",backing="],
    ["--blockdev", "qcow2," + QCOW + ",backing="],
    ["--blockdev", "qcow2,node-name=q,file.driver=file,file.filename=$D/nonexistent,backing="],
    ["--blockdev", "throttle,node-name=t,file=x,throttle-group=g"],
    # successes, stopped by the next option: warnings, bool spellings, numbers
    ["--blockdev", "qcow2,node-name=q," + QCOW + ",backing=", *NOMON],
    ["--blockdev", '{"driver":"qcow2","node-name":"q","file":"x","backing":""}'],
    ["--blockdev", "null-co,node-name=n,read-only=yes,auto-read-only=n,force-share=false", *NOMON],
    ["--blockdev", "null-co,node-name=n,read-only=y,force-share=true", *NOMON],
    ["--blockdev", "null-co,node-name=n,force-share=on"],
    ["--blockdev", "null-co,node-name=n,size=0x10,latency-ns=010", *NOMON],
    ["--blockdev", "null-co,node-name=n,size= +5", *NOMON],
    ["--blockdev", "null-co,node-name=n,latency-ns=-18446744073709551615", *NOMON],
    ["--blockdev", "raw,node-name=r," + IMG + ",file.locking=auto,size=512,offset=512", *NOMON],
    ["--blockdev", "file,node-name=f,filename=$D/a.img,x-check-cache-dropped=on", *NOMON],
    ["--blockdev", "qcow2,node-name=q," + QCOW + ",overlap-check.template=all", *NOMON],
    # command-line order: only earlier nodes exist; later failures still fail
    ["--blockdev", "raw,node-name=r,file=n2", "--blockdev", "null-co,node-name=n2"],
    ["--blockdev", "null-co,node-name=n2", "--blockdev", "raw,node-name=r,file=n2", *NOMON],
    ["--blockdev", "null-co,node-name=x", "--blockdev", "null-co,node-name=x"],
    ["--blockdev", "null-co,node-name=x,read-only=yes", "--blockdev", "null-co,node-name=x"],
    ["--blockdev", "null-co,node-name=n", "--blockdev", "null-co,node-name=m,size=x"],
    ["--blockdev", "null-co,node-name=n", "--blockdev", "raw,node-name=r,file=n,offset=abc"],
    ["--blockdev", "null-co,node-name=n", "--blockdev", "null-co"],
    ["--blockdev", "null-co,node-name=n", "--bogus"],
    ["--blockdev", "null-co,node-name=n", "--chardev", "bogus,id=c"],
    # --export: QEMU's checks before an export driver is needed
    ["--export", "nbd,id=e,node-name=n"],
    ["--export", "nbd,id=e"],
    ["--export", "id=e"],
    ["--export", ""],
    ["--export", "help"],
    ["--export", "nbd,id=1e,node-name=n"],
    ["--export", "bogus,id=e,node-name=n"],
    ["--export", "nbd,id=e,node-name=n,writethrough=x"],
    ["--export", "nbd,id=e,node-name=n,bitmaps=b"],
    ["--export", "vduse-blk,id=1,node-name=n,name=x"],
    ["--export", "fuse,id=e,node-name=n"],
    ["--export", '{"type":"nbd","id":"e","node-name":"n","writable":"on"}'],
    ["--export", '{"type":"nbd","id":"e.x_-1","node-name":"n"}'],
    [
        "--blockdev",
        "null-co,node-name=n,read-only=on",
        "--export",
        "nbd,id=e,node-name=n,writable=on",
    ],
    [*bd("null-co,node-name=n,read-only=on"), "--export", "nbd,id=e,node-name=n,iothread=x"],
    ["--blockdev", "null-co,node-name=n", "--export", "nbd,id=e,node-name=n,bitmap=b"],
    [*bd("file,node-name=f,filename=$D/a.img", "raw,node-name=r1,file=f"), *NOMON],
    [
        *bd(
            "file,node-name=f,filename=$D/a.img",
            "raw,node-name=r1,file=f",
            "raw,node-name=r2,file=f",
        ),
        *NOMON,
    ],
    [*bd("file,node-name=f1,filename=$D/a.img", "file,node-name=f2,filename=$D/a.img"), *NOMON],
    [
        *bd(
            "copy-on-read,node-name=c,file.driver=null-co,file.node-name=n",
            "raw,node-name=r,file=n",
        ),
        *NOMON,
    ],
    [*bd("null-co,node-name=n", "raw,node-name=r1,file=n", "raw,node-name=r2,file=n"), *NOMON],
    [*bd("null-co,node-name=n", "raw,node-name=r1,file=n", "raw,node-name=r3,file=r1"), *NOMON],
]


def _prepare(tmp: Path) -> None:
    with open(tmp / "a.img", "wb") as f:
        f.truncate(1 << 20)
    (tmp / "empty").write_text("")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "b.qcow2"), "1M"],
        check=True,
        timeout=30,
    )


@pytest.mark.qemu
@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c)[:70] for c in CASES])
def test_blockdev_error_matches_qemu(argv: list[str], tmp_path: Path) -> None:
    qsd = require_qemu()
    want = run_in_dir(argv, tmp_path / "q", [qsd], _prepare)
    got = run_in_dir(argv, tmp_path / "g", None, _prepare)
    assert got == want


_P2 = (
    "qcow2,node-name=p2,file.driver=file,file.filename=$TMP/b.qcow2,read-only=on,"
    "overlap-check.template=none,overlap-check.main-header=yes,cache-clean-interval=0"
)
_QUERY = '> {"execute": "query-named-block-nodes"}'
_FLAT = '> {"execute": "query-named-block-nodes", "arguments": {"flat": true}}'

SCRIPTS = {
    "null-keyval-typed": f"""
#! args: --blockdev null-co,node-name=n0,size=0x100000,read-only=yes,detect-zeroes=on,latency-ns=7
#! args: --blockdev driver=null-aio,node-name=n1,size=010,read-only=no,force-share=off
#! args: --blockdev null-co,node-name=n2,discard=unmap,detect-zeroes=unmap,cache.no-flush=y
> {{"execute": "qmp_capabilities"}}
{_QUERY}
""",
    "json-form": f"""
#! args: --blockdev '{{"driver": "null-co", "node-name": "j", "size": 4096, "read-only": true}}'
#! args: --blockdev "{{'driver': 'raw', 'node-name': 'r', 'file': 'j', 'size': 512}}"
> {{"execute": "qmp_capabilities"}}
{_QUERY}
""",
    "nested-and-references": f"""
#! setup: qemu-img create -q -f raw $TMP/a.img 1M
#! setup: qemu-img create -q -f qcow2 $TMP/b.qcow2 1M
#! setup: qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 $TMP/o.qcow2
#! args: --blockdev raw,node-name=r,file.driver=file,file.filename=$TMP/a.img,file.aio=threads
#! args: --blockdev file,node-name=bf,filename=$TMP/b.qcow2,read-only=on
#! args: --blockdev qcow2,node-name=b,file=bf,read-only=on
#! args: --blockdev qcow2,node-name=o,file.driver=file,file.filename=$TMP/o.qcow2,backing=b
#! args: --blockdev copy-on-read,node-name=cor,file=o
> {{"execute": "qmp_capabilities"}}
{_QUERY}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "b"}}}}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "cor"}}}}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "bf"}}}}
{_FLAT}
""",
    "auto-names-and-del": f"""
#! setup: qemu-img create -q -f qcow2 $TMP/b.qcow2 1M
#! args: --blockdev qcow2,node-name=q,file.driver=file,file.filename=$TMP/b.qcow2
#! args: --blockdev null-co,node-name=n
> {{"execute": "qmp_capabilities"}}
{_FLAT}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "n"}}}}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "n"}}}}
> {{"execute": "blockdev-del", "arguments": {{"node-name": "q"}}}}
> {{"execute": "blockdev-add", "arguments": {{"driver": "null-co", "node-name": "q"}}}}
{_FLAT}
""",
    "no-backing-and-overlap": f"""
#! setup: qemu-img create -q -f qcow2 $TMP/b.qcow2 1M
#! setup: qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 $TMP/o.qcow2
#! args: --blockdev qcow2,node-name=o,file.driver=file,file.filename=$TMP/o.qcow2,backing=
#! args: --blockdev qcow2,node-name=p,file.driver=file,file.filename=$TMP/b.qcow2,read-only=on
#! args: --blockdev {_P2}
> {{"execute": "qmp_capabilities"}}
{_QUERY}
""",
}


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_blockdev_success_matches_qemu(name: str) -> None:
    qsd = require_qemu()
    text = "\n".join(line.strip() for line in SCRIPTS[name].strip().splitlines())
    result = run_differential(parse_script(text, name), qsd)
    assert result.equal, result.diff()
    # Both started: the daemons were still running at the end.
    assert result.reference[-1] == "end: still running"
