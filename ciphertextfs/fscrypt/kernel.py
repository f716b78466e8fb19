"""The kernel's fscrypt ioctls (include/uapi/linux/fscrypt.h), for tests and tools.

ciphertextfs itself never needs them: it reads the disk.  They exist so
tests can have the kernel encrypt files under known keys and policies and
compare the kernel's answers (key identifiers, contexts, no-key names) with
ours.  Struct layouts are packed by hand; ioctl numbers come from the
_IOC formula and the struct sizes, as the C macros compute them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .policy import (
    FSCRYPT_KEY_DESCRIPTOR_SIZE,
    FSCRYPT_KEY_IDENTIFIER_SIZE,
    FSCRYPT_MAX_KEY_SIZE,
    FSCRYPT_MODE_AES_256_CTS,
    FSCRYPT_MODE_AES_256_XTS,
    FSCRYPT_POLICY_FLAGS_PAD_32,
    FSCRYPT_POLICY_V1,
    FSCRYPT_POLICY_V2,
)

__all__ = [
    "KernelPolicy",
    "KeyStatus",
    "add_key",
    "remove_key",
    "key_status",
    "set_policy_v1",
    "set_policy_v2",
    "get_policy",
    "get_nonce",
]

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(type_) << 8) | nr


def _ior(type_: str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


def _iowr(type_: str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


FSCRYPT_KEY_SPEC_TYPE_DESCRIPTOR = 1
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2

FSCRYPT_KEY_STATUS_ABSENT = 1

# struct fscrypt_key_specifier: u32 type, u32 reserved, u8 u[32]
_KEY_SPEC = struct.Struct("<II32s")
_POLICY_V1 = struct.Struct("<BBBB8s")  # struct fscrypt_policy_v1
_POLICY_V2 = struct.Struct("<BBBBB3s16s")  # struct fscrypt_policy_v2
_ADD_KEY_ARG = struct.Struct("<40sII32s")  # key_spec, raw_size, key_id, reserved[8]
_REMOVE_KEY_ARG = struct.Struct("<40sI20s")  # key_spec, removal_status_flags, reserved[5]
_KEY_STATUS_ARG = struct.Struct("<40s24sIII52s")  # ..., status, status_flags, user_count
_GET_POLICY_EX_ARG_SIZE = 8 + _POLICY_V2.size  # u64 policy_size + union

FS_IOC_SET_ENCRYPTION_POLICY = _ior("f", 19, _POLICY_V1.size)
FS_IOC_GET_ENCRYPTION_POLICY_EX = _iowr("f", 22, 9)  # size + version
FS_IOC_ADD_ENCRYPTION_KEY = _iowr("f", 23, _ADD_KEY_ARG.size)
FS_IOC_REMOVE_ENCRYPTION_KEY = _iowr("f", 24, _REMOVE_KEY_ARG.size)
FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS = _iowr("f", 25, _REMOVE_KEY_ARG.size)
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _iowr("f", 26, _KEY_STATUS_ARG.size)
FS_IOC_GET_ENCRYPTION_NONCE = _ior("f", 27, 16)


@contextlib.contextmanager
def _fd(target: str | os.PathLike[str] | int) -> Iterator[int]:
    if isinstance(target, int):
        yield target
        return
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def _key_spec(spec: bytes) -> bytes:
    """A descriptor (8 bytes, v1) or an identifier (16 bytes, v2) as a key specifier."""
    if len(spec) == FSCRYPT_KEY_DESCRIPTOR_SIZE:
        kind = FSCRYPT_KEY_SPEC_TYPE_DESCRIPTOR
    elif len(spec) == FSCRYPT_KEY_IDENTIFIER_SIZE:
        kind = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    else:
        raise ValueError("key specifier must be an 8-byte descriptor or 16-byte identifier")
    return _KEY_SPEC.pack(kind, 0, bytes(spec))


def add_key(
    mountpoint: str | os.PathLike[str] | int, raw: bytes, *, descriptor: bytes | None = None
) -> bytes:
    """FS_IOC_ADD_ENCRYPTION_KEY; returns the key identifier (v2) or the descriptor (v1).

    Without `descriptor` the key is added for v2 policies and the kernel
    computes its identifier; with it the key serves v1 policies naming that
    descriptor (root only).
    """
    if not 1 <= len(raw) <= FSCRYPT_MAX_KEY_SIZE:
        raise ValueError("raw key must be 1..64 bytes")
    if descriptor is None:
        spec = _KEY_SPEC.pack(FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER, 0, bytes(32))
    else:
        spec = _key_spec(descriptor)
    arg = bytearray(_ADD_KEY_ARG.pack(spec, len(raw), 0, bytes(32)) + bytes(raw))
    try:
        with _fd(mountpoint) as fd:
            fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
        spec_out = _KEY_SPEC.unpack_from(arg, 0)[2]
    finally:
        arg[_ADD_KEY_ARG.size :] = bytes(len(raw))
    if descriptor is None:
        return bytes(spec_out[:FSCRYPT_KEY_IDENTIFIER_SIZE])
    return bytes(descriptor)


def remove_key(
    mountpoint: str | os.PathLike[str] | int, spec: bytes, *, all_users: bool = False
) -> int:
    """FS_IOC_REMOVE_ENCRYPTION_KEY(_ALL_USERS); returns removal_status_flags."""
    arg = bytearray(_REMOVE_KEY_ARG.pack(_key_spec(spec), 0, bytes(20)))
    req = FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS if all_users else FS_IOC_REMOVE_ENCRYPTION_KEY
    with _fd(mountpoint) as fd:
        fcntl.ioctl(fd, req, arg)
    return _REMOVE_KEY_ARG.unpack(arg)[1]


@dataclass(frozen=True)
class KeyStatus:
    status: int  # FSCRYPT_KEY_STATUS_*
    status_flags: int
    user_count: int


def key_status(mountpoint: str | os.PathLike[str] | int, spec: bytes) -> KeyStatus:
    """FS_IOC_GET_ENCRYPTION_KEY_STATUS."""
    arg = bytearray(_KEY_STATUS_ARG.pack(_key_spec(spec), bytes(24), 0, 0, 0, bytes(52)))
    with _fd(mountpoint) as fd:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg)
    _, _, status, flags, users, _ = _KEY_STATUS_ARG.unpack(arg)
    return KeyStatus(status, flags, users)


def set_policy_v1(
    directory: str | os.PathLike[str] | int,
    descriptor: bytes,
    *,
    contents_mode: int = FSCRYPT_MODE_AES_256_XTS,
    filenames_mode: int = FSCRYPT_MODE_AES_256_CTS,
    flags: int = FSCRYPT_POLICY_FLAGS_PAD_32,
) -> None:
    """FS_IOC_SET_ENCRYPTION_POLICY with struct fscrypt_policy_v1 on an empty directory."""
    if len(descriptor) != FSCRYPT_KEY_DESCRIPTOR_SIZE:
        raise ValueError("descriptor must be 8 bytes")
    arg = _POLICY_V1.pack(FSCRYPT_POLICY_V1, contents_mode, filenames_mode, flags, descriptor)
    with _fd(directory) as fd:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, arg)


def set_policy_v2(
    directory: str | os.PathLike[str] | int,
    identifier: bytes,
    *,
    contents_mode: int = FSCRYPT_MODE_AES_256_XTS,
    filenames_mode: int = FSCRYPT_MODE_AES_256_CTS,
    flags: int = FSCRYPT_POLICY_FLAGS_PAD_32,
    log2_data_unit_size: int = 0,
) -> None:
    """FS_IOC_SET_ENCRYPTION_POLICY with struct fscrypt_policy_v2 (same ioctl number)."""
    if len(identifier) != FSCRYPT_KEY_IDENTIFIER_SIZE:
        raise ValueError("identifier must be 16 bytes")
    arg = _POLICY_V2.pack(
        FSCRYPT_POLICY_V2,
        contents_mode,
        filenames_mode,
        flags,
        log2_data_unit_size,
        bytes(3),
        identifier,
    )
    with _fd(directory) as fd:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, arg)


@dataclass(frozen=True)
class KernelPolicy:
    """What FS_IOC_GET_ENCRYPTION_POLICY_EX reports (version 0 means v1)."""

    version: int
    contents_mode: int
    filenames_mode: int
    flags: int
    key_spec: bytes
    log2_data_unit_size: int = 0


def get_policy(target: str | os.PathLike[str] | int) -> KernelPolicy:
    """FS_IOC_GET_ENCRYPTION_POLICY_EX on an open file or directory."""
    arg = bytearray(struct.pack("<Q", _POLICY_V2.size) + bytes(_POLICY_V2.size))
    with _fd(target) as fd:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, arg)
    (size,) = struct.unpack_from("<Q", arg)
    version = arg[8]
    if version == FSCRYPT_POLICY_V1 and size == _POLICY_V1.size:
        _, c, f, fl, desc = _POLICY_V1.unpack_from(arg, 8)
        return KernelPolicy(version, c, f, fl, bytes(desc))
    if version == FSCRYPT_POLICY_V2 and size == _POLICY_V2.size:
        _, c, f, fl, du, _, ident = _POLICY_V2.unpack_from(arg, 8)
        return KernelPolicy(version, c, f, fl, bytes(ident), du)
    raise OSError(f"unexpected policy version {version} of size {size}")


def get_nonce(target: str | os.PathLike[str] | int) -> bytes:
    """FS_IOC_GET_ENCRYPTION_NONCE: the 16-byte per-file nonce of the context."""
    arg = bytearray(16)
    with _fd(target) as fd:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_NONCE, arg)
    return bytes(arg)
