"""The view format (docs/FORMAT.md) in one place: the view writes it, restore reads it.

Only names, byte layouts and their syntax live here, with no ext4 or FUSE
dependency, so that the restore can read backups without pulling in the
reader, and so that a change of format is made once for both directions.
"""

from __future__ import annotations

import re

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import base64url_decode, base64url_encode

SIDE_FILE_NAME = b".fscrypt-longnames"
"""Starts with '.', which no base64url no-key name can contain."""

XATTR_FSCRYPT_PREFIX = b"user.fscrypt."
XATTR_FSCRYPT_CONTEXT = b"user.fscrypt.context"
XATTR_FSCRYPT_SIZE = b"user.fscrypt.size"
XATTR_FSCRYPT_BLOCK_SIZE = b"user.fscrypt.block_size"
XATTR_FSCRYPT_INO = b"user.fscrypt.ino"
XATTR_FSCRYPT_FS_UUID = b"user.fscrypt.fs_uuid"

SYMLINK_PREFIX = b"fscrypt:1:"
PATH_MAX = 4096

_DECIMAL = re.compile(rb"(0|[1-9][0-9]{0,19})")
_UUID_HEX = re.compile(rb"[0-9a-f]{32}")


def side_file_text(long_names: list[tuple[str, bytes]]) -> bytes:
    """Render the side file: one `<no-key name> <base64url ciphertext>` line per entry."""
    lines = sorted(f"{name} {base64url_encode(ct)}\n" for name, ct in long_names)
    return "".join(lines).encode("ascii")


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


def symlink_target(ctx_raw: bytes, ciphertext: bytes, extra: tuple[int, bytes] | None) -> bytes:
    """The view's target of an encrypted symlink.

    `extra` is (inode number, fs uuid) for policies that bind the
    ciphertext to them.  Raises ValueError when the result would not fit in
    a link target (PATH_MAX).
    """
    parts = [base64url_encode(ctx_raw), base64url_encode(ciphertext)]
    if extra is not None:
        parts += [str(extra[0]), extra[1].hex()]
    target = SYMLINK_PREFIX + ":".join(parts).encode("ascii")
    if len(target) >= PATH_MAX:
        raise ValueError("encrypted symlink target too long to represent in a link target")
    return target


def split_symlink_target(target: bytes) -> tuple[bytes, bytes, int | None, bytes | None]:
    """Split a `fscrypt:1:` target into (context, ciphertext, ino, fs uuid).

    Raises ValueError, with the reason, for anything that is not exactly
    that syntax.
    """
    if not target.startswith(SYMLINK_PREFIX):
        raise ValueError("target is not in the fscrypt:1: format")
    parts = target[len(SYMLINK_PREFIX) :].split(b":")
    if len(parts) not in (2, 4):
        raise ValueError(f"fscrypt:1: target with {len(parts)} fields, not 2 or 4")
    try:
        ctx_raw = base64url_decode(parts[0])
        ciphertext = base64url_decode(parts[1])
    except FscryptError as e:
        raise ValueError(f"fscrypt:1: target: {e}") from None
    ino = fs_uuid = None
    if len(parts) == 4:
        ino = parse_decimal(parts[2], "symlink inode number")
        fs_uuid = parse_uuid_hex(parts[3], "symlink fs uuid")
    return ctx_raw, ciphertext, ino, fs_uuid


def parse_decimal(value: bytes, what: str) -> int:
    """A decimal attribute value as the view writes it; ValueError otherwise."""
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"{what} is not a decimal number: {value[:40]!r}")
    return int(value)


def parse_uuid_hex(value: bytes, what: str) -> bytes:
    """A uuid as 32 lowercase hex digits; ValueError otherwise."""
    if not _UUID_HEX.fullmatch(value):
        raise ValueError(f"{what} is not 32 lowercase hex digits")
    return bytes.fromhex(value.decode("ascii"))
