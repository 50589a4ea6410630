"""qmpgraph: a stateful, QEMU-exact stand-in for qemu-storage-daemon's QMP control plane.

The package holds the sans-IO QMP protocol core (``protocol``), the trio server
(``server``), the schema data and validators (``schema``), the command handlers
(``commands``), the block graph (``graph``), its transaction engine
(``transactions``) and the block drivers (``drivers``).
"""

__version__ = "0.1.0"

#: The QEMU release whose behaviour qmpgraph reproduces (reported by query-version).
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 22}
