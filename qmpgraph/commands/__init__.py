"""QMP command handlers, one module per command family, and the dispatcher.

Importing this package registers every implemented command.
"""

from qmpgraph.commands import amend as amend
from qmpgraph.commands import backup as backup
from qmpgraph.commands import bitmaps as bitmaps
from qmpgraph.commands import block as block
from qmpgraph.commands import chardev as chardev
from qmpgraph.commands import commit as commit
from qmpgraph.commands import core as core
from qmpgraph.commands import create as create
from qmpgraph.commands import exports as exports
from qmpgraph.commands import iothread as iothread
from qmpgraph.commands import jobs as jobs
from qmpgraph.commands import mirror as mirror
from qmpgraph.commands import qom as qom
from qmpgraph.commands import qom_types as qom_types
from qmpgraph.commands import query as query
from qmpgraph.commands import quorum as quorum
from qmpgraph.commands import reopen as reopen
from qmpgraph.commands import resize as resize
from qmpgraph.commands import snapshot as snapshot
from qmpgraph.commands import snapshot_internal as snapshot_internal
from qmpgraph.commands import stream as stream
from qmpgraph.commands import transaction as transaction
from qmpgraph.commands.query import blockstats as blockstats
from qmpgraph.commands.registry import REGISTRY as REGISTRY
