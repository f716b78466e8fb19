"""Contents encryption per data unit (the kernel's fs/crypto/crypto.c).

Each data unit (the filesystem block, or the v2 policy's custom size) is
encrypted independently under an IV built by fscrypt_generate_iv() from the
data unit's index within the file.  Block-wise modes (XTS, CBC-ESSIV) also
decrypt a prefix of a unit that is a whole number of 16-byte blocks, which
is how the last unit of a file is kept short in the view.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import FscryptError
from .keysetup import (
    IV_RULE_INDEX,
    IV_RULE_INO_LBLK_32,
    IV_RULE_INO_LBLK_64,
    IV_RULE_NONCE,
    FileKey,
)
from .policy import (
    FSCRYPT_MODE_ADIANTUM,
    FSCRYPT_MODE_AES_128_CBC,
    FSCRYPT_MODE_AES_256_XTS,
    FSCRYPT_MODE_SM4_XTS,
    mode_info,
)

__all__ = [
    "generate_iv",
    "decrypt_data_unit",
    "encrypt_data_unit",
    "decrypt_contents",
    "encrypt_contents",
]

_U32 = 0xFFFFFFFF


def generate_iv(filekey: FileKey, index: int) -> bytes:
    """fscrypt_generate_iv(): union fscrypt_iv, ivsize bytes of it.

    The layout is a little-endian 64-bit index followed by the 16-byte
    nonce (DIRECT_KEY only) and zeros up to the mode's IV size (16, or 32
    for the wide-block modes, which use it as their tweak).
    """
    if index < 0:
        raise ValueError("negative data unit index")
    rule = filekey.iv_rule
    nonce = b""
    if rule == IV_RULE_INO_LBLK_64:
        if index > _U32 or filekey.ino is None or filekey.ino > _U32:
            raise FscryptError("IV_INO_LBLK_64 needs a 32-bit index and inode number")
        index |= filekey.ino << 32
    elif rule == IV_RULE_INO_LBLK_32:
        if index > _U32 or filekey.hashed_ino is None:
            raise FscryptError("IV_INO_LBLK_32 needs a 32-bit index and a hashed inode number")
        index = (filekey.hashed_ino + index) & _U32
    elif rule == IV_RULE_NONCE:
        if filekey.nonce is None:
            raise FscryptError("DIRECT_KEY needs the nonce")
        nonce = filekey.nonce
    elif rule != IV_RULE_INDEX:
        raise FscryptError(f"unknown IV rule {rule!r}")
    if index > 0xFFFFFFFFFFFFFFFF:
        raise FscryptError("data unit index beyond 64 bits")
    iv = struct.pack("<Q", index) + nonce
    size = mode_info(filekey.mode).ivsize
    if len(iv) > size:
        raise FscryptError("DIRECT_KEY nonce does not fit this mode's IV")
    return iv + bytes(size - len(iv))


def _crypt_unit(filekey: FileKey, index: int, data: bytes, encrypt: bool) -> bytes:
    mode = filekey.mode
    iv = generate_iv(filekey, index)
    n = len(data)
    if n < 16:
        raise FscryptError(f"data unit piece of {n} bytes: under one cipher block")
    if mode == FSCRYPT_MODE_ADIANTUM:
        from .ciphers import adiantum_decrypt, adiantum_encrypt

        return (adiantum_encrypt if encrypt else adiantum_decrypt)(filekey.key, iv, data)
    if n % 16:
        raise FscryptError(f"ciphertext piece of {n} bytes is not whole 16-byte blocks")
    if mode == FSCRYPT_MODE_AES_256_XTS:
        c = Cipher(algorithms.AES(filekey.key), modes.XTS(iv))
        ctx = c.encryptor() if encrypt else c.decryptor()
        return ctx.update(data) + ctx.finalize()
    if mode == FSCRYPT_MODE_AES_128_CBC:
        from .ciphers import essiv_cbc_decrypt, essiv_cbc_encrypt

        return (essiv_cbc_encrypt if encrypt else essiv_cbc_decrypt)(filekey.key, iv, data)
    if mode == FSCRYPT_MODE_SM4_XTS:
        from .ciphers import sm4_xts_decrypt, sm4_xts_encrypt

        return (sm4_xts_encrypt if encrypt else sm4_xts_decrypt)(filekey.key, iv, data)
    raise FscryptError(f"mode {mode_info(mode).name} cannot encrypt contents")


def decrypt_data_unit(filekey: FileKey, index: int, data: bytes) -> bytes:
    """Decrypt one data unit (or, for block-wise modes, a 16-byte-multiple prefix)."""
    return _crypt_unit(filekey, index, bytes(data), False)


def encrypt_data_unit(filekey: FileKey, index: int, data: bytes) -> bytes:
    return _crypt_unit(filekey, index, bytes(data), True)


def _unit_size(filekey: FileKey) -> int:
    dus = filekey.data_unit_size
    if dus is None:
        raise FscryptError("a filenames key cannot decrypt contents")
    return dus


def _check_pieces(filekey: FileKey, length: int, dus: int) -> None:
    last = length % dus
    if filekey.mode == FSCRYPT_MODE_ADIANTUM and last:
        raise FscryptError(f"{length} bytes of Adiantum ciphertext: not whole {dus}-byte units")
    if last % 16:
        raise FscryptError(f"{length} bytes of ciphertext: not whole 16-byte blocks")


def _index_base(filekey: FileKey, first_index: int, count: int) -> tuple[int, int]:
    """(add, mask): IV index of unit i is ((first_index + i) + add) & mask.

    Lets the XTS loop build IVs with integer arithmetic; the range checks
    are those of generate_iv(), done once for the whole run.
    """
    last = first_index + count - 1
    if first_index < 0:
        raise ValueError("negative data unit index")
    rule = filekey.iv_rule
    if rule == IV_RULE_INDEX:
        if last > 0xFFFFFFFFFFFFFFFF:
            raise FscryptError("data unit index beyond 64 bits")
        return 0, (1 << 64) - 1
    if rule == IV_RULE_INO_LBLK_64:
        if last > _U32 or filekey.ino is None or filekey.ino > _U32:
            raise FscryptError("IV_INO_LBLK_64 needs a 32-bit index and inode number")
        return filekey.ino << 32, (1 << 64) - 1
    if rule == IV_RULE_INO_LBLK_32:
        if last > _U32 or filekey.hashed_ino is None:
            raise FscryptError("IV_INO_LBLK_32 needs a 32-bit index and a hashed inode number")
        return filekey.hashed_ino, _U32
    raise FscryptError(f"IV rule {rule!r} does not apply to AES-256-XTS")


def _decrypt_xts(filekey: FileKey, buf: bytes, first_index: int, dus: int, holes: bool) -> bytes:
    """AES-256-XTS over many units with as little Python per unit as possible."""
    mv = memoryview(buf)
    n = len(mv)
    count = -(-n // dus)
    add, mask = _index_base(filekey, first_index, count)
    alg = algorithms.AES(filekey.key)
    # update_into() wants room for one more block than it writes.
    out = bytearray(n + 16)
    omv = memoryview(out)
    # bytes == bytes is a memcmp; memoryview == memoryview is not.
    zero = bytes(dus)
    xts = modes.XTS
    index = first_index
    for off in range(0, n, dus):
        piece = mv[off : off + dus]
        if not (holes and buf[off : off + dus] == zero[: len(piece)]):
            tweak = ((index + add) & mask).to_bytes(16, "little")
            Cipher(alg, xts(tweak)).decryptor().update_into(piece, omv[off : off + len(piece) + 16])
        index += 1
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
    zero = bytes(dus)
    out = bytearray(n)
    for i, off in enumerate(range(0, n, dus)):
        piece = buf[off : off + dus]
        if holes and piece == zero[: len(piece)]:
            continue
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
