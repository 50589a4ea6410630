"""``--nbd-server`` and ``--export``, compared live with qemu-storage-daemon.

Errors: both daemons run with the same arguments in a directory holding a
raw image (``$D/a.img``); exit status and stderr must match once the
program name and the directory are normalized. A run that would succeed
ends with ``--monitor x`` (a chardev that does not exist), so it stops right
after the options under test.

Successes: the differential harness starts both daemons with a command-line
NBD server and export and compares what QMP then says; a process test
checks that the export is served (``nbdinfo --json`` equal to qsd's), that
the socket exists once the pidfile is written, and that qmpgraph removes it
on exit (qsd 7.2 leaves it behind; the one intended difference).
The expected values are always QEMU's, never qmpgraph's.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_qemu

from cli.helpers import QMPGRAPH, run_in_dir, wait_for_pidfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "differential"))
from harness import parse_script, run_differential

NOMON = ["--monitor", "x"]
FILE = ["--blockdev", "file,node-name=f,filename=$D/a.img"]
RO = ["--blockdev", "file,node-name=f,filename=$D/a.img,read-only=on"]
UNIX = ["--nbd-server", "addr.type=unix,addr.path=$D/s"]


def ex(*options: str) -> list[str]:
    """``--export`` once per option."""
    return [word for option in options for word in ("--export", option)]


CASES = [
    # --nbd-server: NbdServerOptions by the keyval and the JSON visitor
    ["--nbd-server", "addr.type=bogus"],
    ["--nbd-server", "addr.type=unix"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
    ["--nbd-server", "addr.type=unix,addr.path=$D/s,foo=1"],
    ["--nbd-server", "addr.type=unix,addr.path=$D/s,max-connections=-1"],
    ["--nbd-server", "addr.type=unix,addr.path=$D/s,max-connections=x"],
    ["--nbd-server", "addr.type=unix,addr.path=$D/s,max-connections=99999999999"],
    ["--nbd-server", '{"addr": {"type": "unix", "path": "$D/s"}, "max-connections": "1"}'],
    ["--nbd-server", "addr=x"],
    ["--nbd-server", ""],
    # --nbd-server: nbd-server-start's checks
    ["--nbd-server", "addr.type=unix,addr.path=$D/no/s"],
    ["--nbd-server", "addr.type=unix,addr.path=$D/s,tls-creds=x"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=0,tls-creds=x"],
    [*UNIX, "--nbd-server", "addr.type=unix,addr.path=$D/s2"],
    [*UNIX, "--nbd-server", "addr.type=unix,addr.path=$D/s,max-connections=4", *NOMON],
    ["--nbd-server", '{"addr": {"type": "unix", "path": "$D/s"}}', *NOMON],
    # --export: command-line order
    [*ex("nbd,id=e0,node-name=f"), *FILE],
    [*FILE, *ex("nbd,id=e0,node-name=f")],
    [*FILE, *ex("nbd,id=e0,node-name=f"), *UNIX],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=g")],
    # --export: block-export-add's checks, in QEMU's order
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f", "nbd,id=e0,node-name=f")],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f", "nbd,id=e1,node-name=f")],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f", "nbd,id=e1,node-name=f,name=x", *NOMON)],
    [*RO, *UNIX, *ex("nbd,id=e0,node-name=f,writable=on")],
    [*RO, *UNIX, *ex("nbd,id=e0,node-name=f,writable=on,iothread=x")],
    [*RO, *UNIX, *ex("nbd,id=e0,node-name=f,iothread=x")],
    [*RO, "--object", "iothread,id=io", *ex("nbd,id=e0,node-name=f,iothread=io")],
    [*FILE, *UNIX, *ex("nbd,id=-e0,node-name=f")],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f,bitmaps.0=b")],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f,writable=maybe")],
    [*FILE, *UNIX, *ex("vhost-user-blk,id=e0,node-name=f")],
    [*FILE, *UNIX, *ex("bogus,id=e0,node-name=f")],
    [*FILE, *UNIX, *ex("nbd,node-name=f")],
    [*FILE, *UNIX, *ex('{"type": "nbd", "id": "e0", "node-name": "f", "writable": "on"}')],
    [*FILE, *UNIX, *ex('{"type": "nbd", "id": "e0", "node-name": "f"}'), *NOMON],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f,writable=on,allocation-depth=on"), *NOMON],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f,name=" + "n" * 4097)],
    [*FILE, *UNIX, *ex("nbd,id=e0,node-name=f,description=" + "d" * 4097)],
]


def _prepare(tmp: Path) -> None:
    with open(tmp / "a.img", "wb") as f:
        f.truncate(1 << 20)


@pytest.mark.qemu
@pytest.mark.parametrize("argv", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_nbd_option_error_matches_qemu(argv: list[str], tmp_path: Path) -> None:
    qsd = require_qemu()
    want = run_in_dir(argv, tmp_path / "q", [qsd], _prepare)
    got = run_in_dir(argv, tmp_path / "g", None, _prepare)
    assert got == want
    assert want[0] == 1


SCRIPT = """
#! setup: qemu-img create -q -f raw $TMP/a.img 1M
#! args: --blockdev file,node-name=f,filename=$TMP/a.img
#! args: --blockdev raw,node-name=r,file=f,read-only=on
#! args: --nbd-server addr.type=unix,addr.path=$TMP/n.sock,max-connections=2
#! args: --export type=nbd,id=e0,node-name=f,writable=on,description=d
#! args: --export nbd,id=e1,node-name=r,name=ro,allocation-depth=on
> {"execute": "qmp_capabilities"}
> {"execute": "query-block-exports"}
> {"execute": "query-named-block-nodes", "arguments": {"flat": true}}
> {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {}}}}
> {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "x"}}}}
> {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "f"}}
> {"execute": "blockdev-del", "arguments": {"node-name": "r"}}
> {"execute": "block-export-del", "arguments": {"id": "e1"}}
> {"execute": "nbd-server-stop"}
> {"execute": "query-block-exports"}
> {"execute": "blockdev-del", "arguments": {"node-name": "r"}}
"""


@pytest.mark.qemu
def test_cmdline_exports_in_qmp_match_qemu() -> None:
    qsd = require_qemu()
    text = "\n".join(line.strip() for line in SCRIPT.strip().splitlines())
    result = run_differential(parse_script(text, "nbd-cmdline"), qsd)
    assert result.equal, result.diff()
    assert result.reference[-1] == "end: still running"


def _serve_and_probe(cmd: list[str], tmp: Path) -> tuple[str, bool, int]:
    """Start ``cmd`` with a command-line export; nbdinfo's JSON, whether the
    socket existed when the pidfile appeared, the exit status on SIGTERM."""
    tmp.mkdir()
    _prepare(tmp)
    sock, pidfile = tmp / "s", tmp / "pid"
    argv = [
        *cmd,
        "--blockdev",
        f"driver=file,node-name=f,filename={tmp / 'a.img'}",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=f,writable=on",
        "--pidfile",
        str(pidfile),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_pidfile(proc, pidfile)
        ready = stat.S_ISSOCK(os.stat(sock).st_mode)
        info = subprocess.run(
            ["nbdinfo", "--json", f"nbd+unix:///f?socket={sock}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.replace(str(tmp), "$D")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    return info, ready, status


@pytest.mark.qemu
def test_cmdline_export_is_served_like_qemu(tmp_path: Path) -> None:
    qsd = require_qemu()
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo not installed")
    want = _serve_and_probe([qsd], tmp_path / "q")
    got = _serve_and_probe(QMPGRAPH, tmp_path / "g")
    assert got == want
    assert want[1] and want[2] == 0
    # qmpgraph removes its NBD socket on exit (qsd 7.2 leaves it).
    assert not (tmp_path / "g" / "s").exists()
    assert not (tmp_path / "g" / "pid").exists()
