"""I/O through the block graph (async): requests enter at a BlockBackend and
walk down the node's drivers to real files.

* ``request``: block-status flags and ``BlockIOError`` (an errno with text).
* ``hooks``: the per-driver I/O hooks (``IOHook``) and their registry
  ``IO_HOOKS``: file, raw, null-co/null-aio and pass-through filters.
* ``backend``: ``BackendIO``, the entry point for a BlockBackend's root edge
  (bounds and permission checks, as ``blk_co_*``).

Plugging in another driver (e.g. qcow2 over ``qmpgraph.drivers.qcow2_io``):
subclass ``IOHook``, implement the async methods by calling the synchronous
library (wrap its file access so that it reads and writes through the child
edge with ``child_io(edge)``), and call ``register_hook("qcow2", hook)``.
A hook never touches sockets; it may run blocking work in a thread.

What does not live here: the graph and its permission rules
(``qmpgraph.graph``), NBD (``qmpgraph.nbd``, ``qmpgraph.server.nbd``).
"""
