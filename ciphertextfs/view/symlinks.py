"""Encrypted symlinks in the view: the target, and what the side file must carry.

The directory listing needs to know which of its symlinks are too long for
an inline target (their inline form goes into the side file), the
symlink's attributes need its target's length, and readlink the target:
all three come from here, so they agree.  A target is built from the
symlink's body, which for all but the shortest lies in a data block of its
own: `SymlinkTargets` reads the bodies of a directory's symlinks in one
batch and keeps the targets, so that neither the listing nor the
attributes that follow it read a block each.
"""

from __future__ import annotations

from collections.abc import Iterable

from ciphertextfs.ext4.errors import Ext4Error
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.ext4.xattr import EXT4_XATTR_INDEX_ENCRYPTION, EXT4_XATTR_NAME_ENCRYPTION_CONTEXT
from ciphertextfs.fscrypt.policy import FscryptError, parse_context
from ciphertextfs.lru import LRU
from ciphertextfs.viewformat import EncryptedSymlink, encode_symlink

#: Targets kept; a target is at most a few hundred bytes.
TARGET_CACHE = 16384
TARGET_CACHE_BYTES = 8 << 20
#: Bodies of one batch closer than this on disk are read in one request.
BATCH_MAX_GAP = 64 << 10
BATCH_MAX_SPAN = 1 << 20

Target = tuple[bytes, bytes | None]
"""The view's target, and the inline form for the side file when it is a reference."""


def encrypted_symlink(fs: Filesystem, inode: Inode, body: bytes | None = None) -> EncryptedSymlink:
    """Context and ciphertext of an encrypted symlink inode.

    The on-disk body (read here unless given) is a little-endian 16-bit
    ciphertext length, then the ciphertext.  Raises FscryptError (or the
    ext4 layer's CorruptError) for a damaged one.
    """
    raw = fs.xattr(inode, EXT4_XATTR_INDEX_ENCRYPTION, EXT4_XATTR_NAME_ENCRYPTION_CONTEXT)
    if raw is None:
        raise FscryptError(f"inode {inode.ino}: encrypted but has no fscrypt context")
    ctx = parse_context(raw)
    if body is None:
        body = fs.symlink_body(inode)
    if len(body) < 2:
        raise FscryptError("encrypted symlink body shorter than its length field")
    ct_len = int.from_bytes(body[:2], "little")
    if ct_len == 0 or ct_len > len(body) - 2:
        raise FscryptError(f"encrypted symlink: ciphertext length {ct_len} out of range")
    ino = uuid = None
    if ctx.needs_inode_number:
        ino, uuid = inode.ino, fs.uuid
    return EncryptedSymlink(raw, body[2 : 2 + ct_len], ino, uuid)


def view_target(fs: Filesystem, inode: Inode, body: bytes | None = None) -> Target:
    """The view's target, and the inline form for the side file when it is a reference."""
    return encode_symlink(encrypted_symlink(fs, inode, body), inode.ino)


def _target_bytes(target: Target) -> int:
    return len(target[0]) + len(target[1] or b"")


class SymlinkTargets:
    """The view targets of encrypted symlinks, by inode number."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._targets = LRU(TARGET_CACHE, TARGET_CACHE_BYTES)

    def get(self, inode: Inode) -> Target:
        """One symlink's target (FscryptError or CorruptError when damaged)."""
        target = self._targets.get(inode.ino)
        if target is None:
            target = view_target(self.fs, inode)
            self._targets.put(inode.ino, target, _target_bytes(target))
        return target

    def get_many(self, inodes: Iterable[Inode]) -> dict[int, Target]:
        """The targets of many encrypted symlinks, their bodies read in few requests.

        A symlink that cannot be read is left out: it answers its own error
        when asked for alone.
        """
        out: dict[int, Target] = {}
        unread = []
        for inode in inodes:
            target = self._targets.get(inode.ino)
            if target is not None:
                out[inode.ino] = target
            else:
                unread.append(inode)
        if not unread:
            return out
        bodies = self.fs.read_files(
            [(i, i.i_size) for i in unread if i.i_size <= self.fs.block_size],
            max_gap=BATCH_MAX_GAP,
            max_span=BATCH_MAX_SPAN,
        )
        for inode in unread:
            try:
                target = view_target(self.fs, inode, bodies.get(inode.ino))
            except (Ext4Error, FscryptError):
                continue
            self._targets.put(inode.ino, target, _target_bytes(target))
            out[inode.ino] = target
        return out

    def forget(self, ino: int) -> None:
        self._targets.pop(ino)

    def clear(self) -> None:
        self._targets.clear()
