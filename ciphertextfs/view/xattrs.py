"""The extended attributes an inode shows in the view.

The original xattrs pass through under their usual names, so `rsync -X`
and `tar --xattrs` keep them; ext4 stores POSIX ACLs in its own compact
format, which is converted to the `system.posix_acl_*` format that
`getfacl`, `tar --acls` and `rsync -A` understand.  Encrypted inodes add
the `user.fscrypt.*` attributes a restore needs (docs/FORMAT.md).
"""

from __future__ import annotations

import logging
import struct

from ciphertextfs.ext4.errors import CorruptError
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_ACL_NAMES,
    EXT4_XATTR_PREFIXES,
    Xattr,
)
from ciphertextfs.posix_acl import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_MAX_ENTRIES,
    ACL_OTHER,
    ACL_UNDEFINED_ID,
    ACL_USER,
    ACL_USER_OBJ,
    POSIX_ACL_XATTR_VERSION,
)
from ciphertextfs.viewformat import XATTR_FSCRYPT_PREFIX

log = logging.getLogger("ciphertextfs")


EXT4_ACL_VERSION = 0x0001
_ACL_SHORT_TAGS = (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER)
_ACL_FULL_TAGS = (ACL_USER, ACL_GROUP)
_ACL_MAX_ENTRIES = ACL_MAX_ENTRIES


def ext4_acl_to_posix(value: bytes) -> bytes:
    """Convert ext4's on-disk ACL (ext4_acl_header + short/full entries).

    ext4 saves four bytes on entries without an id (owner, group, mask,
    other); the VFS format gives every entry an id, ACL_UNDEFINED_ID there.
    """
    if len(value) < 4 or struct.unpack_from("<I", value)[0] != EXT4_ACL_VERSION:
        raise CorruptError("ACL: bad ext4_acl_header")
    out = [struct.pack("<I", POSIX_ACL_XATTR_VERSION)]
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value) or len(out) > _ACL_MAX_ENTRIES:
            raise CorruptError("ACL: truncated entry")
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in _ACL_SHORT_TAGS:
            out.append(struct.pack("<HHI", tag, perm, ACL_UNDEFINED_ID))
            pos += 4
        elif tag in _ACL_FULL_TAGS:
            if pos + 8 > len(value):
                raise CorruptError("ACL: truncated entry")
            (e_id,) = struct.unpack_from("<I", value, pos + 4)
            out.append(struct.pack("<HHI", tag, perm, e_id))
            pos += 8
        else:
            raise CorruptError(f"ACL: unknown tag {tag:#x}")
    return b"".join(out)


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


def posix_acl_to_ext4(value: bytes) -> bytes:
    """The inverse of ext4_acl_to_posix, for the image writer: ids only where a tag has one."""
    if len(value) < 4 or (len(value) - 4) % 8 or len(value) > 4 + 8 * _ACL_MAX_ENTRIES:
        raise CorruptError("ACL: not a system.posix_acl_* value")
    if struct.unpack_from("<I", value)[0] != POSIX_ACL_XATTR_VERSION:
        raise CorruptError("ACL: bad posix_acl_xattr_header version")
    out = [struct.pack("<I", EXT4_ACL_VERSION)]
    for tag, perm, e_id in struct.iter_unpack("<HHI", value[4:]):
        if tag in _ACL_SHORT_TAGS:
            out.append(struct.pack("<HH", tag, perm))
        elif tag in _ACL_FULL_TAGS:
            out.append(struct.pack("<HHI", tag, perm, e_id))
        else:
            raise CorruptError(f"ACL: unknown tag {tag:#x}")
    return b"".join(out)


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
