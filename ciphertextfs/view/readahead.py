"""Read-ahead of small files, a directory at a time.

A backup reads a directory's files one after the other in listing order.
Read alone, each small file costs one random device read and, through FUSE,
one more round trip, most of a small file's time in the view.  So a small
file that is not at hand fetches itself and the next small files of its
directory in listing order, up to BATCH_FILES or BATCH_BYTES, with a
handful of batched device requests (`Filesystem.read_files`, several in
flight).  The batch is fetched in the
caller's thread, which waits for it with the GIL released: overlapping
the fetch with the reader's work in worker threads lost to the GIL, whose
holder delays the event loop (benchmarks/RESULTS.md).

Only a read starts any of this: listing a directory (ls, find, an
incremental rsync that reads nothing) never reads file data.  What is
fetched is keyed by what identifies an inode's contents (inode, generation,
ctime, mtime, size), so that on a live source a file changed since is read
again, and held in a byte-bounded LRU.
"""

from __future__ import annotations

import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.lru import LRU
from ciphertextfs.view.names import Listing, is_side_ino

if TYPE_CHECKING:
    from ciphertextfs.view.model import Attr

SMALL_FILE = 64 << 10
"""Files up to this view size are read ahead with their directory's others."""

BATCH_BYTES = 4 << 20
"""File bytes one batch fetches, at most."""

BATCH_FILES = 1024
"""Files one batch fetches, at most."""

SCAN = 4096
"""Directory entries one batch looks at, at most, for small files."""

GAP = 32 << 10
"""Unwanted bytes between two small files that a batched read still reads over."""

SPAN = 1 << 20
"""The longest single device request of a batch."""

CACHE_BYTES = 16 << 20
"""Bytes of read-ahead small files held, least recently used out."""

PARENT_HINTS = 1 << 18
"""Entries whose directory and position are remembered."""

UNINDEXED_MAX = 4096
"""Listings noted but not yet indexed that are remembered (the newest)."""


def contents_key(ino: int, attr: Attr) -> tuple[int, int, int, int, int]:
    return (ino, attr.generation, attr.st_ctime_ns, attr.st_mtime_ns, attr.st_size)


def is_small(attr: Attr) -> bool:
    return stat.S_ISREG(attr.st_mode) and 0 < attr.st_size <= SMALL_FILE


class ReadAhead:
    """Small-file read-ahead for one view.

    `attr(ino)` and `inode(ino)` are the view's own (cached) lookups;
    `listing(dir_ino)` answers a cached listing or None, never reading one.
    """

    def __init__(
        self,
        fs: Filesystem,
        attr: Callable[[int], Attr],
        inode: Callable[[int], Inode],
        listing: Callable[[int], Listing | None],
    ) -> None:
        self._fs = fs
        self._attr = attr
        self._inode = inode
        self._listing = listing
        self._cache = LRU(65536, CACHE_BYTES)
        # Keys a batch already tried: one that came back without them
        # (inline data, a journal-patched image, damage) must not make every
        # later read rescan the directory.
        self._tried = LRU(65536)
        # ino -> (directory, position in its listing); a plain dict, emptied
        # when full, is cheaper than an LRU insertion per entry.  Filled
        # from `_unindexed`, the directories listed since, only when a read
        # needs it: a walk that reads nothing (find, ls, an unchanged
        # rsync) never pays for it.
        self._parents: dict[int, tuple[int, int]] = {}
        self._unindexed: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def note_listing(self, dir_ino: int) -> None:
        """Remember that `dir_ino` was listed afresh: a read may look its entries up."""
        with self._lock:
            self._unindexed[dir_ino] = None
            self._unindexed.move_to_end(dir_ino)
            if len(self._unindexed) > UNINDEXED_MAX:
                self._unindexed.popitem(last=False)

    def _where(self, ino: int) -> tuple[int, int] | None:
        """(directory, position) of `ino`, indexing the listings noted since, newest first."""
        with self._lock:
            where = self._parents.get(ino)
            while where is None and self._unindexed:
                dir_ino, _ = self._unindexed.popitem()
                listing = self._listing(dir_ino)
                if listing is None:
                    continue
                if len(self._parents) + len(listing.entries) > PARENT_HINTS:
                    self._parents.clear()
                self._parents.update((e.ino, (dir_ino, i)) for i, e in enumerate(listing.entries))
                where = self._parents.get(ino)
            return where

    def clear(self) -> None:
        """Forget everything fetched (a live source's caches expired)."""
        self._cache.clear()
        self._tried.clear()
        with self._lock:
            self._parents.clear()
            self._unindexed.clear()

    def forget(self, ino: int, attr: Attr) -> None:
        """Forget what was fetched of `ino` as it was when it had `attr` (it changed since)."""
        key = contents_key(ino, attr)
        self._cache.pop(key)
        self._tried.pop(key)

    def contents(self, ino: int, attr: Attr) -> bytes | None:
        """The whole view contents of small file `ino`, fetched with its neighbours if need be."""
        key = contents_key(ino, attr)
        data = self._cache.get(key)
        if data is None and self._tried.get(key) is None:
            where = self._where(ino)
            if where is not None:
                self._batch(*where)
                data = self._cache.get(key)
        return data

    def _batch(self, dir_ino: int, start: int) -> None:
        """Fetch the small files of `dir_ino` from listing position `start` on."""
        listing = self._listing(dir_ino)
        if listing is None:
            return
        entries = listing.entries
        wanted: list[tuple[Inode, int]] = []
        keys: dict[int, tuple[int, ...]] = {}
        total = 0
        for position in range(start, min(len(entries), start + SCAN)):
            child = entries[position].ino
            if child in keys or is_side_ino(child):
                continue
            try:
                a = self._attr(child)
                if not is_small(a):
                    continue
                key = contents_key(child, a)
                if self._cache.get(key) is not None or self._tried.get(key) is not None:
                    continue
                wanted.append((self._inode(child), a.st_size))
            except Exception:  # noqa: BLE001 - its own read reports it
                continue
            keys[child] = key
            total += a.st_size
            if total >= BATCH_BYTES or len(wanted) >= BATCH_FILES:
                break
        for key in keys.values():
            self._tried.put(key, True)
        got = self._fs.read_files(wanted, max_gap=GAP, max_span=SPAN)
        for child, data in got.items():
            self._cache.put(keys[child], data, len(data))
