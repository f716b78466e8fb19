"""Where large reads are answered: threads until the device proves fast, then the loop."""

from __future__ import annotations

from ciphertextfs.readplace import FAST, PROOF, ReadPlace


def test_reads_start_in_threads_and_move_to_the_loop_after_a_fast_streak() -> None:
    place = ReadPlace()
    placed = []
    for _ in range(PROOF + 2):
        placed.append(place.in_loop)
        place.took(FAST / 2)
    assert placed == [False] * PROOF + [True] * 2


def test_one_slow_read_sends_the_next_back_to_threads_until_a_new_streak() -> None:
    place = ReadPlace()
    for _ in range(PROOF):
        place.took(FAST)
    assert place.in_loop
    place.took(FAST * 2)
    assert not place.in_loop
    for _ in range(PROOF - 1):
        place.took(0.0)
    assert not place.in_loop
    place.took(0.0)
    assert place.in_loop


def test_a_slow_read_within_a_streak_starts_it_over() -> None:
    place = ReadPlace()
    for _ in range(PROOF - 1):
        place.took(0.0)
    place.took(1.0)
    place.took(0.0)
    assert not place.in_loop
