"""A small thread-safe LRU cache, bounded by entries and optionally by bytes.

The reader and the view both cache parsed objects while FUSE worker threads
read in parallel; one implementation serves both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

_MISSING = object()


class LRU:
    """A small thread-safe LRU bounded by item count (and optionally by bytes).

    Each entry is charged the `size` given when it was put, and exactly that
    is taken off again when it is replaced or evicted, so the byte count
    always equals what is held.  Any value may be cached, None included:
    `get` tells a miss by its `default`.  The value just put is always
    kept: one charged more than the whole byte bound evicts every other and
    stays alone, so a caller that needs it again soon (a directory bigger
    than the bound, still being read) finds it, and what is held never
    exceeds the bound or that one value.
    """

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self._d: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        # No lock: each OrderedDict call is atomic (it holds the GIL, or
        # the dict's own lock in a free-threaded build), and the byte count
        # that the lock keeps consistent is not touched.  A key evicted
        # between the two calls was still a hit.
        item = self._d.get(key, _MISSING)
        if item is _MISSING:
            return default
        try:
            self._d.move_to_end(key)
        except KeyError:
            pass
        return item[0]

    def missing(self, keys: Iterable[Hashable]) -> list[Hashable]:
        """The keys not held, in order (a test of membership: nothing is refreshed)."""
        d = self._d
        return [k for k in keys if k not in d]

    def put(self, key: Hashable, value: Any, size: int = 0) -> None:
        with self._lock:
            self._insert(key, value, size)
            self._evict()

    def put_many(self, items: list[tuple[Hashable, Any]]) -> None:
        """Put several (key, value) pairs of size 0 under one lock."""
        with self._lock:
            for key, value in items:
                self._insert(key, value, 0)
            self._evict()

    def _insert(self, key: Hashable, value: Any, size: int) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._d[key] = (value, size)
        self._bytes += size

    def _evict(self) -> None:
        """Drop the least recently used until within both bounds, keeping the newest."""
        d = self._d
        while len(d) > 1 and (
            len(d) > self._max_items
            or (self._max_bytes is not None and self._bytes > self._max_bytes)
        ):
            _, (_value, dropped) = d.popitem(last=False)
            self._bytes -= dropped

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove `key` (a live source changed it) and answer its value, or `default`."""
        with self._lock:
            item = self._d.pop(key, _MISSING)
            if item is _MISSING:
                return default
            self._bytes -= item[1]
            return item[0]

    def keys(self) -> list[Hashable]:
        """A snapshot of the keys held, least recently used first."""
        with self._lock:
            return list(self._d)

    @property
    def bytes(self) -> int:
        """The sizes charged for what is held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0
