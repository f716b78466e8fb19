"""ext4's on-disk POSIX ACL format (the kernel's fs/ext4/acl.h), both ways.

ext4 stores `system.posix_acl_*` under its own name indexes in a compact
form: a version header, then entries of four bytes (owner, owning group,
mask, other) or eight (named users and groups, with their id).  The view
converts it to the VFS form that getfacl, tar and rsync exchange, and
restore-image back.
"""

from __future__ import annotations

import struct

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

from .errors import CorruptError

EXT4_ACL_VERSION = 0x0001
_ACL_SHORT_TAGS = (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER)
_ACL_FULL_TAGS = (ACL_USER, ACL_GROUP)


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
        if pos + 4 > len(value) or len(out) > ACL_MAX_ENTRIES:
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


def posix_acl_to_ext4(value: bytes) -> bytes:
    """The inverse of ext4_acl_to_posix, for the image writer: ids only where a tag has one."""
    if len(value) < 4 or (len(value) - 4) % 8 or len(value) > 4 + 8 * ACL_MAX_ENTRIES:
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
