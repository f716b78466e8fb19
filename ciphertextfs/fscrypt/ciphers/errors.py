"""Errors of the cipher layer."""

from ..errors import FscryptError


class CipherUnavailable(FscryptError):
    """The local crypto library cannot run a primitive this mode needs.

    Raised instead of returning output computed some other way, so that a
    restore on a machine whose OpenSSL lacks (say) SM4 stops with a clear
    message rather than writing garbage that looks like plaintext.  It is an
    FscryptError so that every consumer's one fscrypt boundary reports it
    for the entry concerned.
    """
