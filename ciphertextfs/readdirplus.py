"""Which readdir replies carry their entries' attributes.

A readdirplus entry with attributes spares the reader that stats it a
lookup, but costs the view a read of its inode; an entry without (a
`fusedirent.bare_entry`) costs nothing but a lookup if it is stat'ed.
`find` and `ls -f` stat nothing they list, rsync, tar and `ls -l` stat
everything.  The daemon cannot see a reader use the attributes it was
sent (the kernel answers the stat from its cache), only the lookups of
names it was not sent attributes for; so it guesses, from those lookups,
like the kernel's READDIRPLUS_AUTO (which pyfuse3 turns off) and a little
further:

* Within a listing, a reply after the first carries attributes once the
  reader looked a name up since the previous reply (rsync stats between
  its getdents calls), and then to the end of the listing.  Every later
  reply of every listing does once a reader looked up a file that a later
  reply went without: tar reads a whole directory before it stats the
  entries, so only its first large directory costs a lookup per entry.
  A probe that finds readers that stat nothing ends that.
* The first reply of a listing carries attributes (the kernel's rule: most
  directories fit in one reply) while the readers stat what they list.
  To find out whether they still do, one listing in `PROBE_EVERY` goes
  without; if none of its entries but directories is looked up before
  `PROBE_WINDOW` more listings are opened, the readers are taken not to
  stat, and every reply goes without attributes until a lookup of a
  non-directory in a directory listed without them says otherwise.

A wrong guess costs a lookup per entry of one listing, never an answer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

PROBE_EVERY = 16
"""One listing in this many goes without attributes while readers stat."""

PROBE_WINDOW = 4
"""Listings opened after a probe before its lack of lookups counts."""

BARE_DIRS = 64
"""Directories remembered as listed without attributes, for their lookups."""


@dataclass(slots=True)
class Listing:
    """How one open directory is being read."""

    dir_ino: int
    bare_first: bool
    """Its first reply goes without attributes (a probe, or readers that do not stat)."""
    lookups: int = -1
    """`Guess.lookups` when its previous reply was sent."""
    latched: bool = False
    """The reader stats between replies: every later reply carries attributes."""


class Guess:
    """The guess for one mount; called from the event loop only."""

    def __init__(self) -> None:
        self.readers_stat = True
        self.readers_stat_later = False
        self.lookups = 0
        self._opened = 0
        self._probe_at: int | None = None
        self._bare: OrderedDict[int, bool] = OrderedDict()
        """Directories listed without attributes: whether in a reply after the first."""

    def opened(self, dir_ino: int) -> Listing:
        """A directory is opened for listing."""
        self._opened += 1
        if not self.readers_stat:
            return Listing(dir_ino, True)
        if self._probe_at is not None and self._opened - self._probe_at > PROBE_WINDOW:
            self.readers_stat = self.readers_stat_later = False
            self._probe_at = None
            return Listing(dir_ino, True)
        if self._probe_at is None and self._opened % PROBE_EVERY == 0:
            self._probe_at = self._opened
            return Listing(dir_ino, True)
        return Listing(dir_ino, False)

    def with_attributes(self, listing: Listing, first: bool) -> bool:
        """Whether the next reply of `listing` carries attributes; a reply is then sent."""
        if first:
            attrs = not listing.bare_first
        else:
            if self.lookups != listing.lookups or self.readers_stat_later:
                listing.latched = True
            attrs = listing.latched
        listing.lookups = self.lookups
        if not attrs:
            self._bare[listing.dir_ino] = self._bare.get(listing.dir_ino, False) or not first
            self._bare.move_to_end(listing.dir_ino)
            if len(self._bare) > BARE_DIRS:
                self._bare.popitem(last=False)
        return attrs

    def looked_up(self, dir_ino: int, is_dir: bool) -> None:
        """A name of `dir_ino` was looked up."""
        self.lookups += 1
        later = self._bare.get(dir_ino)
        if not is_dir and later is not None:
            self.readers_stat = True
            self._probe_at = None
            if later:
                self.readers_stat_later = True
