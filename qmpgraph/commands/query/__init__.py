"""Block queries: ``query-named-block-nodes``, ``query-block``, ``x-debug-query-block-graph``.

Modules:

* ``facts``: what the queries read outside the graph (file stats, qcow2
  header features) and its caches;
* ``filenames``: ``bdrv_refresh_filename`` (``Filenames``, ``Names``);
* ``image_info``: ``bdrv_query_image_info`` (``Query``, ``node_length``);
* ``device_info``: BlockDeviceInfo and the two per-node commands;
* ``graph_dump``: ``x-debug-query-block-graph``.

Importing this package registers the three commands.  Other command modules
use ``Query`` (a node's refreshed filename) and ``node_length``
(``bdrv_getlength``).  What does not live here: graph-changing commands
(``block.py`` and the other command modules).
"""

from qmpgraph.commands.query import device_info as device_info
from qmpgraph.commands.query import graph_dump as graph_dump
from qmpgraph.commands.query.filenames import Names as Names
from qmpgraph.commands.query.image_info import Query as Query
from qmpgraph.commands.query.image_info import node_length as node_length
