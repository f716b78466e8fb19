"""Adiantum (Crowley & Biggers 2018): XChaCha12 + AES-256 + NH + Poly1305.

An HBSH construction: the message is split into a left part ``L`` (all but
the last 16 bytes) and a right part ``R`` (the last 16 bytes).  ``R`` is
hashed-added, encrypted with one AES-256 call, and the result is the nonce
of an XChaCha12 stream over ``L``; a second hash-subtract finishes ``R``.
fscrypt uses it with a 32-byte tweak (its IV), for contents and names.
"""

import functools

from .blockcipher import BLOCK_SIZE, ecb_decrypt, ecb_encrypt
from .chacha import xchacha12_xor, xchacha_stream
from .nhpoly1305 import NH_KEY_BYTES, nh, poly1305_hash

_M128 = (1 << 128) - 1
KEY_SIZE = 32


@functools.lru_cache(maxsize=16)
def _subkeys(key: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """K_E, K_T, K_L, K_N from the stream under the empty nonce (pad: 0x01, zeros)."""
    stream = xchacha_stream(key, b"\x01" + bytes(23), 32 + 16 + 16 + NH_KEY_BYTES)
    return stream[:32], stream[32:48], stream[48:64], stream[64:]


def _hash(subkeys: tuple[bytes, bytes, bytes, bytes], tweak: bytes, left: bytes) -> int:
    """H(T, L) = Poly1305_KT(bitlen(L) as 128 bits || T) + Poly1305_KL(NH_KN(pad(L)))."""
    _, k_t, k_l, k_n = subkeys
    h_t = poly1305_hash(k_t, (8 * len(left)).to_bytes(16, "little") + tweak)
    if len(left) % 16:
        left = left + bytes(16 - len(left) % 16)
    h_l = poly1305_hash(k_l, nh(k_n, left))
    return (h_t + h_l) & _M128


def _check(key: bytes, data: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"Adiantum key must be {KEY_SIZE} bytes, not {len(key)}")
    if len(data) < BLOCK_SIZE:
        raise ValueError(f"Adiantum needs at least {BLOCK_SIZE} bytes, got {len(data)}")


def _stream_nonce(c_m: bytes) -> bytes:
    return c_m + b"\x01" + bytes(7)


def adiantum_encrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` (>= 16 bytes) under a 32-byte key and any tweak (fscrypt: 32 bytes)."""
    _check(key, data)
    sk = _subkeys(key)
    p_l, p_r = data[:-BLOCK_SIZE], data[-BLOCK_SIZE:]
    p_m = (int.from_bytes(p_r, "little") + _hash(sk, tweak, p_l)) & _M128
    c_m = ecb_encrypt("aes", sk[0], p_m.to_bytes(16, "little"))
    c_l = xchacha12_xor(key, _stream_nonce(c_m), p_l)
    c_r = (int.from_bytes(c_m, "little") - _hash(sk, tweak, c_l)) & _M128
    return c_l + c_r.to_bytes(16, "little")


def adiantum_decrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    """Invert :func:`adiantum_encrypt`."""
    _check(key, data)
    sk = _subkeys(key)
    c_l, c_r = data[:-BLOCK_SIZE], data[-BLOCK_SIZE:]
    c_m = ((int.from_bytes(c_r, "little") + _hash(sk, tweak, c_l)) & _M128).to_bytes(16, "little")
    p_l = xchacha12_xor(key, _stream_nonce(c_m), c_l)
    p_m = ecb_decrypt("aes", sk[0], c_m)
    p_r = (int.from_bytes(p_m, "little") - _hash(sk, tweak, p_l)) & _M128
    return p_l + p_r.to_bytes(16, "little")
