"""Errors of the cipher layer."""


class CipherUnavailable(Exception):
    """The local crypto library cannot run a primitive this mode needs.

    Raised instead of returning output computed some other way, so that a
    restore on a machine whose OpenSSL lacks (say) SM4 stops with a clear
    message rather than writing garbage that looks like plaintext.
    """
