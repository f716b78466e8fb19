"""Contents encryption per data unit (the kernel's fs/crypto/crypto.c).

Each data unit (the filesystem block, or the v2 policy's custom size) is
encrypted independently under an IV built by fscrypt_generate_iv() from the
data unit's index within the file.  Block-wise modes (XTS, CBC-ESSIV) also
decrypt a prefix of a unit that is a whole number of 16-byte blocks, which
is how the last unit of a file is kept short in the view.
"""

from __future__ import annotations

from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import FscryptError
from .keysetup import (
    IV_RULE_INDEX,
    IV_RULE_INO_LBLK_32,
    IV_RULE_INO_LBLK_64,
    IV_RULE_NONCE,
    FileKey,
)
from .policy import FSCRYPT_MODE_AES_256_XTS, mode_info

__all__ = [
    "generate_iv",
    "iv_index_rule",
    "decrypt_data_unit",
    "decrypt_contents",
    "encrypt_contents",
]

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def iv_index_rule(filekey: FileKey, first_index: int, count: int = 1) -> tuple[int, int]:
    """(add, mask): the IV index of data unit n is (n + add) & mask.

    The one statement of the IV rules, checked for the whole run of `count`
    units from `first_index` at once, so that the per-unit loops stay
    integer arithmetic.  IV_INO_LBLK_64 puts the inode number in the high
    half (the index is at most 32 bits, so the sum is the kernel's OR);
    IV_INO_LBLK_32 adds the hashed inode number modulo 2^32.
    """
    if first_index < 0:
        raise ValueError("negative data unit index")
    last = first_index + max(count, 1) - 1
    rule = filekey.iv_rule
    if rule in (IV_RULE_INDEX, IV_RULE_NONCE):
        if rule == IV_RULE_NONCE and filekey.nonce is None:
            raise FscryptError("DIRECT_KEY needs the nonce")
        if last > _U64:
            raise FscryptError("data unit index beyond 64 bits")
        return 0, _U64
    if rule == IV_RULE_INO_LBLK_64:
        if last > _U32 or filekey.ino is None or filekey.ino > _U32:
            raise FscryptError("IV_INO_LBLK_64 needs a 32-bit index and inode number")
        return filekey.ino << 32, _U64
    if rule == IV_RULE_INO_LBLK_32:
        if last > _U32 or filekey.hashed_ino is None:
            raise FscryptError("IV_INO_LBLK_32 needs a 32-bit index and a hashed inode number")
        return filekey.hashed_ino, _U32
    raise FscryptError(f"unknown IV rule {rule!r}")


def generate_iv(filekey: FileKey, index: int) -> bytes:
    """fscrypt_generate_iv(): union fscrypt_iv, ivsize bytes of it.

    The layout is a little-endian 64-bit index followed by the 16-byte
    nonce (DIRECT_KEY only) and zeros up to the mode's IV size (16, or 32
    for the wide-block modes, which use it as their tweak).
    """
    add, mask = iv_index_rule(filekey, index)
    iv = ((index + add) & mask).to_bytes(8, "little")
    if filekey.iv_rule == IV_RULE_NONCE:
        assert filekey.nonce is not None
        iv += filekey.nonce
    size = mode_info(filekey.mode).ivsize
    if len(iv) > size:
        raise FscryptError("DIRECT_KEY nonce does not fit this mode's IV")
    return iv + bytes(size - len(iv))


def _crypt_unit(filekey: FileKey, index: int, data: bytes, encrypt: bool) -> bytes:
    info = mode_info(filekey.mode)
    if info.contents is None:
        raise FscryptError(f"mode {info.name} cannot encrypt contents")
    n = len(data)
    if n < 16:
        raise FscryptError(f"data unit piece of {n} bytes: under one cipher block")
    if info.granularity and n % info.granularity:
        raise FscryptError(f"ciphertext piece of {n} bytes is not whole 16-byte blocks")
    return info.contents(filekey.key, generate_iv(filekey, index), data, encrypt)


def decrypt_data_unit(filekey: FileKey, index: int, data: bytes) -> bytes:
    """Decrypt one data unit (or, for block-wise modes, a 16-byte-multiple prefix)."""
    return _crypt_unit(filekey, index, bytes(data), False)


def _unit_size(filekey: FileKey) -> int:
    dus = filekey.data_unit_size
    if dus is None:
        raise FscryptError("a filenames key cannot decrypt contents")
    return dus


def _check_pieces(filekey: FileKey, length: int, dus: int) -> None:
    last = length % dus
    if not mode_info(filekey.mode).granularity and last:
        raise FscryptError(f"{length} bytes of ciphertext: not whole {dus}-byte units")
    if last % 16:
        raise FscryptError(f"{length} bytes of ciphertext: not whole 16-byte blocks")


def _units_to_decrypt(buf: bytes, dus: int, holes: bool) -> Iterator[tuple[int, int]]:
    """(unit number, offset) of every unit, or, with `holes`, of every one not all zeros.

    An all-zero ciphertext unit is a hole or unwritten extent of the source
    (the kernel reads it as zeros); this is the one place that rule lives.
    """
    n = len(buf)
    # bytes == bytes is a memcmp; memoryview == memoryview is not.
    zero = bytes(dus)
    for i, off in enumerate(range(0, n, dus)):
        if not (holes and buf[off : off + dus] == zero[: n - off]):
            yield i, off


def _decrypt_xts(filekey: FileKey, buf: bytes, first_index: int, dus: int, holes: bool) -> bytes:
    """AES-256-XTS over many units with as little Python per unit as possible."""
    mv = memoryview(buf)
    n = len(mv)
    count = -(-n // dus)
    if filekey.iv_rule == IV_RULE_NONCE:
        raise FscryptError("DIRECT_KEY does not apply to AES-256-XTS")
    add, mask = iv_index_rule(filekey, first_index, count)
    alg = algorithms.AES(filekey.key)
    # update_into() wants room for one more block than it writes.
    out = bytearray(n + 16)
    omv = memoryview(out)
    xts = modes.XTS
    for i, off in _units_to_decrypt(buf, dus, holes):
        piece = mv[off : off + dus]
        tweak = ((first_index + i + add) & mask).to_bytes(16, "little")
        Cipher(alg, xts(tweak)).decryptor().update_into(piece, omv[off : off + len(piece) + 16])
    return bytes(omv[:n])


def decrypt_contents(
    filekey: FileKey, data: bytes, first_index: int = 0, *, holes: bool = True
) -> bytes:
    """Decrypt consecutive data units starting at data unit `first_index`.

    The index counts data units, not filesystem blocks: with 512-byte units
    on 4 KiB blocks, block n starts at index 8n.  With `holes`, an all-zero
    ciphertext unit (a hole or unwritten extent in the source) decrypts to
    zeros, as the kernel reads it.
    """
    dus = _unit_size(filekey)
    buf = data if isinstance(data, bytes) else bytes(data)
    n = len(buf)
    _check_pieces(filekey, n, dus)
    if filekey.mode == FSCRYPT_MODE_AES_256_XTS:
        return _decrypt_xts(filekey, buf, first_index, dus, holes)
    out = bytearray(n)
    for i, off in _units_to_decrypt(buf, dus, holes):
        piece = buf[off : off + dus]
        out[off : off + len(piece)] = _crypt_unit(filekey, first_index + i, piece, False)
    return bytes(out)


def encrypt_contents(filekey: FileKey, data: bytes, first_index: int = 0) -> bytes:
    """Inverse of decrypt_contents() (without hole handling): for tests and tools."""
    dus = _unit_size(filekey)
    n = len(data)
    _check_pieces(filekey, n, dus)
    return b"".join(
        _crypt_unit(filekey, first_index + i, bytes(data[off : off + dus]), True)
        for i, off in enumerate(range(0, n, dus))
    )
