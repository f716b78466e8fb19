"""HCTR2 (Crowley, Huckleberry, Biggers 2021) with AES.

A wide-block mode: the first 16 bytes ``M`` go through one AES call between
two POLYVAL hashes of the rest ``N``, which is encrypted in XCTR mode keyed
by the result.  fscrypt uses AES-256-HCTR2 for file names with a 32-byte
tweak (its IV).
"""

from .blockcipher import BLOCK_SIZE, ecb_decrypt, ecb_encrypt, xor_bytes
from .polyval import Polyval

_M128 = (1 << 128) - 1


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK_SIZE)


class _Hash:
    """H(T, M) with the tweak part absorbed once and reused for both hashes."""

    def __init__(self, h: bytes, tweak: bytes, msg_len: int) -> None:
        whole = msg_len % BLOCK_SIZE == 0
        prefix = (2 * 8 * len(tweak) + (2 if whole else 3)).to_bytes(16, "little")
        self._whole = whole
        self._base = Polyval(h).update(prefix + _pad(tweak))

    def __call__(self, msg: bytes) -> int:
        body = msg if self._whole else _pad(msg + b"\x01")
        return self._base.copy().update(body).acc


def _xctr(key: bytes, s: bytes, length: int) -> bytes:
    """XCTR keystream: E(S ^ le128(i)) for i = 1, 2, ..., one ECB call in all."""
    if length == 0:
        return b""
    s_int = int.from_bytes(s, "little")
    blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
    counters = b"".join(((s_int ^ i) & _M128).to_bytes(16, "little") for i in range(1, blocks + 1))
    return ecb_encrypt("aes", key, counters)[:length]


def _setup(key: bytes, tweak: bytes, data: bytes) -> tuple[bytes, _Hash]:
    if len(key) not in (16, 24, 32):
        raise ValueError(f"HCTR2 AES key must be 16, 24 or 32 bytes, not {len(key)}")
    if len(data) < BLOCK_SIZE:
        raise ValueError(f"HCTR2 needs at least {BLOCK_SIZE} bytes, got {len(data)}")
    hl = ecb_encrypt("aes", key, (0).to_bytes(16, "little") + (1).to_bytes(16, "little"))
    return hl[16:], _Hash(hl[:16], tweak, len(data) - BLOCK_SIZE)


def hctr2_encrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` (>= 16 bytes); fscrypt passes a 32-byte tweak and an AES-256 key."""
    big_l, hash_ = _setup(key, tweak, data)
    m, n = data[:BLOCK_SIZE], data[BLOCK_SIZE:]
    mm = (int.from_bytes(m, "little") ^ hash_(n)).to_bytes(16, "little")
    uu = ecb_encrypt("aes", key, mm)
    s = xor_bytes(xor_bytes(mm, uu), big_l)
    v = xor_bytes(n, _xctr(key, s, len(n)))
    u = (int.from_bytes(uu, "little") ^ hash_(v)).to_bytes(16, "little")
    return u + v


def hctr2_decrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    """Invert :func:`hctr2_encrypt`."""
    big_l, hash_ = _setup(key, tweak, data)
    u, v = data[:BLOCK_SIZE], data[BLOCK_SIZE:]
    uu = (int.from_bytes(u, "little") ^ hash_(v)).to_bytes(16, "little")
    mm = ecb_decrypt("aes", key, uu)
    s = xor_bytes(xor_bytes(mm, uu), big_l)
    n = xor_bytes(v, _xctr(key, s, len(v)))
    m = (int.from_bytes(mm, "little") ^ hash_(n)).to_bytes(16, "little")
    return m + n
