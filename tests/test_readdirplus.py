"""The guess of which readdir replies carry attributes, fed the request patterns of real readers.

The mounted counterpart, with the kernel's own count of the lookups, is
tests/test_fuse_view.py::test_listings_carry_attributes_only_for_readers_that_stat.
"""

from __future__ import annotations

from ciphertextfs.readdirplus import PROBE_EVERY, PROBE_WINDOW, Guess

FILE, DIR = False, True


def _list(guess: Guess, dir_ino: int, replies: int, stat_between: bool = False) -> list[bool]:
    """One listing of `replies` replies; which carried attributes."""
    how = guess.opened(dir_ino)
    sent = []
    for i in range(replies):
        sent.append(guess.with_attributes(how, i == 0))
        if stat_between and not sent[-1]:
            guess.looked_up(dir_ino, FILE)
    return sent


def test_a_walk_that_stats_nothing_soon_gets_names_alone() -> None:
    guess = Guess()
    firsts = [_list(guess, d, 1)[0] for d in range(1, 200)]
    assert guess.readers_stat is False
    # Every listing before the first probe, and those in its window, carried attributes.
    assert firsts[: PROBE_EVERY - 1] == [True] * (PROBE_EVERY - 1)
    assert firsts[PROBE_EVERY - 1] is False
    assert all(firsts[PROBE_EVERY : PROBE_EVERY + PROBE_WINDOW])
    assert not any(firsts[PROBE_EVERY + PROBE_WINDOW :])


def test_directory_lookups_are_no_evidence_of_stat() -> None:
    """find looks up every directory it descends into; that is not a stat of what it listed."""
    guess = Guess()
    for d in range(1, 200):
        _list(guess, d, 1)
        guess.looked_up(d, DIR)
    assert guess.readers_stat is False


def test_a_reader_that_stats_keeps_attributes() -> None:
    guess = Guess()
    bare = 0
    for d in range(1, 500):
        sent = _list(guess, d, 1)
        if not sent[0]:
            bare += 1
            guess.looked_up(d, FILE)  # tar, after the listing
    assert guess.readers_stat is True
    assert bare == 499 // PROBE_EVERY


def test_a_stat_after_names_alone_brings_attributes_back() -> None:
    guess = Guess()
    for d in range(1, 100):
        _list(guess, d, 1)
    assert guess.readers_stat is False
    assert _list(guess, 100, 1) == [False]
    guess.looked_up(100, FILE)
    assert guess.readers_stat is True
    assert _list(guess, 101, 1) == [True]
    guess.looked_up(999, FILE)  # a directory never listed without attributes: no news
    assert guess.readers_stat is True


def test_a_reader_that_stats_between_replies_latches_them() -> None:
    guess = Guess()
    assert _list(guess, 1, 6, stat_between=True) == [True, False, True, True, True, True]
    assert _list(guess, 2, 4) == [True, True, True, True]


def test_listing_alone_gets_names_after_the_first_reply() -> None:
    """ls -f of a large directory, on a fresh mount."""
    guess = Guess()
    assert _list(guess, 1, 5) == [True, False, False, False, False]
    assert _list(guess, 2, 5) == [True, False, False, False, False]
    guess.looked_up(1, DIR)
    assert _list(guess, 3, 3) == [True, False, False]


def test_a_reader_that_stats_after_the_listing_gets_attributes_from_its_next_one() -> None:
    """tar: the whole directory, then a stat of each entry."""
    guess = Guess()
    assert _list(guess, 1, 5) == [True, False, False, False, False]
    guess.looked_up(1, FILE)
    assert guess.readers_stat_later is True
    assert _list(guess, 2, 5) == [True] * 5


def test_a_walk_that_stats_nothing_ends_attributes_for_later_replies() -> None:
    guess = Guess()
    _list(guess, 1, 3)
    guess.looked_up(1, FILE)
    for d in range(2, 100):
        _list(guess, d, 1)
    assert (guess.readers_stat, guess.readers_stat_later) == (False, False)
    assert _list(guess, 100, 3) == [False, False, False]


def test_lookups_of_another_reader_latch_too() -> None:
    """Any lookup between two replies latches: a wrong guess only costs the view inode reads."""
    guess = Guess()
    how = guess.opened(1)
    assert guess.with_attributes(how, True)
    assert not guess.with_attributes(how, False)
    guess.looked_up(7, DIR)
    assert guess.with_attributes(how, False)
