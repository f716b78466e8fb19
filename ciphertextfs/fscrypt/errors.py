"""Errors of the fscrypt layer."""


class FscryptError(Exception):
    """A context, name or key that this layer cannot use as given."""


class UnknownPolicyError(FscryptError):
    """A policy version, mode or flag this code does not know.

    Reported instead of guessed: decrypting with an assumed mode would turn
    a backup into plausible-looking garbage.
    """


class KeyMissingError(FscryptError):
    """The key at hand is not the one the policy asks for, or is too short."""
