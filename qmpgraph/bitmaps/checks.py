"""bdrv_dirty_bitmap_check: whether an operation may use or change a bitmap.

One place for QEMU's three refusals and their exact wording, for every
caller (bitmap commands, NBD exports, backup, copy-before-write): busy, then
read-only, then inconsistent.  QEMU appends a hint to the inconsistent error
("Try block-dirty-bitmap-remove ..."); QMP replies carry no hints, so it is
not part of the message.

What does not live here: the lookups (``qmpgraph.commands.bitmaps``), the
bitmap itself (``model.py``).
"""

from __future__ import annotations

from qmpgraph.bitmaps.model import DirtyBitmap
from qmpgraph.errors import GenericError

# BDRV_BITMAP_* check flags.
BUSY = 1
RO = 2
INCONSISTENT = 4
DEFAULT = BUSY | RO | INCONSISTENT
ALLOW_RO = BUSY | INCONSISTENT


def check(bm: DirtyBitmap, flags: int) -> None:
    """Raise QEMU's error when ``bm`` fails one of the ``flags`` checks."""
    if flags & BUSY and bm.busy:
        raise GenericError(
            f"Bitmap '{bm.name}' is currently in use by another operation and cannot be used"
        )
    if flags & RO and bm.readonly:
        raise GenericError(f"Bitmap '{bm.name}' is readonly and cannot be modified")
    if flags & INCONSISTENT and bm.inconsistent:
        raise GenericError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")
