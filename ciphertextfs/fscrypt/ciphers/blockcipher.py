"""Thin access to the block ciphers of `cryptography`, one call per buffer.

Every mode here is built on ECB or CBC over whole buffers so that the
per-block work stays inside OpenSSL; Python only prepares masks and
counters.
"""

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import CipherUnavailable

BLOCK_SIZE = 16

_KEY_SIZES = {"aes": (16, 24, 32), "sm4": (16,)}


def _algorithm(cipher: str, key: bytes) -> algorithms.AES | algorithms.SM4:
    if cipher not in _KEY_SIZES:
        raise ValueError(f"unknown block cipher {cipher!r}")
    if len(key) not in _KEY_SIZES[cipher]:
        raise ValueError(f"{cipher} key must be {_KEY_SIZES[cipher]} bytes, not {len(key)}")
    if cipher == "aes":
        return algorithms.AES(key)
    return algorithms.SM4(key)


def _run(cipher: str, key: bytes, mode: modes.Mode, data: bytes, encrypt: bool) -> bytes:
    try:
        c = Cipher(_algorithm(cipher, key), mode)
        ctx = c.encryptor() if encrypt else c.decryptor()
        return ctx.update(data) + ctx.finalize()
    except UnsupportedAlgorithm as e:
        raise CipherUnavailable(
            f"{cipher.upper()} {mode.name.upper()} is not available in this OpenSSL build: {e}"
        ) from e


def ecb_encrypt(cipher: str, key: bytes, data: bytes) -> bytes:
    """Encrypt whole blocks independently (the caller masks them)."""
    return _run(cipher, key, modes.ECB(), data, True)


def ecb_decrypt(cipher: str, key: bytes, data: bytes) -> bytes:
    return _run(cipher, key, modes.ECB(), data, False)


def cbc_encrypt(cipher: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    return _run(cipher, key, modes.CBC(iv), data, True)


def cbc_decrypt(cipher: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    return _run(cipher, key, modes.CBC(iv), data, False)


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """XOR two equal-length buffers through big integers (fast in CPython)."""
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
