"""Character devices: QEMU 7.2's chardev objects as qemu-storage-daemon builds them.

* ``model``: the ``Chardev`` QOM object, the per-daemon ``ChardevTable``
  (``/chardevs`` in the QOM tree), the simple backends (ringbuf/memory, null,
  file, pipe, stdio, serial, parallel, pty, udp, mux).
* ``data``: the bytes of ``ringbuf-read``/``ringbuf-write`` (QEMU's UTF-8
  and base64 handling).
* ``socket``: the ``socket`` backend (Unix and TCP, server or client), whose
  connection state a trio task keeps current.

What does not live here: the QMP commands (``qmpgraph.commands.chardev``),
``--chardev`` parsing (``qmpgraph.cmdline.chardev``), and the sockets of
command-line chardevs that serve QMP (``qmpgraph.server.startup``).
"""
