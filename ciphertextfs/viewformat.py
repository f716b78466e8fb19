"""The view format (docs/FORMAT.md), encoded and decoded in one place.

The view writes it, the restore and `inspect` read it.  Only names, byte
layouts and their syntax live here, over the fscrypt layer's contexts and
base64url, with no ext4 or FUSE dependency: the restore reads backups
without pulling in the reader, and a change of format is made once for both
directions.  Format 1 is still decoded, because backups made with it exist.

Every decoder raises FormatError, whose message names what is wrong in the
words of the format, so that callers can report it for the one entry
concerned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import base64url_decode, base64url_encode, base64url_len
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_CONTEXT_V1_SIZE,
    FSCRYPT_CONTEXT_V2_SIZE,
    FscryptContext,
    parse_context,
)

SIDE_FILE_NAME = b".fscrypt-longnames"
"""Starts with '.', which no base64url no-key name can contain."""

SIDE_FILE_HEADER = b"fscrypt-side 2\n"
"""First line of a format-2 side file; a format-1 side file has none."""

SIDE_FILE_MAX = 256 * 1024 * 1024
"""A side file holds one line of about 450 bytes per long name (up to 5.5 KiB
per long symlink); anything far larger than a directory could need is refused."""

XATTR_FSCRYPT_PREFIX = b"user.fscrypt."
XATTR_FSCRYPT_CONTEXT = b"user.fscrypt.context"
XATTR_FSCRYPT_SIZE = b"user.fscrypt.size"
XATTR_FSCRYPT_BLOCK_SIZE = b"user.fscrypt.block_size"
XATTR_FSCRYPT_INO = b"user.fscrypt.ino"
XATTR_FSCRYPT_FS_UUID = b"user.fscrypt.fs_uuid"
XATTR_FSCRYPT_DIRHASH = b"user.fscrypt.dirhash"

DIRHASH_ALGORITHMS = (
    "legacy",
    "half_md4",
    "tea",
    "legacy_unsigned",
    "half_md4_unsigned",
    "tea_unsigned",
)
"""The names user.fscrypt.dirhash gives the directory hash algorithms (those
of e2fsprogs), indexed by the kernel's DX_HASH_* number; the _unsigned ones
are what a filesystem with EXT2_FLAGS_UNSIGNED_HASH uses."""

SYMLINK_PREFIX = b"fscrypt:1:"
"""An encrypted symlink whose target carries its context and ciphertext."""

SYMLINK_REF_PREFIX = b"fscrypt:2:"
"""An encrypted symlink whose target is in its directory's side file."""

SYMLINK_PREFIXES = (SYMLINK_PREFIX, SYMLINK_REF_PREFIX)

SYMLINK_INLINE_MAX = 1024
"""Longest target the view writes (format 2): XFS and ext4 with 1 KiB blocks
refuse longer symlinks, so longer ones go to the side file."""

PATH_MAX = 4096

_DECIMAL = re.compile(rb"(0|[1-9][0-9]{0,19})")
_UUID_HEX = re.compile(rb"[0-9a-f]{32}")


class FormatError(ValueError):
    """Something in a backup is not the view format; the message says what."""


# -- scalars -------------------------------------------------------------------


def encode_decimal(n: int) -> bytes:
    return str(n).encode("ascii")


def decode_decimal(value: bytes, what: str) -> int:
    if not _DECIMAL.fullmatch(value):
        raise FormatError(f"{what} is not a decimal number: {value[:40]!r}")
    return int(value)


def encode_uuid(uuid: bytes) -> bytes:
    return uuid.hex().encode("ascii")


def decode_uuid(value: bytes, what: str) -> bytes:
    if not _UUID_HEX.fullmatch(value):
        raise FormatError(f"{what} is not 32 lowercase hex digits")
    return bytes.fromhex(value.decode("ascii"))


def decode_block_size(value: bytes) -> int:
    bs = decode_decimal(value, "user.fscrypt.block_size")
    if bs < 512 or bs > 65536 or bs & (bs - 1):
        raise FormatError(f"impossible user.fscrypt.block_size {bs}")
    return bs


def decode_context(raw: bytes) -> FscryptContext:
    try:
        return parse_context(raw)
    except FscryptError as e:
        raise FormatError(f"damaged fscrypt context: {e}") from None


def _b64decode(text: bytes, what: str) -> bytes:
    try:
        return base64url_decode(text)
    except FscryptError as e:
        raise FormatError(f"{what}: {e}") from None


# -- xattrs --------------------------------------------------------------------


def encode_inode_xattrs(
    ctx_raw: bytes,
    *,
    binding: tuple[int, bytes] | None = None,
    size: int | None = None,
    block_size: int | None = None,
) -> dict[bytes, bytes]:
    """The user.fscrypt.* attributes of an encrypted file or directory.

    `binding` is (inode number, fs uuid) for policies that bind the
    ciphertext to them; `size` the real size of a regular file.  Format 2
    gives `block_size` to directories only (see encode_dir_xattrs); format 1
    gave it to every encrypted regular file, and passing it reproduces that.
    """
    out = {XATTR_FSCRYPT_CONTEXT: ctx_raw}
    if binding is not None:
        out[XATTR_FSCRYPT_INO] = encode_decimal(binding[0])
        out[XATTR_FSCRYPT_FS_UUID] = encode_uuid(binding[1])
    if size is not None:
        out[XATTR_FSCRYPT_SIZE] = encode_decimal(size)
    if block_size is not None:
        out[XATTR_FSCRYPT_BLOCK_SIZE] = encode_decimal(block_size)
    return out


def encode_dir_xattrs(
    block_size: int, dirhash: tuple[int, bytes] | None = None
) -> dict[bytes, bytes]:
    """What every directory of an encrypting filesystem carries, once per
    directory so that it reaches the backup of any subtree: the block size,
    and `dirhash`, (hash version, s_hash_seed), on which the hash inside
    every no-key name depends.  A version the format has no name for (SipHash
    is only ever the casefold hash) is left out."""
    out = {XATTR_FSCRYPT_BLOCK_SIZE: encode_decimal(block_size)}
    if dirhash is not None and 0 <= dirhash[0] < len(DIRHASH_ALGORITHMS):
        out[XATTR_FSCRYPT_DIRHASH] = encode_dirhash(*dirhash)
    return out


def encode_dirhash(version: int, seed: bytes) -> bytes:
    """`<algorithm> <s_hash_seed as 32 hex digits>`."""
    if not 0 <= version < len(DIRHASH_ALGORITHMS) or len(seed) != 16:
        raise ValueError(f"no user.fscrypt.dirhash for hash version {version}")
    return DIRHASH_ALGORITHMS[version].encode("ascii") + b" " + encode_uuid(seed)


def decode_dirhash(value: bytes) -> tuple[int, bytes]:
    """(DX_HASH_* number, 16-byte seed) of a user.fscrypt.dirhash value.

    Only restore-image uses it; decrypt ignores the attribute, because the
    plaintext names it writes get their hashes from the new filesystem.
    """
    name, sep, seed = value.partition(b" ")
    algorithms = [a.encode("ascii") for a in DIRHASH_ALGORITHMS]
    if not sep or name not in algorithms:
        raise FormatError(f"user.fscrypt.dirhash names no hash algorithm: {value[:40]!r}")
    return algorithms.index(name), decode_uuid(seed, "user.fscrypt.dirhash seed")


@dataclass(frozen=True)
class FscryptAttrs:
    """The user.fscrypt.* attributes of one file or directory."""

    context: FscryptContext | None
    size: int | None = None
    ino: int | None = None
    fs_uuid: bytes | None = None
    block_size: int | None = None


def decode_xattrs(xattrs: dict[bytes, bytes], *, regular: bool) -> FscryptAttrs:
    """Parse the view's attributes of an entry; `context` is None when it has none."""
    raw = xattrs.get(XATTR_FSCRYPT_CONTEXT)
    block_size = None
    if XATTR_FSCRYPT_BLOCK_SIZE in xattrs:
        block_size = decode_block_size(xattrs[XATTR_FSCRYPT_BLOCK_SIZE])
    if raw is None:
        return FscryptAttrs(None, block_size=block_size)
    ctx = decode_context(raw)
    size = None
    if regular:
        if XATTR_FSCRYPT_SIZE not in xattrs:
            raise FormatError("encrypted file without user.fscrypt.size")
        size = decode_decimal(xattrs[XATTR_FSCRYPT_SIZE], "user.fscrypt.size")
    ino = fs_uuid = None
    if XATTR_FSCRYPT_INO in xattrs:
        ino = decode_decimal(xattrs[XATTR_FSCRYPT_INO], "user.fscrypt.ino")
    if XATTR_FSCRYPT_FS_UUID in xattrs:
        fs_uuid = decode_uuid(xattrs[XATTR_FSCRYPT_FS_UUID], "user.fscrypt.fs_uuid")
    if ctx.needs_inode_number and (ino is None or fs_uuid is None):
        raise FormatError(
            "policy with IV_INO_LBLK flags but no user.fscrypt.ino / user.fscrypt.fs_uuid"
        )
    return FscryptAttrs(ctx, size, ino, fs_uuid, block_size)


def has_fscrypt_xattrs(xattrs: dict[bytes, bytes]) -> bool:
    return any(k.startswith(XATTR_FSCRYPT_PREFIX) for k in xattrs)


def original_xattrs(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The attributes to restore: everything but the view's own user.fscrypt.*."""
    return {k: v for k, v in xattrs.items() if not k.startswith(XATTR_FSCRYPT_PREFIX)}


# -- encrypted symlinks --------------------------------------------------------


@dataclass(frozen=True)
class EncryptedSymlink:
    """What a restore needs of an encrypted symlink."""

    context_raw: bytes
    ciphertext: bytes
    ino: int | None = None
    fs_uuid: bytes | None = None

    @property
    def context(self) -> FscryptContext:
        return decode_context(self.context_raw)


def encode_symlink_inline(link: EncryptedSymlink) -> bytes:
    """`fscrypt:1:<ctx>:<ciphertext>[:<ino>:<uuid>]`, the form that carries everything."""
    parts = [base64url_encode(link.context_raw), base64url_encode(link.ciphertext)]
    if link.ino is not None and link.fs_uuid is not None:
        parts += [str(link.ino), link.fs_uuid.hex()]
    return SYMLINK_PREFIX + ":".join(parts).encode("ascii")


def encode_symlink_ref(ino: int) -> bytes:
    """`fscrypt:2:<ino>`: the target is the side file's line for inode `ino`."""
    return SYMLINK_REF_PREFIX + encode_decimal(ino)


_INO_DIGITS = len(str(2**32 - 1))
_UUID_DIGITS = 32


def symlink_inline_bound(ciphertext_len: int) -> int:
    """The longest inline form any encrypted symlink of at most `ciphertext_len`
    ciphertext bytes can have: the largest context, an inode number and a uuid.

    Within SYMLINK_INLINE_MAX, the symlink's target is inline whatever its
    body says, and the listing need not read it to know.
    """
    context = max(FSCRYPT_CONTEXT_V1_SIZE, FSCRYPT_CONTEXT_V2_SIZE)
    return (
        len(SYMLINK_PREFIX)
        + base64url_len(context)
        + 1
        + base64url_len(ciphertext_len)
        + 1
        + _INO_DIGITS
        + 1
        + _UUID_DIGITS
    )


def encode_symlink(link: EncryptedSymlink, ino: int) -> tuple[bytes, bytes | None]:
    """The view target of an encrypted symlink (format 2), and the inline form
    the directory's side file must carry when the target is a reference."""
    inline = encode_symlink_inline(link)
    if len(inline) <= SYMLINK_INLINE_MAX:
        return inline, None
    return encode_symlink_ref(ino), inline


def is_encrypted_symlink_target(target: bytes) -> bool:
    return target.startswith(SYMLINK_PREFIXES)


def decode_symlink_inline(target: bytes) -> EncryptedSymlink:
    """Split a `fscrypt:1:` target; FormatError for anything else."""
    if not target.startswith(SYMLINK_PREFIX):
        raise FormatError("target is not in the fscrypt:1: format")
    parts = target[len(SYMLINK_PREFIX) :].split(b":")
    if len(parts) not in (2, 4):
        raise FormatError(f"fscrypt:1: target with {len(parts)} fields, not 2 or 4")
    ctx_raw = _b64decode(parts[0], "fscrypt:1: target")
    ciphertext = _b64decode(parts[1], "fscrypt:1: target")
    if not ciphertext:
        raise FormatError("fscrypt:1: symlink target with an empty ciphertext")
    ino = fs_uuid = None
    if len(parts) == 4:
        ino = decode_decimal(parts[2], "symlink inode number")
        fs_uuid = decode_uuid(parts[3], "symlink fs uuid")
    ctx = decode_context(ctx_raw)
    if ctx.needs_inode_number and ino is None:
        raise FormatError("symlink with IV_INO_LBLK flags but no inode number and uuid")
    return EncryptedSymlink(ctx_raw, ciphertext, ino, fs_uuid)


def decode_symlink_ref(target: bytes) -> int:
    """The inode number a `fscrypt:2:` target refers to."""
    if not target.startswith(SYMLINK_REF_PREFIX):
        raise FormatError("target is not in the fscrypt:2: format")
    return decode_decimal(target[len(SYMLINK_REF_PREFIX) :], "fscrypt:2: symlink reference")


def decode_symlink(target: bytes, side: SideFile | None) -> EncryptedSymlink:
    """Either form; a reference is resolved in the directory's side file."""
    if target.startswith(SYMLINK_REF_PREFIX):
        ino = decode_symlink_ref(target)
        inline = (side.symlinks if side is not None else {}).get(ino)
        if inline is None:
            raise FormatError(
                f"long symlink target (inode {ino}) missing from the directory's "
                f"{SIDE_FILE_NAME.decode()}"
            )
        return decode_symlink_inline(inline)
    return decode_symlink_inline(target)


# -- the side file -------------------------------------------------------------


@dataclass
class SideFile:
    """One directory's side file: full ciphertext names of long no-key names,
    and the inline targets of long encrypted symlinks, by inode number."""

    names: dict[bytes, bytes] = field(default_factory=dict)
    symlinks: dict[int, bytes] = field(default_factory=dict)
    version: int = 2
    damaged: int = 0
    """Lines that could not be read (each entry needing one is reported)."""


def encode_side_file(names: list[tuple[bytes, bytes]], symlinks: dict[int, bytes]) -> bytes:
    """Format 2: the header, then `n <no-key name> <base64url ciphertext>` and
    `l <ino> <fscrypt:1: target>` lines, sorted."""
    lines = sorted({b"n %s %s\n" % (nk, base64url_encode(ct).encode()) for nk, ct in names})
    lines += [b"l %d %s\n" % (ino, t) for ino, t in sorted(symlinks.items())]
    return SIDE_FILE_HEADER + b"".join(lines)


def encode_side_file_v1(names: list[tuple[bytes, bytes]]) -> bytes:
    """Format 1 (no header, `<no-key name> <base64url ciphertext>` lines): what
    backups made before format 2 hold, for tests and fixtures."""
    lines = sorted({b"%s %s\n" % (nk, base64url_encode(ct).encode()) for nk, ct in names})
    return b"".join(lines)


def is_side_file_v2(head: bytes) -> bool:
    return head.startswith(SIDE_FILE_HEADER)


def decode_side_file(data: bytes) -> SideFile:
    """Both formats.  Malformed lines are counted, not fatal: an entry whose
    line is unusable is reported when it is looked up, which names the entry."""
    if data.startswith(SIDE_FILE_HEADER):
        side = SideFile(version=2)
        body = data[len(SIDE_FILE_HEADER) :]
    else:
        side = SideFile(version=1)
        body = data
    for line in body.split(b"\n"):
        if not line:
            continue
        try:
            if side.version == 1:
                _side_name(side, line)
            elif line.startswith(b"n "):
                _side_name(side, line[2:])
            elif line.startswith(b"l "):
                ino_text, sep, target = line[2:].partition(b" ")
                if not sep:
                    raise FormatError("symlink line without a target")
                decode_symlink_inline(target)
                side.symlinks[decode_decimal(ino_text, "side file inode number")] = target
            else:
                raise FormatError("unknown side file line")
        except FormatError:
            side.damaged += 1
    return side


def _side_name(side: SideFile, line: bytes) -> None:
    nokey, sep, full = line.partition(b" ")
    if not sep or not nokey:
        raise FormatError("side file line without a name")
    side.names[nokey] = _b64decode(full, "side file name")


# -- the fscrypt metadata entry at the view's root ----------------------------
#
# A view rooted below its filesystem's root does not contain the
# filesystem's `/.fscrypt`, and a view of a non-root filesystem holds only
# `.link` files for its login protectors, whose real files live on the root
# filesystem.  The view then shows one extra directory at its root holding
# copies of those metadata files, so that a backup of the view carries what
# a passphrase restore needs (docs/FORMAT.md, "fscrypt metadata in the view").

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
