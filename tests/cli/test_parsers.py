"""Unit tests of the command-line parsers (no processes, no QEMU).

Expected trees follow the examples in QEMU's ``util/keyval.c`` comment;
every error text here is also checked live against qemu-storage-daemon in
``test_errors_live.py``.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from qmpgraph.cmdline.errors import CmdlineError
from qmpgraph.cmdline.getopt import NONOPTION, Opt, getopt_long
from qmpgraph.cmdline.keyval import keyval_parse, option_dict
from qmpgraph.cmdline.qemuopts import CHARDEV_OPTS, parse_opts
from qmpgraph.cmdline.qsd import OPTIONS, Exit, pre_pass


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("null-co,node-name=n0", {"driver": "null-co", "node-name": "n0"}),
        ("a.b.c=1,a.b.d=2", {"a": {"b": {"c": "1", "d": "2"}}}),
        ("a.0=x,a.1=y", {"a": ["x", "y"]}),
        ("a.1=y,a.0=x", {"a": ["x", "y"]}),
        ("a.0.b=1,a.0.c=2", {"a": [{"b": "1", "c": "2"}]}),
        ("k=v,,w", {"k": "v,w"}),
        ("k=1,k=2", {"k": "2"}),
        ("", {}),
    ],
)
def test_keyval_trees(text: str, tree: dict[str, object]) -> None:
    assert keyval_parse(text, "driver")[0] == tree


def test_keyval_help_only_where_allowed() -> None:
    assert keyval_parse("help", "driver", help_allowed=True) == ({}, True)
    with pytest.raises(CmdlineError, match="Help is not available for this option"):
        keyval_parse("x,help", "driver")


def test_option_dict_json_keeps_types() -> None:
    assert option_dict('{"driver": "null-co", "size": 1}', "driver") == (
        {"driver": "null-co", "size": 1},
        False,
    )
    assert option_dict("null-co,size=1", "driver") == ({"driver": "null-co", "size": "1"}, True)


def test_getopt_in_order_with_abbreviations_and_clusters() -> None:
    got = list(getopt_long(OPTIONS, ["--mon=c0", "x", "-hTpat", "--chard", "a,b", "--", "-V"]))
    assert got == [
        Opt("monitor", "c0", ("--mon=c0",)),
        Opt(NONOPTION, "x", ("x",)),
        Opt("help", None, ("-hTpat",)),
        Opt("trace", "pat", ("-hTpat",)),
        Opt("chardev", "a,b", ("--chard", "a,b")),
    ]


def test_qemuopts_implied_value_allows_escaped_comma() -> None:
    opts = parse_opts(CHARDEV_OPTS, "socket,,x,id=c0")
    assert opts.get("backend") == "socket,x"
    assert opts.id == "c0"


def test_pre_pass_help_wins_over_later_errors() -> None:
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(Exit) as exc:
        pre_pass(["--monitor", "c9", "-h", "--bogus"], out, err)
    assert exc.value.status == 0
    assert out.getvalue().startswith("Usage: qmpgraph daemon")
    assert err.getvalue() == ""


def test_cmdline_imports_no_trio() -> None:
    code = "import sys, qmpgraph.cmdline.qsd; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0
