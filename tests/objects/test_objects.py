"""Library-level tests of QOM objects: transactional add/del, group references,
the transaction log, and the AES block cipher used to unlock LUKS key slots.

Expected QEMU texts are those the differential scripts compare against
qemu-storage-daemon (object-*.qmp, driver-throttle.qmp, driver-luks.qmp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qmpgraph.drivers.luks_crypto import AES, af_merge
from qmpgraph.objects import tree_for
from qmpgraph.objects.throttle_group import ThrottleGroup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "commands"))
from cmdkit import Client  # tests/commands helper, put on sys.path above


def _objects(c: Client) -> list[str]:
    return [p["name"] for p in c.ok("qom-list", {"path": "/objects"})][1:]


def test_failed_object_add_changes_nothing_but_the_container() -> None:
    c = Client()
    c.fails("object-add", {"qom-type": "throttle-group", "id": "t", "x-iops-total": -1},
            "Property values cannot be negative")  # fmt: skip
    # A property error comes before the /objects container exists.
    assert c.run("qom-list", {"path": "/objects"})["error"]["class"] == "DeviceNotFound"
    c.ok("object-add", {"qom-type": "throttle-group", "id": "t"})
    c.fails("object-add", {"qom-type": "main-loop", "id": "m", "thread-pool-max": 0},
            "bad thread-pool-min/thread-pool-max values")  # fmt: skip
    assert _objects(c) == ["t"]


def test_group_reference_follows_the_throttle_node() -> None:
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": "g"})
    group = tree_for(c.daemon.graph).lookup("g")
    assert isinstance(group, ThrottleGroup)
    c.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    c.fails(
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "size": 8192,
         "file": {"driver": "throttle", "throttle-group": "g",
                  "file": {"driver": "null-co", "size": 4096}}},
        "The sum of offset (0) and size (8192) has to be smaller or equal to the  actual "
        "size of the containing file (4096)",
    )  # fmt: skip
    assert group.refcnt == 1
    c.ok("blockdev-add", {"driver": "throttle", "node-name": "t", "file": "n0",
                          "throttle-group": "g"})  # fmt: skip
    assert group.refcnt == 2
    c.fails("object-del", {"id": "g"}, "object 'g' is in use, can not be deleted")
    c.ok("blockdev-del", {"node-name": "t"})
    assert group.refcnt == 1
    c.ok("object-del", {"id": "g"})
    assert _objects(c) == []


def test_object_commands_are_logged() -> None:
    c = Client()
    c.ok("object-add", {"qom-type": "secret", "id": "s", "data": "x"})
    c.run("object-add", {"qom-type": "secret", "id": "s2"})
    c.ok("qom-set", {"path": "s", "property": "data", "value": "y"})
    c.ok("object-del", {"id": "s"})
    records = c.records
    assert [r["command"] for r in records] == ["object-add", "object-add", "qom-set", "object-del"]
    assert "error" in records[1]


def test_qom_set_limits_is_all_or_nothing() -> None:
    c = Client()
    c.ok("object-add", {"qom-type": "throttle-group", "id": "g",
                        "limits": {"iops-total": 10}})  # fmt: skip
    before = c.ok("qom-get", {"path": "g", "property": "limits"})
    mixed = "bps/iops/max total values and read/write values cannot be used at the same time"
    c.fails("qom-set", {"path": "g", "property": "limits",
                        "value": {"iops-total": 5, "iops-read": 5}}, mixed)  # fmt: skip
    assert c.ok("qom-get", {"path": "g", "property": "limits"}) == before


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (bytes(range(16)), "69c4e0d86a7b0430d8cdb78070b4c55a"),
        (bytes(range(24)), "dda97ca4864cdfe06eaf70a0ec0d7191"),
        (bytes(range(32)), "8ea2b7ca516745bfeafc49904b496089"),
    ],
)
def test_aes_fips197_vectors(key: bytes, expected: str) -> None:
    aes = AES(key)
    plain = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert aes.encrypt_block(plain).hex() == expected
    assert aes.decrypt_block(bytes.fromhex(expected)) == plain


def test_af_merge_of_one_stripe_is_the_stripe() -> None:
    assert af_merge("sha256", 32, 1, bytes(range(32))) == bytes(range(32))
