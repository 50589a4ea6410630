"""Command-line errors, compared live with qemu-storage-daemon.

Each case runs the real ``qemu-storage-daemon`` and ``qmpgraph daemon`` with
the same arguments; the exit status and stderr must match once the program
name and the per-run directory are normalized. The expected text is QEMU's,
never qmpgraph's.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import require_qemu

from cli.helpers import run_in_dir

S = "socket,id=c0,path=$D/s0,server=on,wait=off"

CASES = [
    # getopt
    ["--bogus"],
    ["--bogus=1"],
    ["-x"],
    ["-hx"],
    ["--chardev"],
    ["--monitor"],
    ["-T"],
    ["--pidfile"],
    ["--help=1"],
    ["--daemonize=yes"],
    ["foo"],
    ["-"],
    ["--monitor", "c9", "--bogus"],
    ["--bogus", "--help"],
    ["--mon", "c9"],
    ["--monitor=c9"],
    ["--monitor", "c9", "--", "--bogus"],
    # keyval (--monitor)
    ["--monitor", ""],
    ["--monitor", "c9"],
    ["--monitor", "chardev=c9"],
    ["--monitor", "mode=control"],
    ["--monitor", "c9,,x"],
    ["--monitor", ",c9"],
    ["--monitor", "c9,"],
    ["--monitor", "a=b=c"],
    ["--monitor", "c9,pretty"],
    ["--monitor", "c9,pretty=bad"],
    ["--monitor", "c9,pretty=yes,pretty=no"],
    ["--monitor", "c9,mode=bogus"],
    ["--monitor", "c9,bogus=1"],
    ["--monitor", "c9,a.b=1,a=2"],
    ["--monitor", "c9,a=1,a.b=2"],
    ["--monitor", "c9,a.0=1,a.x=2"],
    ["--monitor", "c9,a.1=1"],
    ["--monitor", "c9,a.0=1,a.2=2"],
    ["--monitor", "c9,id.x=1"],
    ["--monitor", "c9,1=x"],
    ["--monitor", "c9,help"],
    ["--monitor", "c9," + "k" * 130 + "=1"],
    ["--monitor", "c9,a." + "k" * 130 + "=1"],
    ["--monitor", '{"chardev":"c9"}'],
    ['--monitor={"chardev":"c9"'],
    ["--monitor", '{"chardev":1}'],
    ["--monitor", '{"chardev":"c9","pretty":"on"}'],
    ["--monitor", '{"chardev":"c9","bogus":1}'],
    ["--monitor", "{'chardev':'c9'}"],
    # chardev
    ["--chardev", ""],
    ["--chardev", "bogus,id=c0"],
    ["--chardev", "SOCKET,id=c0"],
    ["--chardev", "id=c0"],
    ["--chardev", "socket,id=c0"],
    ["--chardev", "socket,path=$D/s0,server=on,wait=off"],
    ["--chardev", "socket,id=1c,path=$D/s0,server=on,wait=off"],
    ["--chardev", "socket,id=c0,,x,path=$D/s0,server=on,wait=off"],
    ["--chardev", "socket,ID=c0"],
    ["--chardev", S + ",bogus=1"],
    ["--chardev", S + ",bogus"],
    ["--chardev", "socket,id=c0,path=$D/s0,server,nowait", "--monitor", "c9"],
    ["--chardev", "socket,id=c0,path=$D/s0,server=maybe"],
    ["--chardev", S + ",reconnect=x"],
    ["--chardev", S + ",reconnect=1"],
    ["--chardev", "socket,id=c0,path=$D/s0,server=off,wait=off"],
    ["--chardev", "socket,id=c0,path=$D/none"],
    ["--chardev", "socket,id=c0,path=$D/none,server=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=abc,server=on,wait=off"],
    ["--chardev", "socket,id=c0,path=$D/s0,host=127.0.0.1,port=1,server=on,wait=off"],
    # TCP listeners that fail before binding: an empty port range, no family, a
    # host of the other family
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=47120,to=0x10,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=127.0.0.1,port=47120,ipv4=off,ipv6=off,server=on,wait=off"],
    ["--chardev", "socket,id=c0,host=::1,port=47120,ipv4=on,server=on,wait=off"],
    ["--chardev", "socket,id=c0,path=$D/nodir/s,server=on,wait=off"],
    ["--chardev", "socket,id=c0,path=$D/" + "a" * 120 + ",server=on,wait=off"],
    ["--chardev", "socket,id=c0,fd=abc"],
    ["--chardev", "socket,id=c0,path=$D/s0,tls-authz=a,server=on,wait=off"],
    ["--chardev", S, "--chardev", "socket,id=c0,path=$D/s1,server=on,wait=off"],
    ["--chardev", "null,id=c0", "--chardev", "null,id=c0"],
    ["--chardev", "null,id=c0", "--chardev", "socket,id=c0,path=$D/s1,server=on,wait=off"],
    ["--chardev", S, "--chardev", "null,id=c0"],
    ["--chardev", "null,id=c0,bogus=1"],
    ["--chardev", S, "--monitor", "c0,mode=readline"],
    ["--chardev", S, "--monitor", "c0", "--monitor", "c0"],
    ["--chardev", S, "--monitor", "c0", "--monitor", "c9"],
    ["--chardev", S, "foo"],
    ["--chardev", "socket,id=c0,path=$D/dir,server=on,wait=off"],
    ["--chardev", "socket,id=c0,path=$D/file,server=on,wait=off", "--monitor", "c9"],
    ["--chardev", "help"],
    # order: the first failing option wins, whatever its kind
    ["--chardev", "socket,id=c0,path=$D/nodir/s,server=on,wait=off", "--monitor", "c9,,x"],
    ["--monitor", "c9,,x", "--chardev", "bogus"],
    # pidfile and pre-pass
    ["--pidfile", "$D/nodir/pid"],
    ["--pidfile", "$D/pid", "--monitor", "c9"],
    ["--monitor", "c9", "-V"],
    ["-T", "bogus=1"],
]


def _prepare(tmp: Path) -> None:
    (tmp / "dir").mkdir()
    (tmp / "file").write_text("")


def _run(argv: list[str], tmp: Path, cmd: list[str] | None) -> tuple[int, str, str]:
    return run_in_dir(argv, tmp, cmd, _prepare)


@pytest.mark.qemu
@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c)[:60] for c in CASES])
def test_error_matches_qemu(argv: list[str], tmp_path: Path) -> None:
    qsd = require_qemu()
    want = _run(argv, tmp_path / "q", [qsd])
    got = _run(argv, tmp_path / "g", None)
    assert got == want


@pytest.mark.qemu
@pytest.mark.parametrize("extra", ["", ",to={port}"])
def test_tcp_port_in_use_matches_qemu(extra: str, tmp_path: Path) -> None:
    """A chardev listening on a port this test holds (alone, or as a
    one-port range) ends both daemons with QEMU's message."""
    qsd = require_qemu()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        chardev = f"socket,id=c0,host=127.0.0.1,port={port},server=on,wait=off" + extra
        argv = ["--chardev", chardev.format(port=port), "--monitor", "c0"]
        want = _run(argv, tmp_path / "q", [qsd])
        got = _run(argv, tmp_path / "g", None)
    assert want[0] == 1 and "Failed to find an available port" in want[1]
    assert got == want
