"""XChaCha12, the stream cipher of Adiantum, in pure Python.

`cryptography` only offers ChaCha20 with the RFC 7539 layout, and the round
count cannot be changed, so the permutation is written out here over 16
local integers (one double round per loop iteration).  Adiantum uses the
original DJB layout: a 64-bit block counter in words 12-13 and a 64-bit
nonce in words 14-15, extended to 192 bits by HChaCha.
"""

import struct

_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_M32 = 0xFFFFFFFF
_WORDS16 = struct.Struct("<16I")


def _permute(s: tuple[int, ...] | list[int], rounds: int) -> list[int]:
    """The ChaCha permutation without the final feed-forward addition."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = s
    m = _M32
    for _ in range(rounds // 2):
        # Column round.
        x0 = (x0 + x4) & m
        x12 ^= x0
        x12 = ((x12 << 16) | (x12 >> 16)) & m
        x8 = (x8 + x12) & m
        x4 ^= x8
        x4 = ((x4 << 12) | (x4 >> 20)) & m
        x0 = (x0 + x4) & m
        x12 ^= x0
        x12 = ((x12 << 8) | (x12 >> 24)) & m
        x8 = (x8 + x12) & m
        x4 ^= x8
        x4 = ((x4 << 7) | (x4 >> 25)) & m
        x1 = (x1 + x5) & m
        x13 ^= x1
        x13 = ((x13 << 16) | (x13 >> 16)) & m
        x9 = (x9 + x13) & m
        x5 ^= x9
        x5 = ((x5 << 12) | (x5 >> 20)) & m
        x1 = (x1 + x5) & m
        x13 ^= x1
        x13 = ((x13 << 8) | (x13 >> 24)) & m
        x9 = (x9 + x13) & m
        x5 ^= x9
        x5 = ((x5 << 7) | (x5 >> 25)) & m
        x2 = (x2 + x6) & m
        x14 ^= x2
        x14 = ((x14 << 16) | (x14 >> 16)) & m
        x10 = (x10 + x14) & m
        x6 ^= x10
        x6 = ((x6 << 12) | (x6 >> 20)) & m
        x2 = (x2 + x6) & m
        x14 ^= x2
        x14 = ((x14 << 8) | (x14 >> 24)) & m
        x10 = (x10 + x14) & m
        x6 ^= x10
        x6 = ((x6 << 7) | (x6 >> 25)) & m
        x3 = (x3 + x7) & m
        x15 ^= x3
        x15 = ((x15 << 16) | (x15 >> 16)) & m
        x11 = (x11 + x15) & m
        x7 ^= x11
        x7 = ((x7 << 12) | (x7 >> 20)) & m
        x3 = (x3 + x7) & m
        x15 ^= x3
        x15 = ((x15 << 8) | (x15 >> 24)) & m
        x11 = (x11 + x15) & m
        x7 ^= x11
        x7 = ((x7 << 7) | (x7 >> 25)) & m
        # Diagonal round.
        x0 = (x0 + x5) & m
        x15 ^= x0
        x15 = ((x15 << 16) | (x15 >> 16)) & m
        x10 = (x10 + x15) & m
        x5 ^= x10
        x5 = ((x5 << 12) | (x5 >> 20)) & m
        x0 = (x0 + x5) & m
        x15 ^= x0
        x15 = ((x15 << 8) | (x15 >> 24)) & m
        x10 = (x10 + x15) & m
        x5 ^= x10
        x5 = ((x5 << 7) | (x5 >> 25)) & m
        x1 = (x1 + x6) & m
        x12 ^= x1
        x12 = ((x12 << 16) | (x12 >> 16)) & m
        x11 = (x11 + x12) & m
        x6 ^= x11
        x6 = ((x6 << 12) | (x6 >> 20)) & m
        x1 = (x1 + x6) & m
        x12 ^= x1
        x12 = ((x12 << 8) | (x12 >> 24)) & m
        x11 = (x11 + x12) & m
        x6 ^= x11
        x6 = ((x6 << 7) | (x6 >> 25)) & m
        x2 = (x2 + x7) & m
        x13 ^= x2
        x13 = ((x13 << 16) | (x13 >> 16)) & m
        x8 = (x8 + x13) & m
        x7 ^= x8
        x7 = ((x7 << 12) | (x7 >> 20)) & m
        x2 = (x2 + x7) & m
        x13 ^= x2
        x13 = ((x13 << 8) | (x13 >> 24)) & m
        x8 = (x8 + x13) & m
        x7 ^= x8
        x7 = ((x7 << 7) | (x7 >> 25)) & m
        x3 = (x3 + x4) & m
        x14 ^= x3
        x14 = ((x14 << 16) | (x14 >> 16)) & m
        x9 = (x9 + x14) & m
        x4 ^= x9
        x4 = ((x4 << 12) | (x4 >> 20)) & m
        x3 = (x3 + x4) & m
        x14 ^= x3
        x14 = ((x14 << 8) | (x14 >> 24)) & m
        x9 = (x9 + x14) & m
        x4 ^= x9
        x4 = ((x4 << 7) | (x4 >> 25)) & m
    return [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15]


def hchacha(key: bytes, nonce16: bytes, rounds: int = 12) -> bytes:
    """HChaCha: derive the XChaCha subkey from the key and 16 nonce bytes."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("HChaCha takes a 32-byte key and a 16-byte nonce")
    state = _SIGMA + struct.unpack("<8I", key) + struct.unpack("<4I", nonce16)
    x = _permute(state, rounds)
    return struct.pack("<8I", *x[0:4], *x[12:16])


def chacha_stream(key: bytes, nonce8: bytes, length: int, rounds: int, counter: int = 0) -> bytes:
    """``length`` bytes of original-layout ChaCha keystream from block ``counter``."""
    if len(key) != 32 or len(nonce8) != 8:
        raise ValueError("ChaCha takes a 32-byte key and an 8-byte nonce")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<2I", nonce8)
    out = bytearray()
    pack = _WORDS16.pack
    for block in range(counter, counter + (length + 63) // 64):
        state = (*_SIGMA, *k, block & _M32, (block >> 32) & _M32, *n)
        x = _permute(state, rounds)
        out += pack(*[(a + b) & _M32 for a, b in zip(x, state, strict=True)])
    return bytes(out[:length])


def xchacha_stream(key: bytes, nonce24: bytes, length: int, rounds: int = 12) -> bytes:
    """``length`` bytes of XChaCha keystream (counter starting at 0)."""
    if len(nonce24) != 24:
        raise ValueError("XChaCha takes a 24-byte nonce")
    return chacha_stream(hchacha(key, nonce24[:16], rounds), nonce24[16:], length, rounds)


def xchacha12_xor(key: bytes, nonce24: bytes, data: bytes) -> bytes:
    """Encrypt or decrypt ``data`` with XChaCha12."""
    stream = xchacha_stream(key, nonce24, len(data), 12)
    n = len(data)
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
