"""Pure decisions of a restore: what a view entry stands for, before any I/O.

These functions turn the view format (docs/FORMAT.md) back into what the
fscrypt layer decrypts: the ciphertext name behind a no-key name (with the
side file for long ones), the parts of an encrypted symlink's target, and
the user.fscrypt.* attributes of a file.  Each failure raises
RestoreProblem with the reason a user reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import NokeyName, parse_nokey_name
from ciphertextfs.fscrypt.policy import FscryptContext, parse_context
from ciphertextfs.view.format import (
    XATTR_FSCRYPT_BLOCK_SIZE,
    XATTR_FSCRYPT_CONTEXT,
    XATTR_FSCRYPT_FS_UUID,
    XATTR_FSCRYPT_INO,
    XATTR_FSCRYPT_PREFIX,
    XATTR_FSCRYPT_SIZE,
    parse_decimal,
    parse_uuid_hex,
    split_symlink_target,
)

__all__ = [
    "RestoreProblem",
    "FscryptAttrs",
    "ciphertext_name",
    "check_plain_name",
    "fscrypt_attrs",
    "EncryptedSymlink",
    "parse_symlink_target",
    "original_xattrs",
]


class RestoreProblem(Exception):
    """One entry cannot be restored; the message says why."""


def ciphertext_name(name: bytes, side: dict[bytes, bytes] | None) -> bytes:
    """The ciphertext name a no-key name stands for, checked against its SHA-256."""
    try:
        nk: NokeyName = parse_nokey_name(name)
    except FscryptError as e:
        raise RestoreProblem(f"not a no-key name in an encrypted directory: {e}") from None
    if nk.sha256 is None:
        return nk.prefix
    full = (side or {}).get(name)
    if full is None:
        raise RestoreProblem("long name missing from the directory's .fscrypt-longnames")
    if not nk.matches(full):
        raise RestoreProblem(
            "long name in .fscrypt-longnames does not match the SHA-256 of its no-key name"
        )
    return full


def check_plain_name(name: bytes) -> bytes:
    """Refuse decrypted names no directory can hold (a tampered name or a wrong v1 key)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
        raise RestoreProblem(
            f"name decrypts to the impossible name {name[:64]!r} (tampered name or wrong key)"
        )
    return name


def _decimal(value: bytes, what: str) -> int:
    try:
        return parse_decimal(value, what)
    except ValueError as e:
        raise RestoreProblem(str(e)) from None


def _parse_context(raw: bytes) -> FscryptContext:
    try:
        return parse_context(raw)
    except FscryptError as e:
        raise RestoreProblem(f"damaged fscrypt context: {e}") from None


@dataclass(frozen=True)
class FscryptAttrs:
    """The user.fscrypt.* attributes of one file or directory."""

    context: FscryptContext
    size: int | None
    ino: int | None
    fs_uuid: bytes | None
    block_size: int | None

    def check_ino(self) -> None:
        if self.context.needs_inode_number and (self.ino is None or self.fs_uuid is None):
            raise RestoreProblem(
                "policy with IV_INO_LBLK flags but no user.fscrypt.ino / user.fscrypt.fs_uuid"
            )


def fscrypt_attrs(xattrs: dict[bytes, bytes], *, regular: bool) -> FscryptAttrs | None:
    """Parse the view's attributes; None for an unencrypted object."""
    raw = xattrs.get(XATTR_FSCRYPT_CONTEXT)
    if raw is None:
        return None
    ctx = _parse_context(raw)
    size = None
    if regular:
        if XATTR_FSCRYPT_SIZE not in xattrs:
            raise RestoreProblem("encrypted file without user.fscrypt.size")
        size = _decimal(xattrs[XATTR_FSCRYPT_SIZE], "user.fscrypt.size")
    ino = None
    if XATTR_FSCRYPT_INO in xattrs:
        ino = _decimal(xattrs[XATTR_FSCRYPT_INO], "user.fscrypt.ino")
    fs_uuid = None
    if XATTR_FSCRYPT_FS_UUID in xattrs:
        try:
            fs_uuid = parse_uuid_hex(xattrs[XATTR_FSCRYPT_FS_UUID], "user.fscrypt.fs_uuid")
        except ValueError as e:
            raise RestoreProblem(str(e)) from None
    block_size = None
    if XATTR_FSCRYPT_BLOCK_SIZE in xattrs:
        block_size = _decimal(xattrs[XATTR_FSCRYPT_BLOCK_SIZE], "user.fscrypt.block_size")
        if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
            raise RestoreProblem(f"impossible user.fscrypt.block_size {block_size}")
    attrs = FscryptAttrs(ctx, size, ino, fs_uuid, block_size)
    attrs.check_ino()
    return attrs


@dataclass(frozen=True)
class EncryptedSymlink:
    """The parts of a `fscrypt:1:` symlink target."""

    context: FscryptContext
    ciphertext: bytes
    ino: int | None
    fs_uuid: bytes | None


def parse_symlink_target(target: bytes) -> EncryptedSymlink:
    """Split `fscrypt:1:<ctx>:<ciphertext>[:<ino>:<uuid>]` (docs/FORMAT.md)."""
    try:
        ctx_raw, ct, ino, fs_uuid = split_symlink_target(target)
    except ValueError as e:
        raise RestoreProblem(f"encrypted symlink: {e}") from None
    ctx = _parse_context(ctx_raw)
    if ctx.needs_inode_number and ino is None:
        raise RestoreProblem("symlink with IV_INO_LBLK flags but no inode number and uuid")
    if not ct:
        raise RestoreProblem("fscrypt:1: symlink target with an empty ciphertext")
    return EncryptedSymlink(ctx, ct, ino, fs_uuid)


def original_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The attributes to restore: everything but the view's own user.fscrypt.*."""
    return {k: v for k, v in xattrs.items() if not k.startswith(XATTR_FSCRYPT_PREFIX)}
