"""Encryption contexts as ext4 stores them (the kernel's fs/crypto/policy.c).

ext4 keeps an encrypted inode's context in an xattr of its own (see
ciphertextfs.ext4.xattr); this layer knows only its bytes.  The context is the
policy plus the per-file nonce; everything needed to pick a key and an IV
rule follows from it, so it is parsed strictly: an unknown version, mode
or flag is reported, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ciphers.modes import (
    Crypt,
    adiantum,
    aes_cbc_essiv,
    aes_cts_cbc,
    aes_hctr2,
    aes_xts,
    sm4_cts_cbc,
    sm4_xts,
)
from .errors import FscryptError, KeyMissingError, UnknownPolicyError

__all__ = [
    "FscryptError",
    "UnknownPolicyError",
    "KeyMissingError",
    "FscryptContext",
    "ModeInfo",
    "MODES",
    "parse_context",
    "build_context",
]


FSCRYPT_CONTEXT_V1 = 1
FSCRYPT_CONTEXT_V2 = 2
FSCRYPT_CONTEXT_V1_SIZE = 28
FSCRYPT_CONTEXT_V2_SIZE = 40

# Version numbers of the ioctl structs (not of the on-disk context: v1 is 0 there).
FSCRYPT_POLICY_V1 = 0
FSCRYPT_POLICY_V2 = 2

FSCRYPT_KEY_DESCRIPTOR_SIZE = 8
FSCRYPT_KEY_IDENTIFIER_SIZE = 16
FSCRYPT_FILE_NONCE_SIZE = 16
FSCRYPT_MIN_KEY_SIZE = 16
FSCRYPT_MAX_KEY_SIZE = 64

FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_MODE_AES_128_CBC = 5
FSCRYPT_MODE_AES_128_CTS = 6
FSCRYPT_MODE_SM4_XTS = 7
FSCRYPT_MODE_SM4_CTS = 8
FSCRYPT_MODE_ADIANTUM = 9
FSCRYPT_MODE_AES_256_HCTR2 = 10

FSCRYPT_POLICY_FLAGS_PAD_4 = 0x00
FSCRYPT_POLICY_FLAGS_PAD_8 = 0x01
FSCRYPT_POLICY_FLAGS_PAD_16 = 0x02
FSCRYPT_POLICY_FLAGS_PAD_32 = 0x03
FSCRYPT_POLICY_FLAGS_PAD_MASK = 0x03
FSCRYPT_POLICY_FLAG_DIRECT_KEY = 0x04
FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64 = 0x08
FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32 = 0x10

FSCRYPT_POLICY_FLAGS_VALID_V1 = FSCRYPT_POLICY_FLAGS_PAD_MASK | FSCRYPT_POLICY_FLAG_DIRECT_KEY
FSCRYPT_POLICY_FLAGS_VALID_V2 = (
    FSCRYPT_POLICY_FLAGS_VALID_V1
    | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64
    | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32
)

# The smallest filename ciphertext: one cipher block, so short names still
# go through the whole CTS/wide-block construction.
FSCRYPT_FNAME_MIN_MSG_LEN = 16
SECTOR_SHIFT = 9


@dataclass(frozen=True)
class ModeInfo:
    """One row of the kernel's fscrypt_modes[]: the mode's facts and its cipher.

    `contents` and `filenames` are the implementations for that use, or None
    where the kernel does not allow the mode there; crypto.py and fname.py
    dispatch through them and nowhere else.
    """

    number: int
    name: str
    keysize: int
    ivsize: int
    contents: Crypt | None
    filenames: Crypt | None
    # Contents ciphertext granularity: 16 for block-wise modes, 0 meaning
    # "the whole data unit" for wide-block modes.
    granularity: int


MODES: dict[int, ModeInfo] = {
    m.number: m
    for m in (
        ModeInfo(FSCRYPT_MODE_AES_256_XTS, "AES-256-XTS", 64, 16, aes_xts, None, 16),
        ModeInfo(FSCRYPT_MODE_AES_256_CTS, "AES-256-CTS-CBC", 32, 16, None, aes_cts_cbc, 16),
        ModeInfo(FSCRYPT_MODE_AES_128_CBC, "AES-128-CBC-ESSIV", 16, 16, aes_cbc_essiv, None, 16),
        ModeInfo(FSCRYPT_MODE_AES_128_CTS, "AES-128-CTS-CBC", 16, 16, None, aes_cts_cbc, 16),
        ModeInfo(FSCRYPT_MODE_SM4_XTS, "SM4-XTS", 32, 16, sm4_xts, None, 16),
        ModeInfo(FSCRYPT_MODE_SM4_CTS, "SM4-CTS-CBC", 16, 16, None, sm4_cts_cbc, 16),
        ModeInfo(FSCRYPT_MODE_ADIANTUM, "Adiantum", 32, 32, adiantum, adiantum, 0),
        ModeInfo(FSCRYPT_MODE_AES_256_HCTR2, "AES-256-HCTR2", 32, 32, None, aes_hctr2, 0),
    )
}

# (contents, filenames) pairs the kernel accepts, per context version.
VALID_MODE_PAIRS_V1 = frozenset(
    {
        (FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_CTS),
        (FSCRYPT_MODE_AES_128_CBC, FSCRYPT_MODE_AES_128_CTS),
        (FSCRYPT_MODE_ADIANTUM, FSCRYPT_MODE_ADIANTUM),
    }
)
VALID_MODE_PAIRS_V2 = VALID_MODE_PAIRS_V1 | {
    (FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_HCTR2),
    (FSCRYPT_MODE_SM4_XTS, FSCRYPT_MODE_SM4_CTS),
}

_FLAG_NAMES = (
    (FSCRYPT_POLICY_FLAG_DIRECT_KEY, "DIRECT_KEY"),
    (FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64, "IV_INO_LBLK_64"),
    (FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32, "IV_INO_LBLK_32"),
)


def mode_info(mode: int) -> ModeInfo:
    try:
        return MODES[mode]
    except KeyError:
        raise UnknownPolicyError(f"unknown fscrypt encryption mode {mode}") from None


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class FscryptContext:
    """A parsed fscrypt_context_v1 or fscrypt_context_v2.

    `key_spec` is the 8-byte master_key_descriptor (v1) or the 16-byte
    master_key_identifier (v2).  `log2_data_unit_size` is 0 for v1 and for
    v2 policies that use the filesystem block size.
    """

    version: int
    contents_mode: int
    filenames_mode: int
    flags: int
    key_spec: bytes
    nonce: bytes
    log2_data_unit_size: int = 0

    @property
    def master_key_descriptor(self) -> bytes | None:
        return self.key_spec if self.version == FSCRYPT_CONTEXT_V1 else None

    @property
    def master_key_identifier(self) -> bytes | None:
        return self.key_spec if self.version == FSCRYPT_CONTEXT_V2 else None

    @property
    def contents(self) -> ModeInfo:
        return mode_info(self.contents_mode)

    @property
    def filenames(self) -> ModeInfo:
        return mode_info(self.filenames_mode)

    @property
    def filename_padding(self) -> int:
        """NUL padding granularity of encrypted names and symlink targets."""
        return 4 << (self.flags & FSCRYPT_POLICY_FLAGS_PAD_MASK)

    @property
    def direct_key(self) -> bool:
        return bool(self.flags & FSCRYPT_POLICY_FLAG_DIRECT_KEY)

    @property
    def iv_ino_lblk_64(self) -> bool:
        return bool(self.flags & FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64)

    @property
    def iv_ino_lblk_32(self) -> bool:
        return bool(self.flags & FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32)

    @property
    def needs_inode_number(self) -> bool:
        """Whether keys/IVs depend on the inode number and the filesystem UUID.

        Such files can only be decrypted elsewhere if the original inode
        number and s_uuid travel with the backup.
        """
        return self.iv_ino_lblk_64 or self.iv_ino_lblk_32

    def data_unit_size(self, block_size: int) -> int:
        """Bytes per contents data unit: custom (v2) or the filesystem block size."""
        if self.log2_data_unit_size:
            return 1 << self.log2_data_unit_size
        return block_size

    def ciphertext_size(self, real_size: int, block_size: int) -> int:
        """Length of the ciphertext that must be kept to decrypt `real_size` bytes.

        Block-wise modes (XTS, CBC-ESSIV) decrypt any prefix of a data unit
        that is a whole number of 16-byte blocks; wide-block Adiantum needs
        the whole last data unit.
        """
        if real_size < 0:
            raise ValueError("negative size")
        g = self.contents.granularity or self.data_unit_size(block_size)
        return round_up(real_size, g)

    def flag_names(self) -> list[str]:
        names = [f"PAD_{self.filename_padding}"]
        names += [name for bit, name in _FLAG_NAMES if self.flags & bit]
        return names

    def describe(self) -> str:
        """One line for `ciphertextfs inspect` and error messages."""
        key = "descriptor" if self.version == FSCRYPT_CONTEXT_V1 else "identifier"
        parts = [
            f"fscrypt v{self.version}",
            f"contents {self.contents.name}",
            f"filenames {self.filenames.name}",
            "flags " + "|".join(self.flag_names()),
        ]
        if self.log2_data_unit_size:
            parts.append(f"data unit {1 << self.log2_data_unit_size}")
        parts += [f"key {key} {self.key_spec.hex()}", f"nonce {self.nonce.hex()}"]
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "contents_encryption_mode": self.contents_mode,
            "contents_encryption_mode_name": self.contents.name,
            "filenames_encryption_mode": self.filenames_mode,
            "filenames_encryption_mode_name": self.filenames.name,
            "flags": self.flags,
            "flag_names": self.flag_names(),
            "nonce": self.nonce.hex(),
        }
        if self.version == FSCRYPT_CONTEXT_V1:
            d["master_key_descriptor"] = self.key_spec.hex()
        else:
            d["master_key_identifier"] = self.key_spec.hex()
            d["log2_data_unit_size"] = self.log2_data_unit_size
        return d

    def to_bytes(self) -> bytes:
        """The on-disk context, exactly as parse_context() accepts it."""
        if self.version == FSCRYPT_CONTEXT_V1:
            return (
                bytes([self.version, self.contents_mode, self.filenames_mode, self.flags])
                + self.key_spec
                + self.nonce
            )
        return (
            bytes(
                [
                    self.version,
                    self.contents_mode,
                    self.filenames_mode,
                    self.flags,
                    self.log2_data_unit_size,
                    0,
                    0,
                    0,
                ]
            )
            + self.key_spec
            + self.nonce
        )

    def check(self) -> None:
        """Apply the kernel's fscrypt_supported_v1/v2_policy() rules that need no inode.

        Rules that depend on the filesystem (stable_inodes, inode number
        width, block size) are the caller's business.
        """
        if self.version not in (FSCRYPT_CONTEXT_V1, FSCRYPT_CONTEXT_V2):
            raise UnknownPolicyError(f"unknown fscrypt context version {self.version}")
        for m in (self.contents_mode, self.filenames_mode):
            mode_info(m)
        v1 = self.version == FSCRYPT_CONTEXT_V1
        pairs = VALID_MODE_PAIRS_V1 if v1 else VALID_MODE_PAIRS_V2
        if (self.contents_mode, self.filenames_mode) not in pairs:
            raise UnknownPolicyError(
                f"unsupported fscrypt v{self.version} mode pair: contents "
                f"{self.contents.name}, filenames {self.filenames.name}"
            )
        valid = FSCRYPT_POLICY_FLAGS_VALID_V1 if v1 else FSCRYPT_POLICY_FLAGS_VALID_V2
        if self.flags & ~valid:
            raise UnknownPolicyError(
                f"unknown fscrypt v{self.version} policy flags 0x{self.flags & ~valid:02x}"
            )
        exclusive = self.flags & (
            FSCRYPT_POLICY_FLAG_DIRECT_KEY
            | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64
            | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32
        )
        if exclusive & (exclusive - 1):
            raise UnknownPolicyError(f"mutually exclusive fscrypt flags 0x{self.flags:02x}")
        if self.direct_key and (
            self.contents_mode != self.filenames_mode
            or self.contents.ivsize < 8 + FSCRYPT_FILE_NONCE_SIZE
        ):
            raise UnknownPolicyError(
                f"DIRECT_KEY needs a wide-IV mode for both contents and filenames, "
                f"not {self.contents.name}/{self.filenames.name}"
            )
        if self.needs_inode_number and self.contents_mode != FSCRYPT_MODE_AES_256_XTS:
            raise UnknownPolicyError("IV_INO_LBLK policies need AES-256-XTS contents")
        if self.log2_data_unit_size:
            if v1:
                raise UnknownPolicyError("v1 contexts have no data unit size")
            if not SECTOR_SHIFT <= self.log2_data_unit_size <= 16:
                raise UnknownPolicyError(
                    f"unsupported log2_data_unit_size {self.log2_data_unit_size}"
                )


def parse_context(raw: bytes) -> FscryptContext:
    """Parse the value of the ext4 encryption xattr (index 9, name "c")."""
    raw = bytes(raw)
    if not raw:
        raise FscryptError("empty fscrypt context")
    version = raw[0]
    if version == FSCRYPT_CONTEXT_V1:
        if len(raw) != FSCRYPT_CONTEXT_V1_SIZE:
            raise FscryptError(f"fscrypt v1 context of {len(raw)} bytes, expected 28")
        ctx = FscryptContext(
            version=version,
            contents_mode=raw[1],
            filenames_mode=raw[2],
            flags=raw[3],
            key_spec=raw[4:12],
            nonce=raw[12:28],
        )
    elif version == FSCRYPT_CONTEXT_V2:
        if len(raw) != FSCRYPT_CONTEXT_V2_SIZE:
            raise FscryptError(f"fscrypt v2 context of {len(raw)} bytes, expected 40")
        if any(raw[5:8]):
            raise UnknownPolicyError("fscrypt v2 context with nonzero reserved bytes")
        ctx = FscryptContext(
            version=version,
            contents_mode=raw[1],
            filenames_mode=raw[2],
            flags=raw[3],
            log2_data_unit_size=raw[4],
            key_spec=raw[8:24],
            nonce=raw[24:40],
        )
    else:
        raise UnknownPolicyError(f"unknown fscrypt context version {version}")
    ctx.check()
    return ctx


def build_context(
    version: int,
    key_spec: bytes,
    nonce: bytes,
    *,
    contents_mode: int = FSCRYPT_MODE_AES_256_XTS,
    filenames_mode: int = FSCRYPT_MODE_AES_256_CTS,
    flags: int = FSCRYPT_POLICY_FLAGS_PAD_32,
    log2_data_unit_size: int = 0,
) -> FscryptContext:
    """A checked context from its parts (tests, and contexts read through ioctls)."""
    want = FSCRYPT_KEY_DESCRIPTOR_SIZE if version == 1 else FSCRYPT_KEY_IDENTIFIER_SIZE
    if len(key_spec) != want or len(nonce) != FSCRYPT_FILE_NONCE_SIZE:
        raise FscryptError("bad key specifier or nonce length")
    ctx = FscryptContext(
        version=version,
        contents_mode=contents_mode,
        filenames_mode=filenames_mode,
        flags=flags,
        key_spec=bytes(key_spec),
        nonce=bytes(nonce),
        log2_data_unit_size=log2_data_unit_size,
    )
    ctx.check()
    return ctx
