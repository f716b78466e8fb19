"""A small thread-safe LRU cache, bounded by entries and optionally by bytes.

The reader and the view both cache parsed objects while FUSE worker threads
read in parallel; one implementation serves both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRU:
    """A small thread-safe LRU bounded by item count (and optionally by bytes)."""

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any, size: int = 0) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None and self._max_bytes is not None:
                self._bytes -= len(old)
            self._d[key] = value
            self._bytes += size
            while len(self._d) > self._max_items or (
                self._max_bytes is not None and self._bytes > self._max_bytes and self._d
            ):
                _, dropped = self._d.popitem(last=False)
                if self._max_bytes is not None:
                    self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0
