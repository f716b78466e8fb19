"""The view's fscrypt metadata entry: names shared by the view and the restore.

A view rooted below its filesystem's root does not contain the
filesystem's `/.fscrypt`, and a view of a non-root filesystem holds only
`.link` files for its login protectors, whose real files live on the root
filesystem.  The view then shows one extra directory at its root holding
copies of those metadata files, so that a backup of the view carries what
a passphrase restore needs (docs/FORMAT.md, "fscrypt metadata in the view").
"""

from __future__ import annotations

__all__ = [
    "META_DIR_NAME",
    "META_LINKED",
    "META_POLICIES",
    "META_PROTECTORS",
    "META_SUBDIRS",
    "XATTR_META_MARK",
    "META_MARK_VALUE",
    "FSCRYPT_DIR_NAME",
]

META_DIR_NAME = b".ciphertextfs-fscrypt"
"""Starts with '.', so it is never a no-key name; see docs/FORMAT.md for the
rule when an unencrypted root holds a real entry of this name."""
META_POLICIES = b"policies"
META_PROTECTORS = b"protectors"
META_LINKED = b"linked"
"""Protector files of another filesystem that this filesystem's `.link` files name."""
META_SUBDIRS = (META_POLICIES, META_PROTECTORS, META_LINKED)
XATTR_META_MARK = b"user.ciphertextfs.fscrypt_metadata"
META_MARK_VALUE = b"1"
FSCRYPT_DIR_NAME = b".fscrypt"
