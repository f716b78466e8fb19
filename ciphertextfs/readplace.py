"""Where the adapter answers large reads: worker threads, or the event loop.

A large read in a worker thread lets the loop answer everyone else while
the device works, which matters when the device is slow or stalls (a
failing disk retrying, a busy SAN).  But each hand-off wakes a thread and
then the loop again, and on a virtual machine each wake-up of an idle CPU
costs tens of microseconds: from a fast device a 1 MiB read answered in
the loop costs the daemon markedly less CPU, and the backup less time
(benchmarks/RESULTS.md, "Large reads in the event loop").

So large reads start in threads, move to the loop once `PROOF` of them in
a row were each answered within `FAST` seconds, and go back to threads as
soon as one takes longer.  A device that stalls holds the loop for one
read at most, and only after it was fast.
"""

from __future__ import annotations

FAST = 5e-3
"""Seconds within which a large read counts as answered by a fast device."""

PROOF = 16
"""Fast large reads in a row that move the next ones into the event loop."""


class ReadPlace:
    """The running record of how long large reads took."""

    def __init__(self, fast: float = FAST, proof: int = PROOF) -> None:
        self._fast = fast
        self._proof = proof
        self._streak = 0

    @property
    def in_loop(self) -> bool:
        """Whether the next large read is answered in the event loop."""
        return self._streak >= self._proof

    def took(self, seconds: float) -> None:
        """A large read was answered (or failed) `seconds` after its handler began."""
        self._streak = self._streak + 1 if seconds <= self._fast else 0
