"""The NBD protocol, sans-IO: bytes in, events and bytes out; no sockets, no trio.

* ``constants``: the protocol's magic numbers, flags, option/command/reply
  codes, QEMU's names for them (used in its error texts) and its errno mapping.
* ``wire``: encoders of option replies, simple replies and structured reply
  chunks.
* ``server``: ``ServerConnection``, one client's state machine (fixed
  newstyle handshake, option haggling, transmission-phase request parsing
  and validation in QEMU 7.2's order).

What does not live here: executing requests against the block graph
(``qmpgraph.io``), sockets and tasks (``qmpgraph.server.nbd``), the QMP
commands that manage exports (``qmpgraph.commands.exports``).
"""
