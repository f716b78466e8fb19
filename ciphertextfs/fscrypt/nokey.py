"""No-key names: how the kernel shows encrypted names without the key.

Since Linux 5.15 (fs/crypto/fname.c) a locked directory lists each entry
as the base64url encoding of struct fscrypt_nokey_name.  The view uses the
very same names so that a backup looks exactly like a locked directory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from .errors import FscryptError

__all__ = [
    "FSCRYPT_NOKEY_NAME_MAX",
    "FSCRYPT_NOKEY_NAME_MAX_ENCODED",
    "NokeyName",
    "base64url_encode",
    "base64url_encode_bytes",
    "base64url_len",
    "base64url_decode",
    "nokey_name",
    "nokey_name_bytes",
    "parse_nokey_name",
    "is_long",
]

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

FSCRYPT_NOKEY_NAME_DIRHASH_SIZE = 8
FSCRYPT_NOKEY_NAME_BYTES = 149  # ciphertext bytes kept verbatim
FSCRYPT_NOKEY_NAME_SHA256_SIZE = 32
FSCRYPT_NOKEY_NAME_MAX = (
    FSCRYPT_NOKEY_NAME_DIRHASH_SIZE + FSCRYPT_NOKEY_NAME_BYTES + FSCRYPT_NOKEY_NAME_SHA256_SIZE
)


def base64url_len(n: int) -> int:
    """Length of the unpadded base64url encoding of `n` bytes."""
    return (4 * n + 2) // 3


FSCRYPT_NOKEY_NAME_MAX_ENCODED = base64url_len(FSCRYPT_NOKEY_NAME_MAX)  # 252 <= NAME_MAX

_SHORT_MAX = FSCRYPT_NOKEY_NAME_DIRHASH_SIZE + FSCRYPT_NOKEY_NAME_BYTES


_URLSAFE = bytes.maketrans(b"+/", b"-_")
_HASHES = struct.Struct("<II")


def base64url_encode_bytes(data: bytes) -> bytes:
    """RFC 4648 base64url without '=' padding, like fscrypt_base64url_encode().

    binascii directly: a listing encodes every name of a directory.
    """
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def base64url_encode(data: bytes) -> str:
    return base64url_encode_bytes(data).decode("ascii")


def base64url_decode(text: str | bytes) -> bytes:
    """Strict inverse of base64url_encode().

    Rejects characters outside the alphabet, '=' padding, a length that
    leaves a lone 6-bit group, and nonzero leftover bits: each byte string
    has exactly one accepted encoding, so a name maps to one ciphertext.
    """
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise FscryptError("base64url text is not ASCII") from None
    else:
        raw = bytes(text)
    if len(raw) % 4 == 1:
        raise FscryptError(f"base64url text of impossible length {len(raw)}")
    bad = raw.translate(None, _ALPHABET)
    if bad:
        raise FscryptError(f"invalid base64url character {chr(bad[0])!r}")
    out = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    if base64url_encode_bytes(out) != raw:
        raise FscryptError("base64url text with nonzero trailing bits")
    return out


def is_long(ciphertext_len: int) -> bool:
    """Whether the no-key name of such a ciphertext name loses information."""
    return ciphertext_len > FSCRYPT_NOKEY_NAME_BYTES


@dataclass(frozen=True)
class NokeyName:
    """A decoded struct fscrypt_nokey_name.

    `prefix` is the whole ciphertext name when `sha256` is None, otherwise
    its first 149 bytes and `sha256` covers the remaining bytes.
    """

    hash: int
    minor_hash: int
    prefix: bytes
    sha256: bytes | None

    def matches(self, ciphertext: bytes) -> bool:
        """Whether `ciphertext` is a name this no-key name may stand for (dirhash aside)."""
        if self.sha256 is None:
            return ciphertext == self.prefix
        return (
            is_long(len(ciphertext))
            and ciphertext[:FSCRYPT_NOKEY_NAME_BYTES] == self.prefix
            and hashlib.sha256(ciphertext[FSCRYPT_NOKEY_NAME_BYTES:]).digest() == self.sha256
        )


def nokey_name_bytes(ciphertext: bytes, hash: int = 0, minor_hash: int = 0) -> bytes:
    """The name the kernel lists for `ciphertext` in a locked directory.

    `hash`/`minor_hash` are what the filesystem's readdir passes: zeros for
    linearly read directories, the dx hash of the ciphertext name otherwise.
    """
    if not ciphertext:
        raise FscryptError("empty ciphertext name")
    if not (0 <= hash <= 0xFFFFFFFF and 0 <= minor_hash <= 0xFFFFFFFF):
        raise ValueError("dirhash out of range")
    head = _HASHES.pack(hash, minor_hash)
    if is_long(len(ciphertext)):
        body = (
            ciphertext[:FSCRYPT_NOKEY_NAME_BYTES]
            + hashlib.sha256(ciphertext[FSCRYPT_NOKEY_NAME_BYTES:]).digest()
        )
    else:
        body = bytes(ciphertext)
    return base64url_encode_bytes(head + body)


def nokey_name(ciphertext: bytes, hash: int = 0, minor_hash: int = 0) -> str:
    return nokey_name_bytes(ciphertext, hash, minor_hash).decode("ascii")


def parse_nokey_name(name: str | bytes) -> NokeyName:
    """Decode a no-key name; raises FscryptError if it cannot be one."""
    if len(name) > FSCRYPT_NOKEY_NAME_MAX_ENCODED:
        raise FscryptError("no-key name too long")
    raw = base64url_decode(name)
    n = len(raw)
    if n <= FSCRYPT_NOKEY_NAME_DIRHASH_SIZE or (_SHORT_MAX < n < FSCRYPT_NOKEY_NAME_MAX):
        raise FscryptError(f"no-key name decodes to an impossible {n} bytes")
    h, minor = struct.unpack_from("<II", raw)
    if n == FSCRYPT_NOKEY_NAME_MAX:
        return NokeyName(h, minor, raw[8:_SHORT_MAX], raw[_SHORT_MAX:])
    return NokeyName(h, minor, raw[8:], None)
