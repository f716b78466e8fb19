"""Pure decisions of a restore: what a view entry stands for, before any I/O.

These functions turn the view format (docs/FORMAT.md) back into what the
fscrypt layer decrypts: the ciphertext name behind a no-key name (with the
side file for long ones), the parts of an encrypted symlink's target, and
the user.fscrypt.* attributes of a file.  Each failure raises
RestoreProblem with the reason a user reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import NokeyName, base64url_decode, parse_nokey_name
from ciphertextfs.fscrypt.policy import FscryptContext, parse_context

__all__ = [
    "RestoreProblem",
    "XATTR_PREFIX",
    "XATTR_CONTEXT",
    "XATTR_SIZE",
    "XATTR_INO",
    "XATTR_FS_UUID",
    "XATTR_BLOCK_SIZE",
    "SYMLINK_PREFIX",
    "FscryptAttrs",
    "parse_side_file",
    "ciphertext_name",
    "check_plain_name",
    "fscrypt_attrs",
    "EncryptedSymlink",
    "parse_symlink_target",
    "original_xattrs",
]

XATTR_PREFIX = b"user.fscrypt."
XATTR_CONTEXT = b"user.fscrypt.context"
XATTR_SIZE = b"user.fscrypt.size"
XATTR_INO = b"user.fscrypt.ino"
XATTR_FS_UUID = b"user.fscrypt.fs_uuid"
# Not (yet) written by the view: the data unit size of policies without a
# custom one is the filesystem block size, which a backup does not carry.
XATTR_BLOCK_SIZE = b"user.fscrypt.block_size"
SYMLINK_PREFIX = b"fscrypt:1:"

_DECIMAL = re.compile(rb"(0|[1-9][0-9]{0,19})")
_UUID_HEX = re.compile(rb"[0-9a-f]{32}")


class RestoreProblem(Exception):
    """One entry cannot be restored; the message says why."""


def parse_side_file(data: bytes) -> dict[bytes, bytes]:
    """Map each no-key name of a side file to its full ciphertext name.

    Malformed lines are skipped: an entry whose line is unusable is reported
    when it is looked up, which names the entry rather than the line.
    """
    out: dict[bytes, bytes] = {}
    for line in data.split(b"\n"):
        nokey, sep, full = line.partition(b" ")
        if not sep:
            continue
        try:
            out[nokey] = base64url_decode(full)
        except FscryptError:
            continue
    return out


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
    if not _DECIMAL.fullmatch(value):
        raise RestoreProblem(f"{what} is not a decimal number: {value[:40]!r}")
    return int(value)


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
    raw = xattrs.get(XATTR_CONTEXT)
    if raw is None:
        return None
    ctx = _parse_context(raw)
    size = None
    if regular:
        if XATTR_SIZE not in xattrs:
            raise RestoreProblem("encrypted file without user.fscrypt.size")
        size = _decimal(xattrs[XATTR_SIZE], "user.fscrypt.size")
    ino = _decimal(xattrs[XATTR_INO], "user.fscrypt.ino") if XATTR_INO in xattrs else None
    fs_uuid = None
    if XATTR_FS_UUID in xattrs:
        v = xattrs[XATTR_FS_UUID]
        if not _UUID_HEX.fullmatch(v):
            raise RestoreProblem("user.fscrypt.fs_uuid is not 32 lowercase hex digits")
        fs_uuid = bytes.fromhex(v.decode("ascii"))
    block_size = None
    if XATTR_BLOCK_SIZE in xattrs:
        block_size = _decimal(xattrs[XATTR_BLOCK_SIZE], "user.fscrypt.block_size")
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
    if not target.startswith(SYMLINK_PREFIX):
        raise RestoreProblem("encrypted symlink whose target is not in the fscrypt:1: format")
    parts = target[len(SYMLINK_PREFIX) :].split(b":")
    if len(parts) not in (2, 4):
        raise RestoreProblem(f"fscrypt:1: symlink target with {len(parts)} fields, not 2 or 4")
    try:
        ctx_raw = base64url_decode(parts[0])
        ct = base64url_decode(parts[1])
    except FscryptError as e:
        raise RestoreProblem(f"fscrypt:1: symlink target: {e}") from None
    ctx = _parse_context(ctx_raw)
    ino = fs_uuid = None
    if len(parts) == 4:
        ino = _decimal(parts[2], "symlink inode number")
        if not _UUID_HEX.fullmatch(parts[3]):
            raise RestoreProblem("fscrypt:1: symlink target: uuid is not 32 lowercase hex digits")
        fs_uuid = bytes.fromhex(parts[3].decode("ascii"))
    if ctx.needs_inode_number and ino is None:
        raise RestoreProblem("symlink with IV_INO_LBLK flags but no inode number and uuid")
    if not ct:
        raise RestoreProblem("fscrypt:1: symlink target with an empty ciphertext")
    return EncryptedSymlink(ctx, ct, ino, fs_uuid)


def original_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The attributes to restore: everything but the view's own user.fscrypt.*."""
    return {k: v for k, v in xattrs.items() if not k.startswith(XATTR_PREFIX)}
