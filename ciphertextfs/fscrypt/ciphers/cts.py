"""CBC with ciphertext stealing, as the kernel's ``cts(cbc(...))``.

This is the CS3 variant of NIST SP 800-38A Addendum (the same as RFC 3962):
the last two ciphertext blocks are always swapped, the final one truncated
to the length of the last plaintext piece.  A single block is plain CBC.
fscrypt uses it for file names, which are padded to at least 16 bytes.
"""

from .blockcipher import BLOCK_SIZE, cbc_decrypt, cbc_encrypt, ecb_decrypt, xor_bytes


def _check(iv: bytes, data: bytes) -> None:
    if len(iv) != BLOCK_SIZE:
        raise ValueError(f"CTS-CBC IV must be {BLOCK_SIZE} bytes, not {len(iv)}")
    if len(data) < BLOCK_SIZE:
        raise ValueError(f"CTS-CBC needs at least {BLOCK_SIZE} bytes, got {len(data)}")


def cts_cbc_encrypt(cipher: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` (>= 16 bytes) with ``cipher`` "aes" or "sm4"."""
    _check(iv, data)
    n = len(data)
    if n == BLOCK_SIZE:
        return cbc_encrypt(cipher, key, iv, data)
    tail = n - (n - 1) // BLOCK_SIZE * BLOCK_SIZE  # 1..16 bytes in the last piece
    padded = data + bytes(BLOCK_SIZE - tail)
    c = cbc_encrypt(cipher, key, iv, padded)
    head = len(padded) - 2 * BLOCK_SIZE
    return c[:head] + c[head + BLOCK_SIZE :] + c[head : head + tail]


def cts_cbc_decrypt(cipher: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    """Invert :func:`cts_cbc_encrypt`."""
    _check(iv, data)
    n = len(data)
    if n == BLOCK_SIZE:
        return cbc_decrypt(cipher, key, iv, data)
    tail = n - (n - 1) // BLOCK_SIZE * BLOCK_SIZE
    head = n - BLOCK_SIZE - tail
    c_last_full = data[head : head + BLOCK_SIZE]  # E(P_n padded ^ C_{n-1})
    c_partial = data[head + BLOCK_SIZE :]  # first `tail` bytes of C_{n-1}
    d = ecb_decrypt(cipher, key, c_last_full)
    # The zero padding of P_n makes D(C_n) end with the stolen bytes of C_{n-1}.
    c_prev = c_partial + d[tail:]
    p_last = xor_bytes(d[:tail], c_partial)
    chained_iv = data[head - BLOCK_SIZE : head] if head else iv
    p_prev = xor_bytes(ecb_decrypt(cipher, key, c_prev), chained_iv)
    p_head = cbc_decrypt(cipher, key, iv, data[:head]) if head else b""
    return p_head + p_prev + p_last
