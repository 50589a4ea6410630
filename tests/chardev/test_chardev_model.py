"""Chardev commands in process: resources a chardev holds are released when
it goes (socket files, descriptors), the command line makes the same objects,
and invariants of the byte conversions. (What QEMU answers is checked live,
in test_chardev_live.py and the chardev-* differential scripts.)
"""

from __future__ import annotations

import base64
import os
import socket
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent.parent / "commands"))

from cmdkit import Client  # tests/commands helper, put on sys.path above

from qmpgraph.chardev.data import glib_base64_decode, json_text, qmp_string_bytes
from qmpgraph.cmdline.chardev import MonitorSpec, parse_chardev
from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.server.startup import Startup


def _server(path: Path) -> dict[str, object]:
    return {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(path)}}}}


def test_remove_closes_and_unlinks_server_socket(tmp_path: Path) -> None:
    """chardev-remove unlinks the socket file and stops listening."""
    c = Client()
    path = tmp_path / "s"
    c.ok("chardev-add", {"id": "s", "backend": _server(path)})
    assert path.exists()
    c.ok("chardev-remove", {"id": "s"})
    assert not path.exists()
    c.fails("chardev-remove", {"id": "s"}, "Chardev 's' not found")


def test_daemon_stop_closes_chardevs(tmp_path: Path) -> None:
    """At exit every chardev is finalized (socket files removed)."""
    c = Client()
    path = tmp_path / "s"
    c.ok("chardev-add", {"id": "s", "backend": _server(path)})
    c.daemon.stop()
    assert not path.exists()


def test_client_state_follows_hangup(tmp_path: Path) -> None:
    """A client chardev connected to a listener shows "unix:" until the peer hangs up."""
    c = Client()
    path = tmp_path / "l"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        backend = {
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": str(path)}}, "server": False},
        }
        c.ok("chardev-add", {"id": "c", "backend": backend})
        conn, _ = listener.accept()
        assert c.ok("qom-get", {"path": "/chardevs/c", "property": "connected"}) is True
        conn.close()
    filenames = {q["label"]: q["filename"] for q in c.ok("query-chardev")}
    assert filenames["c"] == f"disconnected:unix:{path}"


def test_pty_reply_names_the_device() -> None:
    """chardev-add of a pty answers with its device, also in query-chardev."""
    c = Client()
    pty = c.ok("chardev-add", {"id": "p", "backend": {"type": "pty", "data": {}}})["pty"]
    assert os.path.exists(pty)
    assert {"label": "p", "filename": f"pty:{pty}", "frontend-open": False} in c.ok("query-chardev")
    c.ok("chardev-remove", {"id": "p"})


def test_cmdline_chardevs_are_qom_children(tmp_path: Path) -> None:
    """--chardev ringbuf and a null --monitor become /chardevs children."""
    c = Client()
    startup = Startup(c.daemon)
    for text in ("ringbuf,id=rb,size=4k", "null,id=nm"):
        spec, _ = parse_chardev(text)
        startup.chardev(spec, lambda msg: None)
    spec, _ = parse_chardev("ringbuf,id=rb")
    startup.chardev(spec, lambda msg: None)  # duplicate: qsd.py reports it
    startup.monitor(MonitorSpec("nm"))
    assert {q["label"]: q for q in c.ok("query-chardev")} == {
        "rb": {"label": "rb", "filename": "ringbuf", "frontend-open": False},
        "nm": {"label": "nm", "filename": "null", "frontend-open": True},
    }
    c.fails("chardev-remove", {"id": "nm"}, "Chardev 'nm' is busy")
    c.ok("ringbuf-write", {"device": "rb", "data": "x" * 5000})
    assert len(c.ok("ringbuf-read", {"device": "rb", "size": 10000})) == 4096
    startup.close()


def test_cmdline_size_and_path_options() -> None:
    """QemuOpts sizes with suffixes; size=0 means the default; missing paths."""
    assert parse_chardev("memory,id=m,size=1k")[0].data == {"size": 1024}
    assert parse_chardev("ringbuf,id=m,size=0")[0].data == {}
    assert parse_chardev("file,id=f,path=/x")[0].data == {"out": "/x", "append": False}
    for text, msg in (
        ("file,id=f", "chardev: file: no filename given"),
        ("pipe,id=p", "chardev: pipe: no device path given"),
        ("ringbuf,id=r,size=abc", "Parameter 'size' expects a non-negative number below 2^64"),
    ):
        try:
            parse_chardev(text)
        except CmdlineError as exc:
            assert str(exc).startswith(msg)
        else:
            raise AssertionError(text)


@given(st.text().filter(lambda s: "\0" not in s))
def test_valid_text_round_trips(text: str) -> None:
    """Valid UTF-8 without NUL is rendered as the text itself (noncharacters
    and surrogates aside, which the JSON writer replaces in any string)."""
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        return
    assert json_text(qmp_string_bytes(text)).replace("\ufffd", "") == "".join(
        ch
        for ch in text
        if not (0xFDD0 <= ord(ch) <= 0xFDEF or ord(ch) & 0xFFFE == 0xFFFE or ch == "\ufffd")
    )


@given(st.binary())
def test_base64_round_trips(data: bytes) -> None:
    """Standard base64 (padded) decodes back to the bytes."""
    assert glib_base64_decode(base64.b64encode(data)) == data


@given(st.binary())
def test_rendering_never_longer_than_input(data: bytes) -> None:
    """At most one character per input byte; nothing after the first NUL."""
    out = json_text(data)
    assert len(out) <= len(data.split(b"\0", 1)[0])
