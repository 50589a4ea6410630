"""Differential checks against the installed qemu-storage-daemon.

* The committed schema data is not stale: a fresh ``query-qmp-schema`` and a
  fresh probe of the masked names and integer widths equal what is in
  ``qmpgraph/schema/data/`` (regenerate with ``tools/gen_schema.py``).
* With every QEMU command enabled, qmpgraph's introspection reply is
  byte-for-byte QEMU's, and its command order is QEMU's ``query-commands``.
* A fresh seed of random argument faults gives QEMU's error texts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpgraph.errors import GenericError
from qmpgraph.protocol import qjson
from qmpgraph.schema import load, load_qemu

TOOLS = Path(__file__).resolve().parents[2] / "tools"
DATA = Path(__file__).resolve().parents[2] / "qmpgraph" / "schema" / "data"

# Each test takes ``qsd_path`` (tests/conftest.py: require_qemu()), which
# skips loudly without QEMU and fails under CI=true.
pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def tools() -> Any:
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import gen_schema
    import qsd_oracle
    import record_arg_errors

    class Tools:
        QSD = qsd_oracle.QSD
        gen = gen_schema
        rec = record_arg_errors

    return Tools


def test_committed_schema_is_fresh(tools: Any, qsd_path: str) -> None:
    entities, probed = tools.gen.generate(qsd_path)
    committed = json.loads((DATA / tools.gen.SCHEMA_FILE).read_text())
    assert entities == committed, "stale schema data: run tools/gen_schema.py"
    committed_probed = json.loads((DATA / tools.gen.PROBED_FILE).read_text())
    assert probed == committed_probed, "stale probed data: run tools/gen_schema.py"


def _raw_reply(qsd: Any, text: bytes) -> str:
    sock = qsd._sock
    sock.sendall(text + b"\n")
    buf = qsd._buf
    while not buf.endswith(b"\r\n"):
        buf += sock.recv(1 << 20)
    qsd._buf = b""
    return str(buf.decode().removesuffix("\r\n"))


def test_full_introspection_is_byte_exact(tools: Any, qsd_path: str) -> None:
    # QEMU's part; qmpgraph's downstream members are checked in tests/io and tests/commands.
    schema = load_qemu()
    with tools.QSD(qsd_path) as qsd:
        raw = _raw_reply(qsd, b'{"execute": "query-qmp-schema"}')
    mine = qjson.dumps({"return": schema.introspection(schema.command_names)})
    assert mine == raw


def test_query_commands_order_is_qemus(tools: Any, qsd_path: str) -> None:
    schema = load()
    with tools.QSD(qsd_path) as qsd:
        names = [c["name"] for c in qsd.execute("query-commands")["return"]]
    assert names == list(reversed(schema.ordered_commands(schema.command_names)))


def test_fresh_random_faults_match_qemu(tools: Any, qsd_path: str) -> None:
    schema = load()
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    with tools.QSD(qsd_path) as qsd:
        entities = qsd.execute("query-qmp-schema")["return"]
        batch = tools.rec.cases(entities, random.Random(seed), 400)
        recorded = tools.rec.record(qsd, batch)
    wrong = []
    for case in recorded:
        try:
            schema.validate_arguments(case["command"], case["arguments"])
            got = None
        except GenericError as err:
            got = err.desc
        if got != case["error"]:
            wrong.append((case, got))
    assert wrong == [], f"seed {seed}"


def test_which_unexpected_key_is_named(tools: Any, qsd_path: str) -> None:
    """Many unknown keys (non-ASCII too), some known ones consumed first:
    QEMU names the first leftover in GLib hash table order."""
    schema = load()
    rng = random.Random(2074)
    alphabet = "abcdefgz-_09\u00e9\u00ef\u4e2d"
    known = {"read-only": True, "discard": "ignore", "cache": {}, "offset": 0, "size": 0}
    wrong = []
    with tools.QSD(qsd_path) as qsd:
        for _ in range(300):
            items: list[tuple[str, Any]] = [("driver", "raw"), ("file", "f")]
            items += [(k, v) for k, v in known.items() if rng.random() < 0.5]
            for _ in range(rng.choice([2, 3, 5, 8, 13, 30])):
                key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                items.append((key, 1))
            rng.shuffle(items)
            args = dict(items)
            qemu = qsd.error_desc("blockdev-add", args)
            try:
                schema.validate_arguments("blockdev-add", args)
                mine = None
            except GenericError as err:
                mine = err.desc
            if mine != qemu:
                wrong.append((list(args), qemu, mine))
    assert wrong == []
