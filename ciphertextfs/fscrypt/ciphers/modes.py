"""Each fscrypt construction behind one signature, for the mode table.

`crypt(key, iv, data, encrypt)` lets the mode table in fscrypt/policy.py
carry its implementation, as the kernel's fscrypt_modes[] carries its
crypto API name, so that contents and filenames dispatch by lookup.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers import modes as _modes

from .adiantum import adiantum_decrypt, adiantum_encrypt
from .cts import cts_cbc_decrypt, cts_cbc_encrypt
from .essiv import essiv_cbc_decrypt, essiv_cbc_encrypt
from .hctr2 import hctr2_decrypt, hctr2_encrypt
from .xts import sm4_xts_decrypt, sm4_xts_encrypt

__all__ = [
    "Crypt",
    "aes_xts",
    "aes_cbc_essiv",
    "aes_cts_cbc",
    "sm4_xts",
    "sm4_cts_cbc",
    "adiantum",
    "aes_hctr2",
]

Crypt = Callable[[bytes, bytes, bytes, bool], bytes]


def aes_xts(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(key), _modes.XTS(iv))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def aes_cbc_essiv(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (essiv_cbc_encrypt if encrypt else essiv_cbc_decrypt)(key, iv, data)


def aes_cts_cbc(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (cts_cbc_encrypt if encrypt else cts_cbc_decrypt)("aes", key, iv, data)


def sm4_xts(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (sm4_xts_encrypt if encrypt else sm4_xts_decrypt)(key, iv, data)


def sm4_cts_cbc(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (cts_cbc_encrypt if encrypt else cts_cbc_decrypt)("sm4", key, iv, data)


def adiantum(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (adiantum_encrypt if encrypt else adiantum_decrypt)(key, iv, data)


def aes_hctr2(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    return (hctr2_encrypt if encrypt else hctr2_decrypt)(key, iv, data)
