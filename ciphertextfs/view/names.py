"""The names a directory shows in the view.

Inside an encrypted directory the view shows exactly the no-key names the
mainline kernel shows while the directory is locked, so that `ls -a` of
both agree and a backup can be matched against the live system.  The kernel
puts the directory hash into those names, computed as its readdir does:
zeros when it reads the directory linearly, otherwise the ext4 hash of the
ciphertext name (or the hash stored beside the name in encrypted+casefolded
directories).

No-key names of long ciphertext names (`fscrypt.nokey.is_long`) keep only a
SHA-256 of the tail, so the full names of such entries go into one side file per
directory (see docs/FORMAT.md), together with the targets of encrypted
symlinks too long for a view target.  The side file is the first entry of
the listing, so that tar, bsdtar and cp write it before the entries that
need it and a restore reads an archive in one pass.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from typing import NamedTuple

from ciphertextfs.ext4.directory import IndexInconclusive
from ciphertextfs.ext4.dirent import EXT4_FT_SYMLINK, EXT4_FT_UNKNOWN, DirEntry, file_type_ifmt
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.ext4.superblock import INCOMPAT_ENCRYPT
from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import is_long, nokey_name_bytes, parse_nokey_name
from ciphertextfs.view.symlinks import SymlinkTargets
from ciphertextfs.viewformat import (
    SIDE_FILE_NAME,
    SYMLINK_INLINE_MAX,
    encode_side_file,
    symlink_inline_bound,
)

log = logging.getLogger("ciphertextfs")

SIDE_INO_BASE = 1 << 32
"""Side file of directory d has inode number SIDE_INO_BASE + d: above every
32-bit ext4 inode number, and the same on every mount (incremental backups)."""


LISTING_ENTRY_BYTES = 192
"""What CPython holds per listed entry besides the name's bytes: the Entry,
the name's bytes object, the inode number, a dict slot and a tuple slot (the
file type is one of the small ints CPython shares)."""


class Entry(NamedTuple):
    """One name of a listing (a tuple: one per entry, and cheap to build)."""

    name: bytes
    ino: int
    ifmt: int
    """The S_IFMT bits of the inode's mode, as the directory entry gives them: a
    listing without attributes shows them (getdents' d_type); 0 when unknown."""


@dataclass(frozen=True, slots=True)
class Listing:
    """One directory as the view shows it."""

    entries: tuple[Entry, ...]
    by_name: dict[bytes, int]
    side_file: bytes | None
    """Contents of the long-name side file, or None when the directory needs none."""
    damage: tuple[str, ...] = ()
    """What could not be read of the directory: its listing is incomplete."""


def listing_bytes(listing: Listing) -> int:
    """The approximate memory a listing holds, what a cache bounded in bytes charges."""
    names = sum(len(e.name) for e in listing.entries)
    side = len(listing.side_file) if listing.side_file is not None else 0
    return names + LISTING_ENTRY_BYTES * len(listing.entries) + side


def side_file_ino(dir_ino: int) -> int:
    return SIDE_INO_BASE + dir_ino


def is_side_ino(ino: int) -> bool:
    return ino >= SIDE_INO_BASE


def list_directory(
    fs: Filesystem, dir_inode: Inode, dir_ino: int, targets: SymlinkTargets
) -> Listing:
    """Build the view's listing of one directory.

    Raises the ext4 layer's CorruptError when the directory itself cannot be
    read; a directory partly damaged lists its sound entries and records the
    damage, which the adapter reports after them; a duplicate name (only a
    damaged directory has one) keeps its first entry and is logged.
    """
    raw, damage = fs.read_dir_checked(dir_inode)
    for msg in damage:
        log.error("bad directory: %s; the listing of inode %d fails with EIO", msg, dir_ino)
    entries: list[Entry] = []
    by_name: dict[bytes, int] = {}
    long_names: list[tuple[bytes, bytes]] = []

    if dir_inode.is_encrypted:
        readdir_hash = fs.readdir_hash(dir_inode)
        for de in raw:
            name = nokey_name_bytes(de.name, *readdir_hash(de))
            if is_long(len(de.name)):
                long_names.append((name, de.name))
            _add(entries, by_name, name, de, dir_ino)
    else:
        for de in raw:
            _add(entries, by_name, _presentable(de.name, dir_ino), de, dir_ino)
    long_links = _long_symlinks(fs, raw, targets)

    side = None
    if long_names or long_links:
        side = encode_side_file(long_names, long_links)
        if SIDE_FILE_NAME in by_name:
            # Only an unencrypted directory can hold that name itself.
            log.error(
                "directory inode %d: holds a %s of its own; the long encrypted symlinks "
                "in it cannot be restored",
                dir_ino,
                SIDE_FILE_NAME.decode(),
            )
            side = None
        else:
            by_name[SIDE_FILE_NAME] = side_file_ino(dir_ino)
            entries.insert(0, Entry(SIDE_FILE_NAME, side_file_ino(dir_ino), stat.S_IFREG))
    return Listing(tuple(entries), by_name, side, tuple(damage))


def lookup_in_index(fs: Filesystem, dir_inode: Inode, name: bytes) -> int | None:
    """The inode the listing would give `name`, found through the htree.

    Only a hit is an answer: a candidate counts only if the listing would
    show exactly `name` for it.  None means the index does not have it,
    IndexInconclusive that the index cannot be asked (the side file, names
    the listing rewrites, directories the index cannot serve, damage); in
    both cases only the listing can say ENOENT or, in a damaged directory,
    EIO.  In an encrypted directory `name` is a no-key name: a short one
    carries the whole ciphertext name, which is hashed as the kernel does;
    a long one only its prefix, a SHA-256 of the rest and the hash to probe
    with.
    """
    if name == SIDE_FILE_NAME or b"%2F" in name or b"%00" in name:
        raise IndexInconclusive("a name only the listing knows")
    if not dir_inode.is_encrypted:
        found = fs.dx_find(dir_inode, name, None, lambda de: de.name == name)
        return None if found is None else found.inode
    try:
        nk = parse_nokey_name(name)
    except FscryptError:
        return None
    if nk.hash & 1 and not dir_inode.is_casefold:
        return None  # ext4 clears that bit of every hash it computes; probing with it scans on
    readdir_hash = fs.readdir_hash(dir_inode)
    want = (nk.hash, nk.minor_hash)

    def match(de: DirEntry) -> bool:
        return nk.matches(de.name) and readdir_hash(de) == want

    if nk.sha256 is None:
        found = fs.dx_find(dir_inode, nk.prefix, None, match)
    else:
        found = fs.dx_find(dir_inode, None, nk.hash, match)
    return None if found is None else found.inode


def _long_symlinks(fs: Filesystem, raw: list, targets: SymlinkTargets) -> dict[int, bytes]:
    """Inline targets of the encrypted symlinks too long for a view target, by inode.

    Only a symlink whose i_size could hold such a target is read (its body
    is i_size bytes: the ciphertext is shorter); a symlink that cannot be
    read is left out: it answers EIO on its own.
    """
    if not fs.sb.has_incompat(INCOMPAT_ENCRYPT):
        return {}
    candidates = sorted(
        {de.inode for de in raw if de.file_type in (EXT4_FT_SYMLINK, EXT4_FT_UNKNOWN)}
    )
    links = [
        inode
        for inode in fs.inodes(candidates)
        if inode is not None
        and inode.is_symlink
        and inode.is_encrypted
        and symlink_inline_bound(inode.i_size) > SYMLINK_INLINE_MAX
    ]
    return {
        ino: inline
        for ino, (_target, inline) in targets.get_many(links).items()
        if inline is not None
    }


def _presentable(name: bytes, dir_ino: int) -> bytes:
    """A name the kernel accepts from readdir.

    ext4 never writes '/' or NUL into a name, but a damaged directory may
    hold them, and one such name makes the kernel fail the listing of the
    whole directory.  They are shown as %2F and %00, so that the entry and
    its data still reach the backup, and logged.
    """
    if b"/" not in name and b"\0" not in name:
        return name
    shown = name.replace(b"/", b"%2F").replace(b"\0", b"%00")
    log.error("directory inode %d: invalid name %r shown as %r", dir_ino, name, shown)
    return shown


def _add(
    entries: list[Entry], by_name: dict[bytes, int], name: bytes, de: DirEntry, dir_ino: int
) -> None:
    if name in by_name:
        log.warning("directory inode %d: duplicate name %r, keeping the first", dir_ino, name)
        return
    by_name[name] = de.inode
    entries.append(Entry(name, de.inode, file_type_ifmt(de.file_type)))
