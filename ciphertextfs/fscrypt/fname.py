"""Filename and symlink target encryption (the kernel's fs/crypto/fname.c, hooks.c).

Names are NUL padded to the policy's padding (at least 16 bytes, at most
the name limit) and encrypted as one message with the directory's key and
the IV of data unit 0.  Symlink targets are encrypted the same way with the
symlink inode's own key and stored behind a 2-byte length.
"""

from __future__ import annotations

import struct

from .errors import FscryptError
from .keysetup import FileKey
from .policy import FSCRYPT_FNAME_MIN_MSG_LEN, mode_info, round_up

__all__ = [
    "NAME_MAX",
    "encrypted_name_size",
    "encrypt_filename",
    "decrypt_filename",
    "encrypt_symlink",
    "decrypt_symlink",
    "symlink_body",
    "parse_symlink_body",
]

NAME_MAX = 255
"""The VFS name limit, which fscrypt_setup_filename() encrypts names against."""
FSCRYPT_SYMLINK_LEN_SIZE = 2  # struct fscrypt_symlink_data: __le16 len


def encrypted_name_size(padding: int, orig_len: int, max_len: int = NAME_MAX) -> int:
    """__fscrypt_fname_encrypted_size(): ciphertext length of a name of orig_len bytes."""
    if orig_len > max_len:
        raise FscryptError(f"name of {orig_len} bytes exceeds {max_len}")
    return min(round_up(max(orig_len, FSCRYPT_FNAME_MIN_MSG_LEN), padding), max_len)


def _crypt(key: FileKey, data: bytes, encrypt: bool) -> bytes:
    from .crypto import generate_iv

    info = mode_info(key.mode)
    if info.filenames is None:
        raise FscryptError(f"mode {info.name} cannot encrypt filenames")
    return info.filenames(key.key, generate_iv(key, 0), data, encrypt)


def encrypt_filename(dirkey: FileKey, plaintext: bytes, max_len: int = NAME_MAX) -> bytes:
    """fscrypt_fname_encrypt() with the directory's filenames key."""
    if not plaintext or b"\0" in plaintext:
        raise FscryptError("a name is non-empty and has no NUL byte")
    size = encrypted_name_size(dirkey.padding, len(plaintext), max_len)
    return _crypt(dirkey, bytes(plaintext) + bytes(size - len(plaintext)), True)


def decrypt_filename(dirkey: FileKey, ciphertext: bytes) -> bytes:
    """fname_decrypt(): the name ends at the first NUL of the padded plaintext.

    The result is what the kernel shows, unchecked: callers that create
    files from it must still reject "/", "." and "..".
    """
    n = len(ciphertext)
    if n < FSCRYPT_FNAME_MIN_MSG_LEN:
        raise FscryptError(f"encrypted name of {n} bytes is shorter than one block")
    if n > 65536:
        raise FscryptError(f"encrypted name of {n} bytes is too long")
    plain = _crypt(dirkey, bytes(ciphertext), False)
    end = plain.find(b"\0")
    name = plain if end < 0 else plain[:end]
    if not name:
        raise FscryptError("encrypted name decrypts to an empty name (wrong key?)")
    return name


def encrypt_symlink(key: FileKey, target: bytes, max_len: int) -> bytes:
    """Ciphertext of a symlink target (without the 2-byte length).

    `max_len` is the filesystem's symlink limit, the block size on ext4;
    the length prefix and the meaningless trailing NUL come out of it.
    """
    limit = max_len - FSCRYPT_SYMLINK_LEN_SIZE - 1
    return encrypt_filename(key, target, limit)


def symlink_body(ciphertext: bytes) -> bytes:
    """The on-disk body (i_size bytes) of an encrypted symlink: le16 length + ciphertext."""
    return struct.pack("<H", len(ciphertext)) + bytes(ciphertext)


def parse_symlink_body(body: bytes) -> bytes:
    """The ciphertext inside an encrypted symlink body, checked like fscrypt_get_symlink()."""
    if len(body) < FSCRYPT_SYMLINK_LEN_SIZE + 1:
        raise FscryptError(f"encrypted symlink body of {len(body)} bytes")
    (n,) = struct.unpack_from("<H", body)
    if n == 0 or FSCRYPT_SYMLINK_LEN_SIZE + n > len(body):
        raise FscryptError(f"encrypted symlink length {n} does not fit its {len(body)} bytes")
    return bytes(body[FSCRYPT_SYMLINK_LEN_SIZE : FSCRYPT_SYMLINK_LEN_SIZE + n])


def decrypt_symlink(key: FileKey, ciphertext: bytes) -> bytes:
    """The target of an encrypted symlink from its ciphertext (after the length)."""
    return decrypt_filename(key, ciphertext)
