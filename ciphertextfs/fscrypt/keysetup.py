"""Master keys and per-file keys (the kernel's keysetup.c, keysetup_v1.c, hkdf.c).

v2 policies derive every key with HKDF-SHA512 from the master key: the
extract step uses an all-zero salt, and each expand step's info starts
with "fscrypt\\0" and a one-byte context number so that no two purposes can
ever yield the same bytes.  v1 policies encrypt the master key with
AES-128-ECB keyed by the file's nonce (or use it directly for DIRECT_KEY).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import FscryptError, KeyMissingError, UnknownPolicyError
from .policy import (
    FSCRYPT_CONTEXT_V1,
    FSCRYPT_CONTEXT_V2,
    FSCRYPT_KEY_DESCRIPTOR_SIZE,
    FSCRYPT_KEY_IDENTIFIER_SIZE,
    FSCRYPT_MAX_KEY_SIZE,
    FSCRYPT_MIN_KEY_SIZE,
    FscryptContext,
    ModeInfo,
)

__all__ = [
    "MasterKey",
    "FileKey",
    "derive_file_key",
    "hkdf_sha512",
    "siphash24",
    "v1_descriptor",
]

HKDF_CONTEXT_KEY_IDENTIFIER = 1  # info = <empty>
HKDF_CONTEXT_PER_FILE_ENC_KEY = 2  # info = file nonce
HKDF_CONTEXT_DIRECT_KEY = 3  # info = mode number
HKDF_CONTEXT_IV_INO_LBLK_64_KEY = 4  # info = mode number || fs uuid
HKDF_CONTEXT_DIRHASH_KEY = 5  # info = file nonce
HKDF_CONTEXT_IV_INO_LBLK_32_KEY = 6  # info = mode number || fs uuid
HKDF_CONTEXT_INODE_HASH_KEY = 7  # info = <empty>

_HKDF_INFO_PREFIX = b"fscrypt\0"
_HASHLEN = 64

IV_RULE_INDEX = "index"  # per-file key; IV = data unit index
IV_RULE_NONCE = "nonce"  # DIRECT_KEY; IV = index || nonce
IV_RULE_INO_LBLK_64 = "ino_lblk_64"  # IV = ino << 32 | index
IV_RULE_INO_LBLK_32 = "ino_lblk_32"  # IV = (hashed ino + index) mod 2^32


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha512).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    if not 0 < length <= 255 * _HASHLEN:
        raise ValueError("bad HKDF output length")
    out = bytearray()
    t = b""
    i = 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha512).digest()
        out += t
        i += 1
    return bytes(out[:length])


def hkdf_sha512(ikm: bytes, info: bytes, length: int, salt: bytes = b"\0" * _HASHLEN) -> bytes:
    """Plain RFC 5869 HKDF-SHA512 (the kernel's salt is 64 zero bytes)."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 (Aumasson and Bernstein, 2012) with a 16-byte key, 64-bit result."""
    if len(key) != 16:
        raise ValueError("SipHash key must be 16 bytes")
    mask = 0xFFFFFFFFFFFFFFFF
    k0, k1 = struct.unpack("<QQ", key)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & mask
            v1 = rotl(v1, 13) ^ v0
            v0 = rotl(v0, 32)
            v2 = (v2 + v3) & mask
            v3 = rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & mask
            v3 = rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & mask
            v1 = rotl(v1, 17) ^ v2
            v2 = rotl(v2, 32)

    n = len(data)
    full = n - n % 8
    for (m,) in struct.iter_unpack("<Q", data[:full]):
        v3 ^= m
        rounds(2)
        v0 ^= m
    last = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= last
    rounds(2)
    v0 ^= last
    v2 ^= 0xFF
    rounds(4)
    return v0 ^ v1 ^ v2 ^ v3


def v1_descriptor(raw: bytes) -> bytes:
    """The conventional v1 key descriptor: SHA-512(SHA-512(key))[:8].

    The kernel does not compute descriptors (any 8 bytes will do); this is
    what e4crypt and the fscrypt tool use, so it names keys made by them.
    """
    return hashlib.sha512(hashlib.sha512(raw).digest()).digest()[:FSCRYPT_KEY_DESCRIPTOR_SIZE]


class MasterKey:
    """Raw master key material with its HKDF pseudorandom key computed once."""

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if not FSCRYPT_MIN_KEY_SIZE <= len(raw) <= FSCRYPT_MAX_KEY_SIZE:
            raise FscryptError(
                f"fscrypt master keys have {FSCRYPT_MIN_KEY_SIZE} to "
                f"{FSCRYPT_MAX_KEY_SIZE} bytes, not {len(raw)}"
            )
        self.raw = raw
        self._prk: bytes | None = None
        self._identifier: bytes | None = None
        # Per-mode keys only: per-file keys are used once and would pile up.
        self._cache: dict[tuple[int, bytes, int], bytes] = {}

    def __repr__(self) -> str:
        return f"MasterKey(<{len(self.raw)} bytes>, identifier={self.identifier.hex()})"

    @property
    def prk(self) -> bytes:
        if self._prk is None:
            self._prk = hkdf_extract(b"\0" * _HASHLEN, self.raw)
        return self._prk

    def hkdf(self, context: int, info: bytes, length: int) -> bytes:
        """fscrypt_hkdf_expand(): HKDF-Expand with the "fscrypt\\0" + context prefix."""
        k = (context, bytes(info), length)
        out = self._cache.get(k)
        if out is None:
            out = hkdf_expand(self.prk, _HKDF_INFO_PREFIX + bytes([context]) + info, length)
            if context not in (HKDF_CONTEXT_PER_FILE_ENC_KEY, HKDF_CONTEXT_DIRHASH_KEY):
                self._cache[k] = out
        return out

    @property
    def identifier(self) -> bytes:
        """The v2 master_key_identifier the kernel computes for this key."""
        if self._identifier is None:
            self._identifier = self.hkdf(
                HKDF_CONTEXT_KEY_IDENTIFIER, b"", FSCRYPT_KEY_IDENTIFIER_SIZE
            )
        return self._identifier

    @property
    def descriptor(self) -> bytes:
        """The conventional v1 descriptor (see v1_descriptor())."""
        return v1_descriptor(self.raw)

    def inode_hash_key(self) -> bytes:
        return self.hkdf(HKDF_CONTEXT_INODE_HASH_KEY, b"", 16)

    def hashed_ino(self, ino: int) -> int:
        """ci_hashed_ino of IV_INO_LBLK_32 policies."""
        if not 0 <= ino <= 0xFFFFFFFFFFFFFFFF:
            raise ValueError("inode number out of range")
        return siphash24(self.inode_hash_key(), struct.pack("<Q", ino)) & 0xFFFFFFFF


@dataclass(frozen=True)
class FileKey:
    """Everything needed to en/decrypt one inode's contents or names.

    `iv_rule` is one of IV_RULE_*; `ino`, `hashed_ino` and `nonce` are set
    when the rule uses them.  `data_unit_size` is None for filename keys.
    `padding` is the policy's filename padding (names and symlink targets).
    """

    key: bytes
    mode: int
    iv_rule: str
    padding: int
    data_unit_size: int | None = None
    nonce: bytes | None = None
    ino: int | None = None
    hashed_ino: int | None = None

    def __repr__(self) -> str:
        return (
            f"FileKey(mode={self.mode}, iv_rule={self.iv_rule}, "
            f"data_unit_size={self.data_unit_size}, ino={self.ino})"
        )


def _aes128_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def derive_file_key(
    master: MasterKey,
    ctx: FscryptContext,
    *,
    ino: int | None = None,
    fs_uuid: bytes | None = None,
    for_filenames: bool,
    block_size: int | None = None,
    check_identifier: bool = True,
) -> FileKey:
    """The key the kernel would set up for an inode with context `ctx`.

    `for_filenames` selects the filenames mode (directories and symlinks)
    rather than the contents mode (regular files).  `ino` and `fs_uuid`
    (s_uuid) are required by IV_INO_LBLK_* policies; `block_size` by
    contents keys, to know the data unit size.  A v2 master key whose
    identifier differs from the context's raises KeyMissingError, as does a
    master key shorter than the mode's key.

    Split as the kernel's fscrypt_setup_encryption_info() is: the checks
    that need no key, then v1 (keysetup_v1.c), or v2 with a key shared by
    all files of a mode (fscrypt_setup_per_mode_enc_key()) or the per-file
    key.
    """
    mode = ctx.filenames if for_filenames else ctx.contents
    dus = _check_key_inputs(master, ctx, mode, ino, fs_uuid, for_filenames, block_size)
    common = {"mode": mode.number, "padding": ctx.filename_padding, "data_unit_size": dus}
    if ctx.version == FSCRYPT_CONTEXT_V1:
        return _setup_v1_key(master, ctx, mode, common)
    if ctx.version != FSCRYPT_CONTEXT_V2:
        raise FscryptError(f"unknown context version {ctx.version}")
    if check_identifier and master.identifier != ctx.key_spec:
        raise KeyMissingError(
            f"key identifier {master.identifier.hex()} is not the policy's {ctx.key_spec.hex()}"
        )
    if ctx.direct_key or ctx.needs_inode_number:
        return _setup_v2_per_mode_key(master, ctx, mode, ino, fs_uuid, common)
    key = master.hkdf(HKDF_CONTEXT_PER_FILE_ENC_KEY, ctx.nonce, mode.keysize)
    return FileKey(key, iv_rule=IV_RULE_INDEX, **common)


def _check_key_inputs(
    master: MasterKey,
    ctx: FscryptContext,
    mode: ModeInfo,
    ino: int | None,
    fs_uuid: bytes | None,
    for_filenames: bool,
    block_size: int | None,
) -> int | None:
    """What must hold before any key is derived; the data unit size of contents keys."""
    if len(master.raw) < mode.keysize:
        raise KeyMissingError(
            f"{len(master.raw)}-byte master key is too short for {mode.name} ({mode.keysize} bytes)"
        )
    dus: int | None = None
    if not for_filenames:
        if block_size is None:
            raise ValueError("contents keys need the filesystem block size")
        dus = ctx.data_unit_size(block_size)
        if dus > block_size or dus < 512:
            raise FscryptError(f"data unit size {dus} impossible with block size {block_size}")
        if ctx.needs_inode_number and dus != block_size:
            # ext4's 32-bit logical block numbers leave no room for sub-block
            # indices in the 32-bit IV field; the kernel refuses the policy.
            raise UnknownPolicyError("IV_INO_LBLK policies with sub-block data units")
    if ctx.needs_inode_number:
        if ino is None or fs_uuid is None:
            raise KeyMissingError("IV_INO_LBLK policies need the inode number and s_uuid")
        if not 0 < ino <= 0xFFFFFFFF:
            raise FscryptError(f"inode number {ino} unusable with IV_INO_LBLK policies")
        if len(fs_uuid) != 16:
            raise FscryptError("s_uuid must be 16 bytes")
    return dus


def _setup_v1_key(master: MasterKey, ctx: FscryptContext, mode: ModeInfo, common: dict) -> FileKey:
    """v1: the master key itself (DIRECT_KEY), or AES-128-ECB of it under the nonce."""
    if ctx.direct_key:
        return FileKey(master.raw[: mode.keysize], iv_rule=IV_RULE_NONCE, nonce=ctx.nonce, **common)
    key = _aes128_ecb_encrypt(ctx.nonce, master.raw[: mode.keysize])
    return FileKey(key, iv_rule=IV_RULE_INDEX, **common)


def _setup_v2_per_mode_key(
    master: MasterKey,
    ctx: FscryptContext,
    mode: ModeInfo,
    ino: int | None,
    fs_uuid: bytes | None,
    common: dict,
) -> FileKey:
    """v2 keys shared by every file of a mode (and filesystem): the IV tells files apart."""
    mode_num = bytes([mode.number])
    if ctx.direct_key:
        key = master.hkdf(HKDF_CONTEXT_DIRECT_KEY, mode_num, mode.keysize)
        return FileKey(key, iv_rule=IV_RULE_NONCE, nonce=ctx.nonce, **common)
    assert fs_uuid is not None and ino is not None
    if ctx.iv_ino_lblk_64:
        key = master.hkdf(HKDF_CONTEXT_IV_INO_LBLK_64_KEY, mode_num + bytes(fs_uuid), mode.keysize)
        return FileKey(key, iv_rule=IV_RULE_INO_LBLK_64, ino=ino, **common)
    key = master.hkdf(HKDF_CONTEXT_IV_INO_LBLK_32_KEY, mode_num + bytes(fs_uuid), mode.keysize)
    return FileKey(
        key, iv_rule=IV_RULE_INO_LBLK_32, ino=ino, hashed_ino=master.hashed_ino(ino), **common
    )
