"""Encrypted symlinks in the view: the target, and what the side file must carry.

The directory listing needs to know which of its symlinks are too long for
an inline target (their inline form goes into the side file), and the
symlink itself needs its target: both come from here, so they agree.
"""

from __future__ import annotations

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.fscrypt.policy import FscryptError, parse_context
from ciphertextfs.view.xattrs import fscrypt_context_raw
from ciphertextfs.viewformat import EncryptedSymlink, encode_symlink


def encrypted_symlink(fs: Filesystem, inode: Inode) -> EncryptedSymlink:
    """Context and ciphertext of an encrypted symlink inode.

    The on-disk body is a little-endian 16-bit ciphertext length, then the
    ciphertext.  Raises FscryptError (or the ext4 layer's CorruptError) for a
    damaged one.
    """
    raw = fscrypt_context_raw(fs.xattrs(inode))
    if raw is None:
        raise FscryptError(f"inode {inode.ino}: encrypted but has no fscrypt context")
    ctx = parse_context(raw)
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


def view_target(fs: Filesystem, inode: Inode) -> tuple[bytes, bytes | None]:
    """The view's target, and the inline form for the side file when it is a reference."""
    return encode_symlink(encrypted_symlink(fs, inode), inode.ino)
