"""POSIX ACLs in the kernel's xattr form (`system.posix_acl_*`), and from their text form.

The view, the restore and restore-image all meet ACLs: ext4 stores them in
its own compact format (ext4/acl.py converts it), the VFS and GNU tar
exchange the binary form below, and bsdtar archives carry only the text
form of acl(5) (`SCHILY.acl.access` records), which a restore must turn
back into the binary form or lose the ACL.
"""

from __future__ import annotations

import struct

__all__ = [
    "AclError",
    "POSIX_ACL_XATTR_VERSION",
    "ACL_USER_OBJ",
    "ACL_USER",
    "ACL_GROUP_OBJ",
    "ACL_GROUP",
    "ACL_MASK",
    "ACL_OTHER",
    "ACL_UNDEFINED_ID",
    "ACL_MAX_ENTRIES",
    "XATTR_NAME_POSIX_ACL_ACCESS",
    "XATTR_NAME_POSIX_ACL_DEFAULT",
    "from_text",
    "is_minimal",
]

XATTR_NAME_POSIX_ACL_ACCESS = b"system.posix_acl_access"
XATTR_NAME_POSIX_ACL_DEFAULT = b"system.posix_acl_default"
POSIX_ACL_XATTR_VERSION = 0x0002
ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
ACL_MAX_ENTRIES = 8192

_TAGS = {
    b"user": (ACL_USER_OBJ, ACL_USER),
    b"u": (ACL_USER_OBJ, ACL_USER),
    b"group": (ACL_GROUP_OBJ, ACL_GROUP),
    b"g": (ACL_GROUP_OBJ, ACL_GROUP),
    b"mask": (ACL_MASK, None),
    b"m": (ACL_MASK, None),
    b"other": (ACL_OTHER, None),
    b"o": (ACL_OTHER, None),
}


class AclError(ValueError):
    """An ACL text that does not describe a valid POSIX ACL."""


def _perm(text: bytes) -> int:
    if len(text) != 3 or any(c not in (want, 0x2D) for c, want in zip(text, b"rwx", strict=True)):
        raise AclError(f"ACL permissions {text[:16]!r} are not of the form rwx/r-x/---")
    return sum(bit for c, bit in zip(text, (4, 2, 1), strict=True) if c != 0x2D)


def from_text(text: bytes) -> bytes:
    """The binary `system.posix_acl_*` value of an ACL in acl(5)'s text form.

    Entries are separated by commas or newlines; each is tag:qualifier:perms
    with an optional fourth field, the numeric id libarchive appends to a
    named qualifier.  A named qualifier without a numeric id is refused:
    looking the name up on the restoring machine could name someone else.
    """
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace(b"\n", b",").split(b","):
        item = raw.split(b"#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(b":")
        if len(fields) not in (3, 4) or fields[0] not in _TAGS:
            raise AclError(f"ACL entry {item[:64]!r} is not tag:qualifier:perms")
        obj_tag, named_tag = _TAGS[fields[0]]
        qualifier = fields[1]
        perm = _perm(fields[2])
        if not qualifier:
            tag, e_id = obj_tag, ACL_UNDEFINED_ID
        elif named_tag is None:
            raise AclError(f"ACL entry {item[:64]!r}: {fields[0].decode()} takes no qualifier")
        else:
            ident = fields[3] if len(fields) == 4 else qualifier
            if not ident.isdigit() or int(ident) >= ACL_UNDEFINED_ID:
                raise AclError(f"ACL entry {item[:64]!r} has no numeric id")
            tag, e_id = named_tag, int(ident)
        entries.append((tag, perm, e_id))
        if len(entries) > ACL_MAX_ENTRIES:
            raise AclError("ACL with too many entries")
    tags = [t for t, _p, _i in entries]
    for required in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER):
        if tags.count(required) != 1:
            raise AclError("ACL needs exactly one owner, group and other entry")
    named = [(t, i) for t, _p, i in entries if t in (ACL_USER, ACL_GROUP)]
    if len(set(named)) != len(named):
        raise AclError("ACL names one user or group twice")
    if tags.count(ACL_MASK) > 1 or (named and ACL_MASK not in tags):
        raise AclError("ACL with named entries needs exactly one mask")
    # The kernel's posix_acl_valid() wants entries sorted by tag, then id.
    entries.sort(key=lambda e: (e[0], e[2]))
    return struct.pack("<I", POSIX_ACL_XATTR_VERSION) + b"".join(
        struct.pack("<HHI", t, p, i) for t, p, i in entries
    )


def is_minimal(value: bytes) -> bool:
    """Whether an ACL holds only owner, group and other: the mode bits, nothing more.

    The kernel keeps no access ACL xattr of that kind (setting one only sets
    the mode), so such a text record describes a file that has no ACL.
    """
    return len(value) == 4 + 3 * 8
