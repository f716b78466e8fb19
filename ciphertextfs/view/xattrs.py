"""The extended attributes an inode shows in the view.

The original xattrs pass through under their usual names, so `rsync -X`
and `tar --xattrs` keep them; ext4 stores POSIX ACLs in its own compact
format, which is converted to the `system.posix_acl_*` format that
`getfacl`, `tar --acls` and `rsync -A` understand.  Encrypted inodes add
the `user.fscrypt.*` attributes a restore needs (docs/FORMAT.md).
"""

from __future__ import annotations

import logging

from ciphertextfs.ext4.acl import ext4_acl_to_posix
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_ACL_NAMES,
    EXT4_XATTR_INDEX_ENCRYPTION,
    EXT4_XATTR_NAME_ENCRYPTION_CONTEXT,
    EXT4_XATTR_PREFIXES,
    Xattr,
)
from ciphertextfs.viewformat import XATTR_FSCRYPT_PREFIX

log = logging.getLogger("ciphertextfs")


def acl_read_only(posix_acl: bytes) -> bytes:
    """The same ACL (VFS format) with every entry cut down to its read bit.

    A file given this ACL of a directory grants read access to exactly
    those the directory grants read (listing) access, named users and
    groups and the mask included.
    """
    out = bytearray(posix_acl)
    for pos in range(4 + 2, len(out) - 5, 8):
        out[pos] &= 4
        out[pos + 1] = 0
    return bytes(out)


def passthrough_xattrs(xattrs: list[Xattr], ino: int) -> dict[bytes, bytes]:
    """Map the inode's on-disk xattrs to the names the view shows.

    An original `user.fscrypt.*` attribute would be shadowed by the view's
    own: that is logged, since a restore strips that namespace.
    """
    out: dict[bytes, bytes] = {}
    for x in xattrs:
        prefix = EXT4_XATTR_PREFIXES.get(x.name_index)
        if prefix is not None:
            name = prefix + x.name
            if name.startswith(XATTR_FSCRYPT_PREFIX):
                log.warning("inode %d: original xattr %r hidden by the view's own", ino, name)
                continue
            out[name] = x.value
        elif x.name_index in EXT4_XATTR_ACL_NAMES and not x.name:
            out[EXT4_XATTR_ACL_NAMES[x.name_index]] = ext4_acl_to_posix(x.value)
    return out


def fscrypt_context_raw(xattrs: list[Xattr]) -> bytes | None:
    """The raw fscrypt context stored in the inode; the view shows it as user.fscrypt.context."""
    for x in xattrs:
        if (
            x.name_index == EXT4_XATTR_INDEX_ENCRYPTION
            and x.name == EXT4_XATTR_NAME_ENCRYPTION_CONTEXT
        ):
            return x.value
    return None
