"""readdirplus entries without attributes, which pyfuse3 has no way to send.

pyfuse3 answers every readdir with readdirplus (it turns FUSE's
READDIRPLUS_AUTO off), so each entry of a reply carries its inode's
attributes, and the view would read every inode of a directory that
`ls -f` or `find` only wants the names of.  The kernel accepts a
readdirplus entry whose node id is 0: it hands the reader the name, d_ino
and d_type and links no dentry ("the userspace filesystem did not want to
return attributes/handle for this entry", fs/fuse/readdir.c,
fuse_direntplus_link), so a later stat of that name is a LOOKUP like any
other, and nothing is to be forgotten.

libfuse takes d_ino from the entry's attributes (`attr.st_ino`) and the
node id from the entry itself (`fuse_entry_param.ino`), but pyfuse3's
EntryAttributes sets both from `st_ino`.  `bare_entry` sets `st_ino`, then
clears the node id in the object's own fuse_entry_param, at an offset a
probe finds when this module is loaded: it sets distinctive values through
pyfuse3's setters and looks for the layout fuse_entry_param must have (ino,
generation, then struct stat's st_dev and st_ino) in the object's memory.
Where the layout is not found, `bare_entry` is None and the adapter sends
every entry with its attributes.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

import pyfuse3

_INO_MARK = 0x5EED_1A2B_3C4D_5E6F
_GENERATION_MARK = 0x0BAD_F00D_CAFE_D00D
_U64 = struct.Struct("=Q")


def _nodeid_offset() -> int | None:
    """Where an EntryAttributes object holds fuse_entry_param.ino, or None."""
    probe = pyfuse3.EntryAttributes()
    probe.st_ino = _INO_MARK
    probe.generation = _GENERATION_MARK
    raw = ctypes.string_at(id(probe), type(probe).__basicsize__)
    head = _U64.pack(_INO_MARK) + _U64.pack(_GENERATION_MARK)
    at = raw.find(head)
    if at < 0 or raw.find(head, at + 1) >= 0:
        return None
    st_ino = at + len(head) + _U64.size  # after struct stat's st_dev
    if raw[st_ino : st_ino + _U64.size] != _U64.pack(_INO_MARK):
        return None
    ctypes.c_uint64.from_address(id(probe) + at).value = 0
    if probe.st_ino != 0:
        return None
    return at


def _make_bare_entry(offset: int) -> Callable[[int, int], pyfuse3.EntryAttributes]:
    def bare_entry(ino: int, ifmt: int) -> pyfuse3.EntryAttributes:
        """An entry that lists `ino` with the file type `ifmt` (S_IFMT bits) and links no dentry."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = ifmt
        ctypes.c_uint64.from_address(id(e) + offset).value = 0
        return e

    return bare_entry


_offset = _nodeid_offset()
bare_entry: Callable[[int, int], pyfuse3.EntryAttributes] | None = (
    None if _offset is None else _make_bare_entry(_offset)
)
