"""Block drivers (control plane): a read-only registry and one module per driver.

API:

* ``REGISTRY``: read-only mapping ``format_name -> Driver`` of the drivers
  blockdev-add may name (``null-co``, ``null-aio``, ``raw``, ``file``,
  ``qcow2``, ``copy-on-read``, ``compress``, ``throttle``, ``preallocate``,
  ``copy-before-write``, ``snapshot-access``, ``quorum``, ``blkdebug``,
  ``blkverify``, ``blklogwrites``, ``luks``).
* ``INTERNAL``: drivers only the daemon itself instantiates (``commit_top``,
  ``mirror_top``).
* ``get_driver(name)``: the driver, or ``GenericError("Unknown driver: '%s'")``.
* ``qmpgraph.drivers.base.Driver``: the base class and its contract.
* ``qmpgraph.drivers.open.open_node_tree``: the generic open path used by
  blockdev-add.

What does not live here: the data path (no I/O besides header probes).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from qmpgraph.drivers import (
    blkdebug,
    blklogwrites,
    blkverify,
    compress,
    copy_before_write,
    copy_on_read,
    file,
    job_filters,
    luks,
    null,
    preallocate,
    qcow2,
    quorum,
    raw,
    snapshot_access,
    throttle,
)
from qmpgraph.drivers.base import Driver
from qmpgraph.errors import GenericError

# One module per driver (null holds null-co and null-aio, one driver under two
# names); the order is the registry's iteration order.
_MODULES = (
    null, raw, file, qcow2, luks, copy_on_read, compress, throttle, preallocate,
    copy_before_write, snapshot_access, quorum, blkdebug, blkverify, blklogwrites,
)  # fmt: skip

REGISTRY: Mapping[str, Driver] = MappingProxyType(
    {d.format_name: d for m in _MODULES for d in m.DRIVERS}
)
INTERNAL: Mapping[str, Driver] = MappingProxyType(
    {d.format_name: d for d in job_filters.INTERNAL_DRIVERS}
)


def get_driver(name: str) -> Driver:
    """The registered driver called ``name``."""
    drv = REGISTRY.get(name)
    if drv is None:
        raise GenericError(f"Unknown driver: '{name}'")
    return drv
