"""AES-CBC-ESSIV as fscrypt's FSCRYPT_MODE_AES_128_CBC uses it.

The kernel builds it as ``essiv(cbc(aes),sha256)``: the CBC key is the file
key itself, and the CBC IV is the 16-byte fscrypt IV encrypted with AES-256
under SHA-256(file key).  The salt hides the predictable block-number IVs
that plain CBC would otherwise expose to watermarking.
"""

import hashlib

from .blockcipher import BLOCK_SIZE, cbc_decrypt, cbc_encrypt, ecb_encrypt


def _essiv_iv(key: bytes, iv: bytes, data: bytes) -> bytes:
    if len(iv) != BLOCK_SIZE:
        raise ValueError(f"ESSIV IV must be {BLOCK_SIZE} bytes, not {len(iv)}")
    if not data or len(data) % BLOCK_SIZE:
        raise ValueError(f"CBC-ESSIV data must be a non-zero multiple of 16 bytes, not {len(data)}")
    return ecb_encrypt("aes", hashlib.sha256(key).digest(), iv)


def essiv_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Encrypt whole blocks; ``key`` is the AES-128 file key (16 bytes)."""
    return cbc_encrypt("aes", key, _essiv_iv(key, iv, data), data)


def essiv_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    return cbc_decrypt("aes", key, _essiv_iv(key, iv, data), data)
