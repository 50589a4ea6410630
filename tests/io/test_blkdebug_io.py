"""blkdebug error injection over NBD, against qemu-storage-daemon (live).

Each scenario opens the same graph in both daemons (a raw node over a
blkdebug node over a file holding data, or a blkdebug node alone), exports
it writable, and runs the same requests with libnbd (/usr/bin/python3's
``nbd``) in one connection; the outcome of every request (ok or the NBD
error) must be the same.  libnbd asks for simple replies: with structured
replies QEMU 7.2 drops the connection when a sparse read fails, which is a
matter for the NBD server, not for blkdebug.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "nbd"))

from conftest import require_qemu
from livekit import TIMEOUT, LiveDaemon, run  # tests/nbd helpers, put on sys.path above

pytestmark = pytest.mark.qemu

_CLIENT = """
import json, sys, nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
out = []
for op in json.loads(sys.argv[2]):
    name, args = op[0], op[1:]
    try:
        if name == "read":
            h.pread(args[1], args[0])
        elif name == "write":
            h.pwrite(bytes([0x5A]) * args[1], args[0])
        elif name == "zero":
            h.zero(args[1], args[0])
        elif name == "trim":
            h.trim(args[1], args[0])
        elif name == "flush":
            h.flush()
        out.append("ok")
    except nbd.Error as err:
        out.append(nbd.Error.__name__ if err.errno is None else err.errno)
print(json.dumps(out))
"""

KiB = 1024


def _image(node: str = "dbg", **opts: Any) -> dict[str, Any]:
    return {
        "driver": "blkdebug",
        "node-name": node,
        "image": {"driver": "file", "filename": "img.raw"},
        **opts,
    }


def _raw(**opts: Any) -> dict[str, Any]:
    return {"driver": "raw", "node-name": "top", "discard": "unmap", "file": _image(**opts)}


SCENARIOS: dict[str, tuple[dict[str, Any], list[list[Any]]]] = {
    # Events from raw, states, once, sector matching, errno mapping.
    "states-once-sector": (
        _raw(
            **{
                "inject-error": [
                    {"event": "read_aio", "sector": 8, "errno": 28, "once": True},
                    {"event": "write_aio", "iotype": "write", "state": 2, "errno": 1},
                    {"event": "flush_to_disk", "errno": 122, "state": 2},
                ],
                "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
            }
        ),
        [
            ["read", 0, 512],
            ["read", 4096, 512],
            ["read", 4096, 512],
            ["write", 0, 512],
            ["read", 0, 512],
            ["flush"],
            ["flush"],
            ["write", 0, 512],
            ["flush"],
        ],
    ),
    # A rule without iotype hits every type but block status; with one, only it.
    "iotypes": (
        _raw(
            **{
                "inject-error": [
                    {"event": "write_aio", "errno": 5},
                    {"event": "read_aio", "iotype": "write-zeroes", "errno": 7},
                ]
            }
        ),
        [
            ["read", 0, 512],
            ["zero", 0, 65536],
            ["write", 0, 512],
            ["read", 0, 4096],
            ["trim", 0, 65536],
            ["flush"],
            ["read", 0, 512],
            ["zero", 0, 65536],
            ["write", 0, 4096],
        ],
    ),
    # Rules of the last event to fire replace the active ones.
    "replace-active": (
        _raw(
            **{
                "inject-error": [
                    {"event": "flush_to_os", "iotype": "read", "errno": 28},
                    {"event": "write_aio", "iotype": "read", "errno": 1, "once": True},
                ]
            }
        ),
        [
            ["read", 0, 512],
            ["flush"],
            ["read", 0, 512],
            ["write", 0, 512],
            ["read", 0, 512],
            ["read", 0, 512],
            ["flush"],
            ["read", 0, 512],
        ],
    ),
    # Events a write fires on the node written (blkdebug exported alone).
    "pwritev-events": (
        _image(
            node="top",
            **{
                "inject-error": [{"event": "pwritev", "iotype": "read", "errno": 5, "sector": 16}],
                "set-state": [{"event": "pwritev_done", "new_state": 3}],
            },
        ),
        [
            ["read", 8192, 512],
            ["write", 0, 512],
            ["read", 8192, 512],
            ["read", 0, 512],
            ["zero", 0, 4096],
            ["read", 8192, 512],
        ],
    ),
    # align widens requests: a rule's sector hits a read of the same block.
    "align": (
        _raw(align=4096, **{"inject-error": [{"event": "read_aio", "sector": 7, "errno": 5}]}),
        [["read", 0, 512], ["read", 4096, 512], ["write", 512, 512], ["read", 8192, 4096]],
    ),
    # max-transfer splits; a sector in a later piece fails the request.
    "max-transfer": (
        _raw(
            **{
                "max-transfer": 65536,
                "inject-error": [{"event": "read_aio", "sector": 200, "errno": 5}],
            }
        ),
        [["read", 0, 65536], ["read", 0, 131072], ["read", 102400, 512]],
    ),
    # Write-zeroes smaller than opt-write-zero become writes; discards smaller
    # than opt-discard vanish.
    "zero-discard-geometry": (
        _raw(
            **{
                "opt-write-zero": 65536,
                "opt-discard": 65536,
                "inject-error": [
                    {"event": "write_aio", "iotype": "write-zeroes", "errno": 28},
                    {"event": "write_aio", "iotype": "write", "errno": 1, "sector": 1000},
                    {"event": "write_aio", "iotype": "discard", "errno": 5},
                ],
            }
        ),
        [
            ["write", 0, 512],
            ["zero", 0, 4096],
            ["zero", 0, 65536],
            ["zero", 4096, 65536],
            ["zero", 508 * 1024, 4096],
            ["trim", 0, 4096],
            ["trim", 0, 65536],
        ],
    ),
    # A flush reaches the rules only after a write.
    "flush-generation": (
        _image(
            node="top",
            **{"inject-error": [{"event": "pwritev_done", "iotype": "flush", "errno": 5}]},
        ),
        [["flush"], ["write", 0, 512], ["flush"], ["flush"], ["write", 0, 512], ["flush"]],
    ),
}


def _outcomes(kind: str, d: Path, spec: dict[str, Any], ops: list[list[Any]]) -> list[Any]:
    daemon = LiveDaemon(kind, require_qemu(), d, [])
    try:
        daemon.ok("blockdev-add", **spec)
        daemon.start_nbd()
        daemon.ok("block-export-add", type="nbd", id="e", name="e", node_name="top", writable=True)
        res = subprocess.run(
            ["/usr/bin/python3", "-c", _CLIENT, daemon.uri("e"), json.dumps(ops)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return list(json.loads(res.stdout))
    finally:
        daemon.stop()


def _prepare(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-f", "raw", str(d / "img.raw"), "1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", str(d / "img.raw"))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_errors_as_qsd(tmp_path: Path, name: str) -> None:
    require_qemu()
    spec, ops = SCENARIOS[name]
    results = {}
    for kind in ("qsd", "qmpgraph"):
        _prepare(tmp_path / kind)
        results[kind] = _outcomes(kind, tmp_path / kind, spec, ops)
    assert results["qmpgraph"] == results["qsd"], list(
        zip(ops, results["qsd"], results["qmpgraph"], strict=True)
    )


def test_config_file_rules(tmp_path: Path) -> None:
    """[inject-error] and [set-state] sections of a config file act as the options do."""
    require_qemu()
    config = (
        '[inject-error]\nevent = "read_aio"\nstate = "2"\nerrno = "28"\n\n'
        '[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n'
    )
    ops = [["read", 0, 512], ["write", 0, 512], ["read", 0, 512], ["read", 4096, 512]]
    results = {}
    for kind in ("qsd", "qmpgraph"):
        d = tmp_path / kind
        _prepare(d)
        (d / "rules.ini").write_text(config)
        spec = _raw(config=str(d / "rules.ini"))
        results[kind] = _outcomes(kind, d, spec, ops)
    assert results["qmpgraph"] == results["qsd"]
    assert "ok" in results["qsd"] and results["qsd"] != ["ok"] * len(ops)
