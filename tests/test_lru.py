"""The LRU's byte accounting, which bounds the read-ahead and block caches."""

from __future__ import annotations

from ciphertextfs.lru import LRU


def test_replace_takes_off_the_size_it_was_charged() -> None:
    c = LRU(10, max_bytes=100)
    c.put("a", b"x" * 10, 50)
    c.put("a", b"y", 1)
    assert c.bytes == 1 and len(c) == 1 and c.get("a") == b"y"


def test_eviction_takes_off_the_size_it_was_charged() -> None:
    c = LRU(10, max_bytes=100)
    c.put("a", "v", 60)  # a value whose len() is not its size
    c.put("b", "w", 60)
    assert c.get("a") is None and c.get("b") == "w"
    assert c.bytes == 60
    c.clear()
    assert c.bytes == 0 and len(c) == 0


def test_bounded_by_items_and_least_recently_used_goes_first() -> None:
    c = LRU(2)
    c.put(1, "one")
    c.put(2, "two")
    assert c.get(1) == "one"  # 2 is now the oldest
    c.put(3, "three")
    assert c.get(2) is None and c.get(1) == "one" and c.get(3) == "three"


def test_none_can_be_cached() -> None:
    c = LRU(4)
    miss = object()
    assert c.get("k", miss) is miss
    c.put("k", None)
    assert c.get("k", miss) is None
