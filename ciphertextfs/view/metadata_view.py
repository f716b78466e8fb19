"""The view's fscrypt metadata entry (docs/FORMAT.md, "fscrypt metadata in the view").

A view rooted below the filesystem root, or of a filesystem whose login
protectors live on the root filesystem, would make backups that no
passphrase opens.  This module gathers, when the view is mounted, copies
of the filesystem's `/.fscrypt` metadata (read through our own ext4
reader) and of the protector files its `.link` files name (read from the
directories given with --fscrypt-linked), and shows them under one extra
directory at the view's root.  Modes, owners and times are those of the
originals (fscrypt writes its files 0600), so the view shows them to no
one the originals hide them from.

It wraps a View instead of changing it: the rest of the view neither
knows nor pays for it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from ciphertextfs.ext4.errors import Ext4Error
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import EXT4_ROOT_INO
from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.protector import (
    MAX_METADATA_FILE_SIZE,
    parse_link,
    parse_policy,
    parse_protector,
)
from ciphertextfs.view.model import Attr, Invalidations, ViewNoAttr, ViewNotFound
from ciphertextfs.view.names import Entry
from ciphertextfs.view.protocol import StatfsFigures, ViewProtocol
from ciphertextfs.viewformat import (
    FSCRYPT_DIR_NAME,
    META_DIR_NAME,
    META_LINKED,
    META_MARK_VALUE,
    META_POLICIES,
    META_PROTECTORS,
    XATTR_META_MARK,
)

__all__ = [
    "META_INO_BASE",
    "MetaNode",
    "MetadataCollision",
    "MetadataView",
    "collect",
    "fs_metadata",
]

log = logging.getLogger("ciphertextfs")

META_INO_BASE = 1 << 48
"""Inode numbers of the metadata entry: above every ext4 inode and side file."""
_MAX_FILES = 4096


class MetadataCollision(Exception):
    """The view's root holds a real entry with the metadata entry's name."""


@dataclass
class MetaNode:
    name: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    children: dict[bytes, MetaNode] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _from_inode(name: bytes, inode) -> MetaNode:
    return MetaNode(name, inode.i_mode, inode.i_uid, inode.i_gid, inode.i_mtime_ns)


def _child(fs: Filesystem, dir_inode, name: bytes):
    for e in fs.read_dir(dir_inode):
        if e.name == name:
            return fs.inode(e.inode)
    return None


def fs_metadata(fs: Filesystem) -> MetaNode | None:
    """The filesystem's `/.fscrypt/{policies,protectors}` as read from disk, or None."""
    try:
        root = fs.inode(EXT4_ROOT_INO)
        base = _child(fs, root, FSCRYPT_DIR_NAME)
        if base is None or not base.is_dir or base.is_encrypted:
            return None
        top = _from_inode(FSCRYPT_DIR_NAME, base)
        count = 0
        for sub in (META_POLICIES, META_PROTECTORS):
            d = _child(fs, base, sub)
            if d is None or not d.is_dir:
                continue
            node = top.children[sub] = _from_inode(sub, d)
            for e in fs.read_dir(d):
                ino = fs.inode(e.inode)
                if not ino.is_reg or ino.i_size > MAX_METADATA_FILE_SIZE or b"/" in e.name:
                    continue
                count += 1
                if count > _MAX_FILES:
                    log.warning("/.fscrypt: more than %d files; the rest left out", _MAX_FILES)
                    return top
                f = node.children[e.name] = _from_inode(e.name, ino)
                f.data = fs.read(ino, 0, ino.i_size)
        return top
    except (Ext4Error, OSError) as e:
        log.warning("/.fscrypt: cannot read the filesystem's fscrypt metadata: %s", e)
        return None


def _protector_dirs(path: str) -> list[str]:
    """A .fscrypt directory, a root holding one, or a protectors directory itself."""
    out = []
    for cand in (
        os.path.join(path, "protectors"),
        os.path.join(path, ".fscrypt", "protectors"),
        path,
    ):
        if os.path.isdir(cand):
            out.append(cand)
    return out


def _read_linked(dirs: list[str], desc: str) -> MetaNode | None:
    for d in dirs:
        p = os.path.join(d, desc)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_METADATA_FILE_SIZE:
                continue
            data = os.read(fd, MAX_METADATA_FILE_SIZE + 1)
        finally:
            os.close(fd)
        try:
            if parse_protector(data).descriptor != desc:
                continue
        except FscryptError:
            continue
        return MetaNode(os.fsencode(desc), st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, data)
    return None


@dataclass
class Collected:
    """What the metadata entry holds, and what a passphrase restore would still lack."""

    entry: MetaNode | None
    warnings: list[str]


def collect(
    fs: Filesystem, root_ino: int, linked: list[str], *, disabled: bool = False
) -> Collected:
    """The metadata entry for a view of `fs` rooted at `root_ino`, with its warnings."""
    own = fs_metadata(fs)
    warnings: list[str] = []
    if own is None:
        return Collected(None, [])
    policies = own.children.get(META_POLICIES, MetaNode(b"", stat.S_IFDIR)).children
    protectors = own.children.get(META_PROTECTORS, MetaNode(b"", stat.S_IFDIR)).children
    in_view = root_ino == EXT4_ROOT_INO
    if disabled:
        if not in_view and policies:
            warnings.append(
                "the view is rooted below the filesystem root and --no-fscrypt-metadata is "
                "given: backups will not hold the filesystem's /.fscrypt, so restoring with a "
                "passphrase needs a separate copy of it (decrypt --fscrypt-metadata)"
            )
        return Collected(None, warnings)
    dirs = [d for path in linked for d in _protector_dirs(path)]
    found: dict[bytes, MetaNode] = {}
    used_by: dict[str, list[str]] = {}
    for pname, pnode in policies.items():
        try:
            pol = parse_policy(pnode.data)
        except FscryptError:
            continue
        for w in pol.wrapped_keys:
            used_by.setdefault(w.protector_descriptor, []).append(os.fsdecode(pname))
    for name, node in sorted(protectors.items()):
        if not name.endswith(b".link"):
            continue
        desc = os.fsdecode(name[: -len(b".link")])
        try:
            where = ", ".join(f"{k}={v}" for k, v in sorted(parse_link(node.data).items()))
        except FscryptError:
            where = "an unreadable link"
        copy = _read_linked(dirs, desc) if dirs else None
        if copy is not None:
            found[os.fsencode(desc)] = copy
            continue
        pols = used_by.get(desc, [])
        if not pols:
            continue
        warnings.append(
            f"protector {desc} (used by polic{'y' if len(pols) == 1 else 'ies'} "
            f"{', '.join(pols)}) lives on another filesystem ({where}); this filesystem holds "
            "only its .link, so a backup of this view cannot be opened with it (a login "
            "passphrase): "
            + (
                "it is not in the --fscrypt-linked directories given"
                if dirs
                else "add --fscrypt-linked with that filesystem's .fscrypt (such as /.fscrypt)"
            )
            + ", or keep another protector of the policy, such as its recovery passphrase"
        )
    if in_view and not found:
        return Collected(None, warnings)
    mark = {XATTR_META_MARK: META_MARK_VALUE}
    top = MetaNode(META_DIR_NAME, stat.S_IFDIR | 0o755, 0, 0, own.mtime_ns, xattrs=mark)
    if not in_view:
        for sub in (META_POLICIES, META_PROTECTORS):
            if sub in own.children:
                top.children[sub] = own.children[sub]
    if found:
        top.children[META_LINKED] = MetaNode(
            META_LINKED, stat.S_IFDIR | 0o755, 0, 0, own.mtime_ns, children=found
        )
    return Collected(top, warnings)


class MetadataView:
    """A view with the metadata entry added at its root; every other inode is the inner view's."""

    def __init__(self, inner: ViewProtocol, entry: MetaNode) -> None:
        self._inner = inner
        self._entry = entry
        try:
            inner.lookup(inner.root_ino, META_DIR_NAME)
        except ViewNotFound:
            pass
        else:
            raise MetadataCollision(
                f"the view's root holds a real entry named {os.fsdecode(META_DIR_NAME)}, the "
                "name of the fscrypt metadata entry: rename it, or mount with "
                "--no-fscrypt-metadata and back up the filesystem's /.fscrypt separately"
            )
        self._nodes: dict[int, MetaNode] = {}
        self._entries: dict[int, tuple[Entry, ...]] = {}
        self._number(entry)
        self._top_ino = META_INO_BASE

    def _number(self, node: MetaNode) -> int:
        ino = META_INO_BASE + len(self._nodes)
        self._nodes[ino] = node
        if node.is_dir:
            self._entries[ino] = tuple(
                Entry(name, self._number(child), stat.S_IFMT(child.mode))
                for name, child in sorted(node.children.items())
            )
        return ino

    # -- the view members that no metadata inode changes ---------------------
    #
    # Delegated one by one, never through __getattr__: a member added to
    # ViewProtocol must be answered here too, or the metadata inodes would
    # silently reach the inner view, which does not know them.

    @property
    def root_ino(self) -> int:
        return self._inner.root_ino

    @property
    def cache_timeout(self) -> float:
        return self._inner.cache_timeout

    @property
    def live(self) -> bool:
        return self._inner.live

    @property
    def watched(self) -> bool:
        return self._inner.watched

    def statfs(self) -> StatfsFigures:
        return self._inner.statfs()

    # -- the members that answer the metadata inodes ---------------------------

    def _meta(self, ino: int) -> MetaNode | None:
        return self._nodes.get(ino) if ino >= META_INO_BASE else None

    def attr(self, ino: int) -> Attr:
        node = self._meta(ino)
        if node is None:
            return self._inner.attr(ino)
        size = len(node.data)
        return Attr(
            st_ino=ino,
            st_mode=node.mode,
            st_nlink=2 if node.is_dir else 1,
            st_uid=node.uid,
            st_gid=node.gid,
            st_rdev=0,
            st_size=size,
            st_blocks=(size + 511) // 512,
            st_atime_ns=node.mtime_ns,
            st_mtime_ns=node.mtime_ns,
            st_ctime_ns=node.mtime_ns,
            generation=0,
        )

    def entries(self, dir_ino: int) -> tuple[Entry, ...]:
        if dir_ino in self._entries:
            return self._entries[dir_ino]
        inner = tuple(self._inner.entries(dir_ino))
        if dir_ino == self._inner.root_ino:
            # First, so that tar and rsync meet the metadata before the encrypted trees.
            top = self._nodes[self._top_ino]
            return (Entry(META_DIR_NAME, self._top_ino, stat.S_IFMT(top.mode)), *inner)
        return inner

    def attrs_ahead(self, dir_ino: int, entries: Sequence[Entry]) -> None:
        if dir_ino not in self._entries:
            self._inner.attrs_ahead(dir_ino, [e for e in entries if self._meta(e.ino) is None])

    def damage(self, dir_ino: int) -> tuple[str, ...]:
        """The metadata entry is built in memory at mount time: nothing to be damaged."""
        if dir_ino in self._entries:
            return ()
        return self._inner.damage(dir_ino)

    def lookup(self, dir_ino: int, name: bytes) -> int:
        if dir_ino in self._entries:
            for e in self._entries[dir_ino]:
                if e.name == name:
                    return e.ino
            raise ViewNotFound(name)
        if dir_ino == self._inner.root_ino and name == META_DIR_NAME:
            return self._top_ino
        return self._inner.lookup(dir_ino, name)

    def xattr_names(self, ino: int) -> list[bytes]:
        node = self._meta(ino)
        return self._inner.xattr_names(ino) if node is None else list(node.xattrs)

    def xattr(self, ino: int, name: bytes) -> bytes:
        node = self._meta(ino)
        if node is None:
            return self._inner.xattr(ino, name)
        try:
            return node.xattrs[name]
        except KeyError:
            raise ViewNoAttr(name) from None

    def readlink(self, ino: int) -> bytes:
        if self._meta(ino) is not None:
            raise ViewNotFound(ino)
        return self._inner.readlink(ino)

    def read(self, ino: int, offset: int, length: int) -> bytes:
        node = self._meta(ino)
        if node is None:
            return self._inner.read(ino, offset, length)
        return node.data[offset : offset + max(length, 0)] if offset >= 0 else b""

    def apply_changes(
        self, inodes: set[int], names: dict[int, set[bytes]], everything: bool = False
    ) -> Invalidations:
        """The metadata entry is built at mount time: only the inner view changes."""
        return self._inner.apply_changes(inodes, names, everything)

    def small_contents(self, ino: int) -> bytes | None:
        node = self._meta(ino)
        if node is None:
            return self._inner.small_contents(ino)
        return None if node.is_dir else node.data
