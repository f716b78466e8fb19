"""The fscrypt cipher constructions that `cryptography` does not provide.

All functions take and return bytes and raise ``ValueError`` for key, IV or
length errors (callers decide what a bad length on disk means) and
:class:`CipherUnavailable` when the local OpenSSL lacks a primitive.
"""

from .adiantum import adiantum_decrypt, adiantum_encrypt
from .cts import cts_cbc_decrypt, cts_cbc_encrypt
from .errors import CipherUnavailable
from .essiv import essiv_cbc_decrypt, essiv_cbc_encrypt
from .hctr2 import hctr2_decrypt, hctr2_encrypt
from .xts import sm4_xts_decrypt, sm4_xts_encrypt, xts_decrypt, xts_encrypt

__all__ = [
    "CipherUnavailable",
    "adiantum_decrypt",
    "adiantum_encrypt",
    "cts_cbc_decrypt",
    "cts_cbc_encrypt",
    "essiv_cbc_decrypt",
    "essiv_cbc_encrypt",
    "hctr2_decrypt",
    "hctr2_encrypt",
    "sm4_xts_decrypt",
    "sm4_xts_encrypt",
    "xts_decrypt",
    "xts_encrypt",
]
