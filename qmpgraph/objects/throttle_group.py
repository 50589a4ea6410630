"""The ``throttle-group`` user object: I/O limits shared by throttle nodes.

QEMU 7.2 semantics (block/throttle-groups.c, util/throttle.c; every message
probed on qemu-storage-daemon):

* six leaky buckets (bps/iops x total/read/write), each with ``avg``,
  ``max`` (uint64) and ``burst_length`` (uint64, default 1), plus
  ``op_size`` (``iops-size``);
* the legacy ``x-*`` properties set one field each, only before the object
  is complete ("Property cannot be set after initialization"), refuse
  negative values and burst lengths past UINT_MAX;
* ``limits`` (a ``ThrottleLimits``) may be set at any time; its given
  members overwrite the current configuration, which must then be valid
  (``throttle_is_valid``), or nothing changes;
* completing the object validates the configuration again;
* the object cannot be deleted while a throttle node holds a reference.

What does not live here: the throttle block driver
(``qmpgraph.drivers.throttle``) and the buckets' levels and timers
(``qmpgraph.io.throttle_io``, which empties the buckets whenever
``limits`` replaces ``config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qmpgraph.errors import GenericError
from qmpgraph.objects import props
from qmpgraph.objects.qom import QomObject

if TYPE_CHECKING:
    from qmpgraph.objects.qom import ObjectTree
    from qmpgraph.schema import Schema

_UINT64 = 2**64 - 1
_UINT_MAX = 2**32 - 1
VALUE_MAX = 1_000_000_000_000_000
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
_FIELDS = {"": 0, "-max": 1, "-max-length": 2}

# qom-list order after "type" (GLib's order of the class properties, probed).
_PROPERTY_ORDER = (
    "x-bps-write-max-length", "x-iops-total-max-length", "x-iops-size", "limits",
    "x-bps-total", "x-iops-read-max-length", "x-bps-write", "x-iops-write-max-length",
    "x-bps-read-max", "x-iops-read-max", "x-bps-total-max", "x-bps-read-max-length",
    "x-iops-read", "x-bps-read", "x-bps-write-max", "x-iops-total-max", "x-iops-total",
    "x-iops-write", "x-bps-total-max-length", "x-iops-write-max",
)  # fmt: skip


def _split(key: str) -> tuple[str, int] | None:
    """``iops-total-max`` -> (``iops-total``, 1); None for ``iops-size``."""
    for bucket in BUCKETS:
        if key.startswith(bucket):
            index = _FIELDS.get(key[len(bucket) :])
            if index is not None:
                return bucket, index
    return None


Config = dict[str, Any]


def default_config() -> Config:
    """A fresh group's configuration: no limits, burst lengths 1."""
    cfg: Config = {b: [0, 0, 1] for b in BUCKETS}
    cfg["op-size"] = 0
    return cfg


def copy_config(cfg: Config) -> Config:
    """A deep copy (bucket lists included)."""
    out: Config = {b: list(cfg[b]) for b in BUCKETS}
    out["op-size"] = cfg["op-size"]
    return out


def check_config(cfg: Config) -> None:
    """``throttle_is_valid``: QEMU's checks in QEMU's order."""

    def avg(b: str) -> int:
        return int(cfg[b][0])

    def mx(b: str) -> int:
        return int(cfg[b][1])

    mixed = any(
        f(f"{k}-total") and (f(f"{k}-read") or f(f"{k}-write"))
        for f in (avg, mx)
        for k in ("bps", "iops")
    )
    if mixed:
        raise GenericError(
            "bps/iops/max total values and read/write values cannot be used at the same time"
        )
    if cfg["op-size"] and not (avg("iops-total") or avg("iops-read") or avg("iops-write")):
        raise GenericError("iops size requires an iops value to be set")
    for b in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write"):
        a, m, burst = cfg[b]
        if a > VALUE_MAX or m > VALUE_MAX:
            raise GenericError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        if not burst:
            raise GenericError("the burst length cannot be 0")
        if burst > 1 and not m:
            raise GenericError("burst length set without burst rate")
        if m and burst > VALUE_MAX // m:
            raise GenericError("burst length too high for this burst rate")
        if m and not a:
            raise GenericError("bps_max/iops_max require corresponding bps/iops values")
        if m and m < a:
            raise GenericError("bps_max/iops_max cannot be lower than bps/iops")


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def config_to_limits(cfg: Config) -> dict[str, int]:
    """``throttle_config_to_limits``: every ThrottleLimits member (int64)."""
    out: dict[str, int] = {}
    for b in BUCKETS:
        a, m, burst = cfg[b]
        out[b] = _as_int64(a)
        out[f"{b}-max"] = _as_int64(m)
        out[f"{b}-max-length"] = _as_int64(burst)
    out["iops-size"] = _as_int64(cfg["op-size"])
    return out


def apply_limits(cfg: Config, limits: dict[str, Any]) -> None:
    """``throttle_limits_to_config`` on ``cfg`` (in place), then the validity check.

    Members are applied in QEMU's order (averages, maxima, burst lengths,
    iops-size) and a burst length past UINT_MAX stops at once.
    """
    for suffix in ("", "-max"):
        for b in BUCKETS:
            key = f"{b}{suffix}"
            if key in limits:
                cfg[b][_FIELDS[suffix]] = int(limits[key]) & _UINT64
    for b in BUCKETS:
        key = f"{b}-max-length"
        if key in limits:
            value = int(limits[key])
            if value > _UINT_MAX:
                raise GenericError(f"{key} value must be in the range [0, {_UINT_MAX}]")
            cfg[b][2] = value & _UINT64
    if "iops-size" in limits:
        cfg["op-size"] = int(limits["iops-size"]) & _UINT64
    check_config(cfg)


class ThrottleGroup(QomObject):
    """One ``throttle-group`` object."""

    qom_type = "throttle-group"
    class_properties: ClassVar[tuple[tuple[str, str], ...]] = tuple(
        (n, "ThrottleLimits" if n == "limits" else "int") for n in _PROPERTY_ORDER
    )

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.schema = schema
        self.config = default_config()
        self.initialized = False

    def snapshot(self) -> Any:
        """The configuration (a deep copy) and the initialized flag."""
        return (copy_config(self.config), self.initialized)

    def restore(self, state: Any) -> None:
        """Put back a ``snapshot``."""
        self.config = copy_config(state[0])
        self.initialized = state[1]

    def get(self, name: str) -> Any:
        """``limits`` or one ``x-*`` field."""
        limits = config_to_limits(self.config)
        if name == "limits":
            return limits
        return limits[name[2:]]

    def set(self, name: str, value: Any) -> None:
        """``throttle_group_set_limits`` or ``throttle_group_set`` (see module doc)."""
        if name == "limits":
            args = {"qom-type": "throttle-group", "id": "x", "limits": value}
            typed = self.schema.validate_arguments("object-add", args)["limits"]
            cfg = copy_config(self.config)
            apply_limits(cfg, typed)
            self.config = cfg
            return
        if self.initialized:
            raise GenericError("Property cannot be set after initialization")
        number = props.int64(name, value)
        if number < 0:
            raise GenericError("Property values cannot be negative")
        key = name[2:]
        if key == "iops-size":
            self.config["op-size"] = number
            return
        where = _split(key)
        assert where is not None
        bucket, index = where
        if index == 2 and number > _UINT_MAX:
            # QEMU's message lacks the space between "the" and "range".
            raise GenericError(f"{name} value must be in therange [0, {_UINT_MAX}]")
        self.config[bucket][index] = number

    def complete(self, tree: ObjectTree) -> None:
        """Validate the configuration; the group then refuses ``x-*`` changes."""
        check_config(self.config)
        self.initialized = True

    def can_be_deleted(self) -> bool:
        """Only while no throttle node holds it."""
        return self.refcnt == 1
