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


def test_a_value_bigger_than_the_bound_evicts_the_others_and_stays_alone() -> None:
    c = LRU(10, max_bytes=100)
    c.put("a", "small", 40)
    c.put("b", "old", 30)
    c.put("b", "huge", 101)
    assert c.get("b") == "huge" and c.get("a") is None
    assert c.bytes == 101 and len(c) == 1
    c.put("c", "next", 60)
    assert c.get("b") is None and c.get("c") == "next" and c.bytes == 60


def test_many_big_values_stay_below_the_byte_bound() -> None:
    c = LRU(1000, max_bytes=1000)
    for i in range(200):
        c.put(i, i, 37 + i % 50)
        assert c.bytes <= 1000
    held = [k for k in range(200) if c.get(k) is not None]
    assert held == list(range(200 - len(held), 200)), "the newest are kept"
    assert c.bytes == sum(37 + k % 50 for k in held)
    assert c.bytes + 37 + (200 - len(held) - 1) % 50 > 1000, "evicted no more than needed"
