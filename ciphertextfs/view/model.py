"""What each inode looks like in the view.

The view is a pure function of the ext4 image: attributes, names, xattrs,
link targets and contents per inode, computed on demand and cached.  It
knows nothing of FUSE, so every rule of docs/FORMAT.md can be tested by
calling it directly; the pyfuse3 adapter only translates.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ciphertextfs.ext4.directory import IndexInconclusive
from ciphertextfs.ext4.dirent import EXT4_NAME_LEN
from ciphertextfs.ext4.fs import INODE_CACHE, Filesystem
from ciphertextfs.ext4.inode import EXT4_ROOT_INO, Inode
from ciphertextfs.ext4.superblock import INCOMPAT_ENCRYPT
from ciphertextfs.ext4.xattr import EXT4_XATTR_INDEX_ENCRYPTION
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_FILE_NONCE_SIZE,
    FscryptContext,
    FscryptError,
    parse_context,
)
from ciphertextfs.lru import LRU
from ciphertextfs.posix_acl import XATTR_NAME_POSIX_ACL_ACCESS as ACL_ACCESS
from ciphertextfs.view.names import (
    Entry,
    Listing,
    is_side_ino,
    list_directory,
    listing_bytes,
    lookup_in_index,
    side_file_ino,
)
from ciphertextfs.view.protocol import StatfsFigures
from ciphertextfs.view.readahead import ReadAhead, is_small
from ciphertextfs.view.symlinks import SymlinkTargets
from ciphertextfs.view.xattrs import acl_read_only, fscrypt_context_raw, passthrough_xattrs
from ciphertextfs.viewformat import SIDE_FILE_NAME, encode_dir_xattrs, encode_inode_xattrs

__all__ = [
    "Attr",
    "DirectoryDamaged",
    "Entry",
    "View",
    "ViewNoAttr",
    "ViewNotFound",
    "SIDE_FILE_NAME",
]

log = logging.getLogger("ciphertextfs")

STATIC_CACHE_TIMEOUT = 3600.0
"""An image or snapshot never changes under the view: let the kernel cache."""

LIVE_CACHE_TIMEOUT = 1.0
"""A mounted filesystem does: without a change watcher, keep what the kernel
and the view cache short."""

SYNC_INTERVAL = 0.05
"""Seconds between two syncfs of a watched live source, at least."""

UNSYNCED_MAX = 1 << 16
"""Changed inodes remembered until the next syncfs; past that, any read syncs."""

ATTRS_AHEAD_MAX = 16384
"""Most entries whose attributes are built in one `attrs_ahead`."""

ATTRS_AHEAD_BATCH = 512
"""Inodes read per batch then."""

ATTRS_AHEAD_KEPT = INODE_CACHE // 4
"""Largest directory whose inodes, read for its attributes, stay in the reader's
inode cache for the xattr requests that rsync -X and tar --xattrs send next."""

LISTING_CACHE_BYTES = 128 << 20
"""Listings in memory at once: a few directories of a few 100,000 entries, within
the daemon's memory goal (issue 11); a bigger one is held alone (ciphertextfs.lru)."""

XATTR_CACHE_BYTES = 64 << 20
"""xattr sets in memory at once: bounded in bytes too, since ACLs and user.* values can be big."""

XATTR_SET_BYTES = 232
XATTR_BYTES = 80
"""What CPython holds for an xattr set besides its names' and values' bytes, and per xattr."""


class ViewNotFound(LookupError):
    """No such name in the directory (ENOENT)."""


class ViewNoAttr(LookupError):
    """No such extended attribute (ENODATA)."""


class DirectoryDamaged(OSError):
    """A lookup in a directory partly unreadable found nothing (EIO, not ENOENT)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, what)


@dataclass(slots=True, unsafe_hash=True)
class Attr:
    """What stat shows of one view inode: never assigned to, but not frozen (see Inode)."""

    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blocks: int
    """512-byte units allocated, as ext4 counts them (the kernel's stat): tar -S and
    rsync -S look for holes only in a file that has fewer blocks than its size."""
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    generation: int


@dataclass(frozen=True, slots=True)
class Invalidations:
    """What the kernel must forget after a change: inodes (attributes and
    pages) and directory entries (parent, name), in view inode numbers."""

    inodes: tuple[int, ...]
    entries: tuple[tuple[int, bytes], ...]


def xattr_set_bytes(xattrs: dict[bytes, bytes]) -> int:
    """The approximate memory an xattr set holds, what its cache charges."""
    return XATTR_SET_BYTES + sum(len(k) + len(v) + XATTR_BYTES for k, v in xattrs.items())


class View:
    """The ciphertext view of one ext4 tree rooted at `root_ino`."""

    def __init__(
        self,
        fs: Filesystem,
        root_ino: int = EXT4_ROOT_INO,
        *,
        live: bool = False,
        sync: Callable[[], None] | None = None,
        watched: bool = False,
    ):
        """`live`: the source is a mounted filesystem.  `sync` then writes it
        back (syncfs) each time the caches expire, so that file contents,
        read with O_DIRECT from the device, are at most that old.

        `watched`: every change of the live source is reported through
        `apply_changes` (ciphertextfs.live); the caches then last as for a
        static source, changed objects are forgotten one by one, and the
        source is synced only before a changed object is read again."""
        self.fs = fs
        self._sync = sync
        self.root_ino = root_ino
        self.live = live
        self.watched = live and watched
        self.cache_timeout = (
            LIVE_CACHE_TIMEOUT if live and not self.watched else STATIC_CACHE_TIMEOUT
        )
        self._epoch = 0
        self._unsynced: set[int] = set()
        self._unsynced_all = False
        self._sync_lock = threading.Lock()
        self._last_sync = 0.0
        self._nodes = LRU(65536)
        """Attributes per inode: all a listing needs, built from the inode alone."""
        self._xattr_sets = LRU(16384, XATTR_CACHE_BYTES)
        """The view's xattrs per inode, built when one is asked for."""
        self._policies = LRU(256)
        """Parsed fscrypt contexts by everything but their nonce: what sizes depend on."""
        self._listings = LRU(4096, LISTING_CACHE_BYTES)
        self._symlinks = SymlinkTargets(fs)
        self._ahead = ReadAhead(fs, self.attr, self._inode, self._listings.get)
        self._lock = threading.Lock()
        self._stamp = time.monotonic()
        self._encrypting = fs.sb.has_incompat(INCOMPAT_ENCRYPT)
        """Every directory then carries the block size, for any subtree's backup."""

    # -- caching ------------------------------------------------------------

    def _fresh(self) -> None:
        """On a live filesystem, forget whatever is older than the timeout."""
        if not self.live or self.watched:
            return
        now = time.monotonic()
        if now - self._stamp > self.cache_timeout:
            if self._sync is not None:
                try:
                    self._sync()
                except OSError as e:
                    log.warning("syncfs of the live source failed: %s", e)
            with self._lock:
                self._clear_caches()
                self._stamp = now
            self._ahead.clear()

    def _clear_caches(self) -> None:
        """Forget every node, xattr set, listing and ext4 cache (under `_lock`)."""
        self._nodes.clear()
        self._xattr_sets.clear()
        self._listings.clear()
        self._symlinks.clear()
        self.fs.drop_caches()

    def _inode(self, ino: int) -> Inode:
        return self.fs.inode(ino)

    def attr(self, ino: int) -> Attr:
        self._fresh()
        attr = self._nodes.get(ino)
        if attr is None:
            epoch = self._before_reading(ino)
            attr = self._build_attr(ino)
            with self._lock:
                if epoch == self._epoch:
                    self._nodes.put(ino, attr)
        return attr

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        self._fresh()
        xattrs = self._xattr_sets.get(ino)
        if xattrs is None:
            epoch = self._before_reading(ino)
            xattrs = self._build_xattrs(ino)
            with self._lock:
                if epoch == self._epoch:
                    self._xattr_sets.put(ino, xattrs, xattr_set_bytes(xattrs))
        return xattrs

    def listing(self, dir_ino: int) -> Listing:
        self._fresh()
        listing = self._listings.get(dir_ino)
        if listing is None:
            epoch = self._before_reading(dir_ino)
            inode = self._inode(dir_ino)
            if not inode.is_dir:
                raise NotADirectoryError(dir_ino)
            listing = list_directory(self.fs, inode, dir_ino, self._symlinks)
            with self._lock:
                if epoch == self._epoch:
                    self._listings.put(dir_ino, listing, listing_bytes(listing))
            self._ahead.note_listing(dir_ino)
        return listing

    def attrs_ahead(self, dir_ino: int, entries: Sequence[Entry]) -> None:
        """Build the attributes of some entries of a listing in inode number order.

        The adapter is about to send them in a readdirplus reply, in name
        hash order, scattered over the inode tables; in number order each
        table block is looked up once for all its inodes.  Not for more
        entries than the caches hold, whose first would be evicted before
        they are asked for; an entry that cannot be read, or that a watched
        live source changed since its last sync, is left for its own request.
        Nothing is kept once another change came in (`epoch`, as in `attr`).
        The inodes stay in the reader's cache only for a small directory.
        The targets of encrypted symlinks, which their sizes need, are read
        in one batch too.
        """
        self._fresh()
        if len(entries) > ATTRS_AHEAD_MAX or self._unsynced_all:
            return
        epoch = self._epoch
        listing = self._listings.get(dir_ino)
        size = len(entries) if listing is None else len(listing.entries)
        nodes = self._nodes
        unsynced = self._unsynced
        inos = sorted({e.ino for e in entries if not is_side_ino(e.ino) and e.ino not in unsynced})
        keep = size <= ATTRS_AHEAD_KEPT
        for start in range(0, len(inos), ATTRS_AHEAD_BATCH):
            chunk = nodes.missing(inos[start : start + ATTRS_AHEAD_BATCH])
            inodes = self.fs.inodes(chunk, cache=keep)
            # An encrypted symlink's size is its target's: their bodies in one batch.
            try:
                self._symlinks.get_many(
                    i for i in inodes if i is not None and i.is_symlink and i.is_encrypted
                )
            except Exception:  # noqa: BLE001 - only ahead: each symlink's own request reports it
                pass
            found = []
            for ino, inode in zip(chunk, inodes, strict=True):
                if inode is None:
                    continue
                try:
                    found.append((ino, self._attr_of(ino, inode)))
                except Exception:  # noqa: BLE001 - only ahead: its own request reports it
                    continue
            with self._lock:
                if epoch != self._epoch:
                    return
                nodes.put_many(found)

    # -- a watched live source ------------------------------------------------

    def _before_reading(self, ino: int) -> int:
        """Sync the source if `ino` changed since the last sync; answer the cache epoch.

        ext4 writes inodes and directory blocks into the device's page cache
        as the change happens, but sizes and extents of delayed allocations
        and file contents only at writeback: a changed object is read again
        only after a syncfs that started after its change was reported.  What
        is read while another change is being reported is not cached (the
        epoch moved on).
        """
        epoch = self._epoch
        if not self.watched or not (self._unsynced_all or ino in self._unsynced):
            return epoch
        with self._sync_lock:
            if not (self._unsynced_all or ino in self._unsynced):
                return epoch  # synced meanwhile by another reader
            wait = self._last_sync + SYNC_INTERVAL - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self._lock:
                self._unsynced = set()
                self._unsynced_all = False
                epoch = self._epoch
            if self._sync is not None:
                try:
                    self._sync()
                except OSError as e:
                    log.warning("syncfs of the live source failed: %s", e)
            self._last_sync = time.monotonic()
        return epoch

    def apply_changes(
        self, inodes: set[int], names: dict[int, set[bytes]], everything: bool = False
    ) -> Invalidations:
        """Forget what a batch of changes of the live source touched.

        `inodes`: ext4 inodes that changed; `names`: directory -> names added,
        removed or replaced there, as the kernel named them (plaintext in an
        unlocked encrypted directory, where the view's names differ, so the
        cached listing is searched for the changed inodes too); `everything`:
        changes were lost, forget it all.  Answers what the kernel must
        forget in turn.
        """
        with self._lock:
            self._epoch += 1
            if everything:
                old_nodes = self._nodes.keys()
                old_listings = [(d, self._listings.get(d)) for d in self._listings.keys()]
                self._clear_caches()
                self._unsynced = set()
                self._unsynced_all = True
            else:
                old_nodes = []
                old_listings = [(d, self._listings.pop(d)) for d in names]
                changed = set(inodes) | set(names)
                for ino in changed:
                    attr = self._nodes.pop(ino)
                    if attr is not None:
                        old_nodes.append(ino)
                        self._ahead.forget(ino, attr)
                    if self._nodes.pop(side_file_ino(ino)) is not None:
                        old_nodes.append(side_file_ino(ino))
                    self._xattr_sets.pop(ino)
                    self._xattr_sets.pop(side_file_ino(ino))
                    self._symlinks.forget(ino)
                    self.fs.forget_inode(ino)
                if len(self._unsynced) + len(changed) > UNSYNCED_MAX:
                    self._unsynced_all = True
                    self._unsynced = set()
                elif not self._unsynced_all:
                    self._unsynced |= changed
        if everything:
            self._ahead.clear()
            kernel_inodes = set(old_nodes)
        else:
            kernel_inodes = set(inodes) | set(names) | set(old_nodes)
        entries: set[tuple[int, bytes]] = set()
        for d, listing in old_listings:
            if listing is None:
                continue
            kernel_inodes.add(d)
            if listing.side_file is not None:
                kernel_inodes.add(side_file_ino(d))
            for e in listing.entries:
                if everything or e.ino in inodes:
                    entries.add((d, e.name))
        for d, got in names.items():
            entries.update((d, n) for n in got)
        return Invalidations(tuple(sorted(kernel_inodes)), tuple(sorted(entries)))

    # -- nodes --------------------------------------------------------------

    def _inode_policy(self, inode: Inode) -> FscryptContext:
        """The policy of an encrypted inode (see `_policy`), found without its EA block."""
        raw = self.fs.xattr(inode, EXT4_XATTR_INDEX_ENCRYPTION, b"c")
        if raw is None:
            raise FscryptError(f"inode {inode.ino}: encrypted but has no fscrypt context")
        return self._policy(raw)

    def _policy(self, raw: bytes) -> FscryptContext:
        """A raw context parsed and checked once per policy.

        Every file of a policy has the same context but for its nonce, the
        last 16 bytes: the result carries the nonce of the first such file,
        and only what the policy decides (sizes, modes, flags) may be read
        from it.
        """
        key = raw[:-FSCRYPT_FILE_NONCE_SIZE]
        context = self._policies.get(key)
        if context is None:
            context = parse_context(raw)
            self._policies.put(key, context)
        return context

    def _build_attr(self, ino: int) -> Attr:
        """Attributes from the inode alone: no xattrs but the context an encrypted size needs."""
        if is_side_ino(ino):
            return self._side_attr(ino)
        return self._attr_of(ino, self._inode(ino))

    def _attr_of(self, ino: int, inode: Inode) -> Attr:
        if self.watched and inode.i_links_count == 0:
            # Deleted since the kernel looked it up: a name it still holds
            # must not show the dead inode.
            raise ViewNotFound(ino)
        size = inode.i_size
        if inode.is_encrypted:
            context = self._inode_policy(inode)
            if inode.is_reg:
                size = context.ciphertext_size(inode.i_size, self.fs.block_size)
            elif inode.is_symlink:
                size = len(self._symlinks.get(inode)[0])
        mode = inode.i_mode
        rdev = 0
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = os.makedev(*inode.rdev)
        return Attr(
            ino,
            mode,
            inode.i_links_count,
            inode.i_uid,
            inode.i_gid,
            rdev,
            size,
            inode.i_blocks,
            inode.i_atime_ns,
            inode.i_mtime_ns,
            inode.i_ctime_ns,
            inode.i_generation,
        )

    def _build_xattrs(self, ino: int) -> dict[bytes, bytes]:
        if is_side_ino(ino):
            return self._side_xattrs(ino)
        inode = self._inode(ino)
        if self.watched and inode.i_links_count == 0:
            # Deleted since the kernel looked it up: a name it still holds
            # must not show the dead inode.
            raise ViewNotFound(ino)
        on_disk = self.fs.xattrs(inode)
        xattrs = passthrough_xattrs(on_disk, ino)
        if inode.is_dir and (inode.is_encrypted or self._encrypting):
            xattrs.update(encode_dir_xattrs(self.fs.block_size, self.fs.default_dirhash))
        if inode.is_encrypted:
            raw = fscrypt_context_raw(on_disk)
            if raw is None:
                raise FscryptError(f"inode {ino}: encrypted but has no fscrypt context")
            context = self._policy(raw)
            xattrs.update(
                encode_inode_xattrs(
                    raw,
                    binding=(ino, self.fs.uuid) if context.needs_inode_number else None,
                    size=inode.i_size if inode.is_reg else None,
                )
            )
            if not (inode.is_reg or inode.is_dir):
                # Linux allows user.* xattrs only on files and directories;
                # symlinks carry theirs in the target.
                xattrs = {k: v for k, v in xattrs.items() if not k.startswith(b"user.")}
        return xattrs

    def _side_listing(self, ino: int) -> tuple[int, Listing]:
        dir_ino = ino - side_file_ino(0)
        listing = self.listing(dir_ino)
        if listing.side_file is None:
            raise ViewNotFound(ino)
        return dir_ino, listing

    def _side_attr(self, ino: int) -> Attr:
        dir_ino, listing = self._side_listing(ino)
        d = self.attr(dir_ino)
        # The directory's read permission exactly: its ACL too (see _side_xattrs).
        return Attr(
            st_ino=ino,
            st_mode=stat.S_IFREG | (d.st_mode & 0o444),
            st_nlink=1,
            st_uid=d.st_uid,
            st_gid=d.st_gid,
            st_rdev=0,
            st_size=len(listing.side_file),
            st_blocks=(len(listing.side_file) + 511) // 512,
            st_atime_ns=d.st_atime_ns,
            st_mtime_ns=d.st_mtime_ns,
            st_ctime_ns=d.st_ctime_ns,
            generation=0,
        )

    def _side_xattrs(self, ino: int) -> dict[bytes, bytes]:
        """The directory's access ACL, read-only: the kernel enforces it on the side file
        as on the directory."""
        dir_ino, _listing = self._side_listing(ino)
        acl = self._xattrs(dir_ino).get(ACL_ACCESS)
        return {ACL_ACCESS: acl_read_only(acl)} if acl is not None else {}

    # -- the API the adapter uses ---------------------------------------------

    def entries(self, dir_ino: int) -> tuple[Entry, ...]:
        return self.listing(dir_ino).entries

    def damage(self, dir_ino: int) -> tuple[str, ...]:
        """What could not be read of a directory (empty when it is complete)."""
        return self.listing(dir_ino).damage

    def lookup(self, dir_ino: int, name: bytes) -> int:
        """The inode of `name`: from the listing if it is cached, else through
        the htree (a few blocks instead of the whole directory) if the index
        has it, else from the listing built for it: the listing alone says
        ENOENT, or EIO in a damaged directory."""
        self._fresh()
        listing = self._listings.get(dir_ino)
        if listing is None:
            self._before_reading(dir_ino)
            inode = self._inode(dir_ino)
            if not inode.is_dir:
                raise NotADirectoryError(dir_ino)
            try:
                ino = lookup_in_index(self.fs, inode, name)
            except IndexInconclusive as e:
                log.debug("lookup of %r through the listing: %s", name, e)
                ino = None
            if ino is not None:
                return ino
        listing = self.listing(dir_ino)
        ino = listing.by_name.get(name)
        if ino is None:
            if listing.damage:
                # The name may be in what could not be read: not ENOENT.
                raise DirectoryDamaged(f"directory inode {dir_ino}: {listing.damage[0]}")
            raise ViewNotFound(name)
        return ino

    def xattr_names(self, ino: int) -> list[bytes]:
        return list(self._xattrs(ino))

    def xattr(self, ino: int, name: bytes) -> bytes:
        try:
            return self._xattrs(ino)[name]
        except KeyError:
            raise ViewNoAttr(name) from None

    def readlink(self, ino: int) -> bytes:
        self.attr(ino)
        inode = self._inode(ino)
        if not inode.is_symlink:
            raise ViewNotFound(ino)
        if inode.is_encrypted:
            return self._symlinks.get(inode)[0]
        return self.fs.symlink_body(inode)

    def read(self, ino: int, offset: int, length: int) -> bytes:
        size = self.attr(ino).st_size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        if is_side_ino(ino):
            side = self.listing(ino - side_file_ino(0)).side_file or b""
            return side[offset : offset + length]
        data = self.small_contents(ino)
        if data is not None:
            return data[offset : offset + length]
        return self.fs.read(self._inode(ino), offset, length)

    def small_contents(self, ino: int) -> bytes | None:
        """The whole view contents of a small regular file, read ahead with its neighbours.

        None for anything else, and for a small file that could not be read
        ahead (it is then read on its own, and reports its own error).
        """
        attr = self.attr(ino)
        if not is_small(attr):
            return None
        return self._ahead.contents(ino, attr)

    def statfs(self) -> StatfsFigures:
        """The figures the kernel's ext4_statfs() reports, from the superblock read at open."""
        sb = self.fs.sb
        blocks, free, reserved = sb.statfs_counts()
        return StatfsFigures(
            block_size=self.fs.block_size,
            blocks=blocks,
            free_blocks=free,
            available_blocks=max(0, free - reserved),
            files=sb.s_inodes_count,
            free_files=min(sb.s_free_inodes_count, sb.s_inodes_count),
            name_max=EXT4_NAME_LEN,
        )
