"""XTS (IEEE 1619) over any 128-bit block cipher, with ciphertext stealing.

`cryptography` has AES-XTS but not SM4-XTS, which fscrypt supports for
contents (FSCRYPT_MODE_SM4_XTS).  The tweak masks are computed in Python
and all blocks go through OpenSSL's ECB in one call.
"""

from .blockcipher import BLOCK_SIZE, ecb_decrypt, ecb_encrypt

_MASK128 = (1 << 128) - 1


def _tweaks(t0: int, count: int) -> list[int]:
    """T_j = T_0 * alpha^j in GF(2^128), little-endian, reduction x^7+x^2+x+1."""
    out = []
    t = t0
    for _ in range(count):
        out.append(t)
        t = ((t << 1) & _MASK128) ^ (0x87 if t >> 127 else 0)
    return out


def _mask_blocks(data: bytes, masks: list[int]) -> bytes:
    """XOR each 16-byte block of ``data`` with the matching mask."""
    big = int.from_bytes(b"".join(m.to_bytes(16, "little") for m in masks), "little")
    return (int.from_bytes(data, "little") ^ big).to_bytes(len(data), "little")


def _xts(cipher: str, key: bytes, tweak: bytes, data: bytes, encrypt: bool) -> bytes:
    if len(key) % 2 or len(key) // 2 not in (16, 24, 32):
        raise ValueError(f"XTS key must be two equal block cipher keys, not {len(key)} bytes")
    if len(tweak) != BLOCK_SIZE:
        raise ValueError(f"XTS tweak must be {BLOCK_SIZE} bytes, not {len(tweak)}")
    if len(data) < BLOCK_SIZE:
        raise ValueError(f"XTS needs at least {BLOCK_SIZE} bytes, got {len(data)}")
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    t0 = int.from_bytes(ecb_encrypt(cipher, k2, tweak), "little")
    full, tail = divmod(len(data), BLOCK_SIZE)
    masks = _tweaks(t0, full + 1)
    block = ecb_encrypt if encrypt else ecb_decrypt

    def run(chunk: bytes, ms: list[int]) -> bytes:
        return _mask_blocks(block(cipher, k1, _mask_blocks(chunk, ms)), ms)

    if tail == 0:
        return run(data, masks[:full])
    # Ciphertext stealing on the last full block and the partial one.
    head_len = (full - 1) * BLOCK_SIZE
    out = run(data[:head_len], masks[: full - 1]) if head_len else b""
    last_full = data[head_len : head_len + BLOCK_SIZE]
    partial = data[head_len + BLOCK_SIZE :]
    # Encryption uses T_{m-1} then T_m; decryption swaps the order.
    first, second = (masks[full - 1], masks[full]) if encrypt else (masks[full], masks[full - 1])
    cc = run(last_full, [first])
    pp = run(partial + cc[tail:], [second])
    return out + pp + cc[:tail]


def xts_encrypt(cipher: str, key: bytes, tweak: bytes, data: bytes) -> bytes:
    """XTS encryption; ``cipher`` is "aes" or "sm4", ``key`` is data key + tweak key."""
    return _xts(cipher, key, tweak, data, True)


def xts_decrypt(cipher: str, key: bytes, tweak: bytes, data: bytes) -> bytes:
    return _xts(cipher, key, tweak, data, False)


def sm4_xts_encrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    """SM4-XTS as FSCRYPT_MODE_SM4_XTS: 32-byte key (two SM4 keys), 16-byte tweak."""
    if len(key) != 32:
        raise ValueError(f"SM4-XTS key must be 32 bytes, not {len(key)}")
    return _xts("sm4", key, tweak, data, True)


def sm4_xts_decrypt(key: bytes, tweak: bytes, data: bytes) -> bytes:
    if len(key) != 32:
        raise ValueError(f"SM4-XTS key must be 32 bytes, not {len(key)}")
    return _xts("sm4", key, tweak, data, False)
