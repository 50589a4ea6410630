"""Dirty bitmaps: the bitmap model, which node holds which, and write tracking.

Modules:

* ``model``: ``DirtyBitmap`` (QEMU's BdrvDirtyBitmap over an HBitmap laid out
  as QEMU lays it out, so the sha256 matches);
* ``registry``: each node's bitmaps, the undo records every change goes
  through (a backup's successor and its abdication too), ``mark_dirty`` for
  the write path and the digest source;
* ``checks``: bdrv_dirty_bitmap_check, QEMU's busy / read-only /
  inconsistent refusals for every user of a bitmap.

This package is synchronous and imports no trio.  What does not live here:
the QMP commands and transaction actions (``qmpgraph.commands.bitmaps``),
persistent bitmaps in qcow2 images (``qmpgraph.drivers.qcow2_bitmaps``).
"""

from qmpgraph.bitmaps.model import MAX_NAME_SIZE as MAX_NAME_SIZE
from qmpgraph.bitmaps.model import DirtyBitmap as DirtyBitmap
from qmpgraph.bitmaps.registry import bitmaps_of as bitmaps_of
from qmpgraph.bitmaps.registry import find as find
from qmpgraph.bitmaps.registry import mark_dirty as mark_dirty
