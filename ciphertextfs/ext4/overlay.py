"""The journal overlay: the blocks a jbd2 replay would write, held in memory.

The source is opened read-only and never written, so a filesystem whose
journal needs recovery is read as if the replay had happened: every block
read looks here first, metadata by block number and file data by physical
run.  An empty overlay (the common case) costs one truth test per read.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping as MappingABC


class JournalOverlay:
    """Replayed blocks by physical block number, each exactly one block long."""

    def __init__(self, block_size: int, blocks: MappingABC[int, bytes] | None = None) -> None:
        self.block_size = block_size
        self._blocks: dict[int, bytes] = dict(blocks or {})
        self._keys = sorted(self._blocks)

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def __contains__(self, pblk: int) -> bool:
        return pblk in self._blocks

    def get(self, pblk: int) -> bytes | None:
        return self._blocks.get(pblk)

    def patch(
        self, out: bytearray, out_offset: int, lblk: int, pblk: int, count: int, lo: int, hi: int
    ) -> None:
        """Copy replayed blocks of one physical run into file bytes [lo, hi) of `out`.

        The run maps logical blocks lblk.. onto physical blocks pblk..pblk+count;
        `out` holds the file from byte `out_offset`.
        """
        bs = self.block_size
        keys = self._keys
        j = bisect.bisect_left(keys, pblk)
        while j < len(keys) and keys[j] < pblk + count:
            blk = keys[j]
            j += 1
            bstart = (lblk + blk - pblk) * bs
            a, b = max(bstart, lo), min(bstart + bs, hi)
            if b > a:
                out[a - out_offset : b - out_offset] = self._blocks[blk][a - bstart : b - bstart]
