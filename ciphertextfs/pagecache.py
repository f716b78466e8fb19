"""The page cache a backup leaves behind: bounded, for the FUSE adapter.

View files use the page cache (see ciphertextfs.fuse), so a full backup
would otherwise push the host's working set out of memory.  `PageCacheBudget`
counts what is read through the view and, every `window` bytes, drops the
cached pages of every file read meanwhile, in one batch: dropping per file
on close costs a thread hand-off per file, as much as the read itself for
small files.

Threads: `account` runs in the trio event loop only, and only it touches
`_inodes` and `_bytes`.  The set of a full window is handed, whole, to one
worker thread at a time (`_limiter`), which calls `pyfuse3.invalidate_inode`
for each member; the loop never touches a set once handed over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyfuse3
import trio

log = logging.getLogger("ciphertextfs")


class PageCacheBudget:
    """Drop the pages of the files read, every `window` bytes read through the view.

    `to_node` maps a view inode to its FUSE node id (it may raise for an
    inode the kernel cannot know: that one is skipped).
    """

    def __init__(self, window: int, to_node: Callable[[int], int]) -> None:
        self.window = window
        self._to_node = to_node
        self._inodes: set[int] = set()
        self._bytes = 0
        self._limiter = trio.CapacityLimiter(1)

    def account(self, ino: int, nbytes: int) -> None:
        """`nbytes` of `ino` now in the page cache (event loop only)."""
        self._inodes.add(ino)
        self._bytes += nbytes
        if self._bytes >= self.window:
            inodes, self._inodes, self._bytes = self._inodes, set(), 0
            self._drop_soon(inodes)

    def _drop_soon(self, inodes: set[int]) -> None:
        """Drop the kernel's cached pages of `inodes` without waiting for it.

        Invalidation waits for pages still locked by readahead, whose data
        the event loop has yet to send: it must run in a thread, never in a
        request handler.
        """
        trio.lowlevel.spawn_system_task(self._drop, inodes)

    async def _drop(self, inodes: set[int]) -> None:
        await trio.to_thread.run_sync(
            self._invalidate, inodes, limiter=self._limiter, abandon_on_cancel=True
        )

    def _invalidate(self, inodes: set[int]) -> None:
        """In a worker thread: the set is this thread's alone."""
        for ino in inodes:
            try:
                pyfuse3.invalidate_inode(self._to_node(ino), False)
            except Exception as e:  # noqa: BLE001 - a missed invalidation only costs memory
                log.debug("cannot drop cached pages of inode %d: %s", ino, e)
