"""The Adiantum hash pieces: NH and Poly1305 used as a bare polynomial hash.

Adiantum's Poly1305 is the polynomial evaluation only: no one-time pad is
added at the end, the result is the accumulator reduced modulo 2^130 - 5
and truncated to 128 bits.  The cryptography package's Poly1305 always
adds the second key half, so it cannot be reused here.
"""

import struct

_P1305 = (1 << 130) - 5
_CLAMP = 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1

NH_KEY_BYTES = 1072  # 1024-byte message unit + 3 * 16 bytes of key shift
NH_UNIT = 1024


def poly1305_hash(key: bytes, message: bytes) -> int:
    """Poly1305 polynomial value of ``message`` under the clamped ``key`` (no pad)."""
    if len(key) != 16:
        raise ValueError("Poly1305 hash key must be 16 bytes")
    r = int.from_bytes(key, "little") & _CLAMP
    h = 0
    for off in range(0, len(message), 16):
        chunk = message[off : off + 16]
        h = (h + int.from_bytes(chunk, "little") + (1 << (8 * len(chunk)))) * r % _P1305
    return h & ((1 << 128) - 1)


def nh(key: bytes, message: bytes) -> bytes:
    """NH^T[256, 32, 4] with stride 2 over ``message`` (length a multiple of 16).

    Each 1024-byte unit (the last one may be shorter) yields four 64-bit sums,
    one per 16-byte shift of the key.
    """
    if len(key) < NH_KEY_BYTES:
        raise ValueError(f"NH key must be {NH_KEY_BYTES} bytes")
    if len(message) % 16:
        raise ValueError("NH message length must be a multiple of 16")
    k = struct.unpack(f"<{NH_KEY_BYTES // 4}I", key[:NH_KEY_BYTES])
    out = bytearray()
    for off in range(0, len(message), NH_UNIT):
        unit = message[off : off + NH_UNIT]
        m = struct.unpack(f"<{len(unit) // 4}I", unit)
        # Words 0,1 pair with 2,3 in every 16-byte group (the stride of 2).
        m0, m1, m2, m3 = m[0::4], m[1::4], m[2::4], m[3::4]
        sums = []
        for shift in range(4):
            kk = k[4 * shift : 4 * shift + len(m)]
            k0, k1, k2, k3 = kk[0::4], kk[1::4], kk[2::4], kk[3::4]
            p = sum(
                ((a0 + b0) & _M32) * ((a2 + b2) & _M32) + ((a1 + b1) & _M32) * ((a3 + b3) & _M32)
                for a0, a1, a2, a3, b0, b1, b2, b3 in zip(
                    k0, k1, k2, k3, m0, m1, m2, m3, strict=True
                )
            )
            sums.append(p & _M64)
        out += struct.pack("<4Q", *sums)
    return bytes(out)


def nhpoly1305(key: bytes, message: bytes) -> int:
    """Poly1305 hash (no pad) of NH of ``message`` zero-padded to 16 bytes.

    ``key`` is the 16-byte Poly1305 key followed by the 1072-byte NH key, as
    in the kernel's nhpoly1305 and the reference NHPoly1305 test vectors.
    """
    if len(key) != 16 + NH_KEY_BYTES:
        raise ValueError(f"NHPoly1305 key must be {16 + NH_KEY_BYTES} bytes")
    if len(message) % 16:
        message = message + bytes(16 - len(message) % 16)
    return poly1305_hash(key[:16], nh(key[16:], message))
