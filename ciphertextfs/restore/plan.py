"""Pure decisions of a restore: what a view entry stands for, before any I/O.

The view format itself is decoded by ciphertextfs.viewformat; what is left
here is the restore's judgement on names: the ciphertext name behind a
no-key name (with the side file for long ones) and whether a decrypted name
could ever have been written.  Each failure raises RestoreProblem with the
reason a user reads.
"""

from __future__ import annotations

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.fname import NAME_MAX
from ciphertextfs.fscrypt.nokey import NokeyName, parse_nokey_name
from ciphertextfs.viewformat import SIDE_FILE_NAME, SideFile

__all__ = ["RestoreProblem", "ciphertext_name", "check_plain_name", "looks_nokey"]


class RestoreProblem(Exception):
    """One entry cannot be restored; the message says why."""


def ciphertext_name(name: bytes, side: SideFile | None) -> bytes:
    """The ciphertext name a no-key name stands for, checked against its SHA-256."""
    try:
        nk: NokeyName = parse_nokey_name(name)
    except FscryptError as e:
        raise RestoreProblem(f"not a no-key name in an encrypted directory: {e}") from None
    if nk.sha256 is None:
        return nk.prefix
    full = side.names.get(name) if side is not None else None
    if full is None:
        what = "missing" if side is None else "damaged or incomplete"
        raise RestoreProblem(
            f"long name missing from the directory's {SIDE_FILE_NAME.decode()} (side file {what})"
        )
    if not nk.matches(full):
        raise RestoreProblem(
            "long name in .fscrypt-longnames does not match the SHA-256 of its no-key name"
        )
    return full


FSCRYPT_FNAME_MIN_MSG_LEN = 16


def looks_nokey(name: bytes) -> bool:
    """Whether a name could be a kernel no-key name (evidence of lost xattrs).

    A ciphertext name is at least 16 bytes, and below the no-key limit a
    multiple of the padding (at least 4), which most plain names are not.
    """
    try:
        nk = parse_nokey_name(name)
    except FscryptError:
        return False
    if nk.sha256 is not None:
        return True
    n = len(nk.prefix)
    return n >= FSCRYPT_FNAME_MIN_MSG_LEN and n % 4 == 0


def check_plain_name(name: bytes) -> bytes:
    """Refuse decrypted names no directory can hold (a tampered name or a wrong v1 key)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX:
        raise RestoreProblem(
            f"name decrypts to the impossible name {name[:64]!r} (tampered name or wrong key)"
        )
    return name
