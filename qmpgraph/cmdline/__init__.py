"""qemu-storage-daemon's command line, parsed as QEMU 7.2 parses it.

* ``keyval``: QEMU's ``key=value,...`` syntax with dotted keys, lists and an
  implied first key (``--blockdev``, ``--monitor``, ``--export``, ...), and
  the JSON form (``{...}``) accepted wherever keyval is.
* ``qemuopts``: the older QemuOpts syntax that ``--chardev`` and ``-T`` use.
* ``getopt``: GNU ``getopt_long`` over qsd's option table (abbreviations,
  ``--opt=arg``, in-order non-options) with glibc's messages.
* ``qsd``: the options themselves: processed in order, each one parsed and
  handed to an ``Applier`` (the server) before the next is read, so errors
  appear exactly where QEMU reports them.

Nothing here opens sockets or files; the caller's ``Applier`` does.
"""

from qmpgraph.cmdline.errors import CmdlineError

__all__ = ["CmdlineError"]
