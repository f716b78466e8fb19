"""The few libext2fs calls the image writer needs, through ctypes.

libext2fs keeps the bitmaps (including the ones of uninitialised groups
that a fresh mke2fs leaves unwritten), the group descriptor counters and
checksums and the superblock right; everything stored in blocks the writer
encodes itself, so no name ever goes through ext2fs_link(), which takes a
C string and so cannot hold the NUL bytes of a ciphertext name.
"""

from __future__ import annotations

import ctypes
import ctypes.util

EXT2_FLAG_RW = 0x01
EXT2_FLAG_64BITS = 0x20000

_errcode = ctypes.c_long
_u64 = ctypes.c_uint64


class Ext2Error(OSError):
    """A libext2fs call failed; the message is com_err's."""


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL | None]:
    name = ctypes.util.find_library("ext2fs") or "libext2fs.so.2"
    lib = ctypes.CDLL(name)
    try:
        com_err = ctypes.CDLL(ctypes.util.find_library("com_err") or "libcom_err.so.2")
        com_err.error_message.restype = ctypes.c_char_p
        com_err.error_message.argtypes = [_errcode]
    except OSError:
        com_err = None
    try:
        lib.initialize_ext2_error_table.argtypes = []
        lib.initialize_ext2_error_table.restype = None
        lib.initialize_ext2_error_table()
    except AttributeError:
        pass
    p = ctypes.c_void_p
    lib.ext2fs_open2.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint,
        p,
        ctypes.POINTER(p),
    ]
    lib.ext2fs_open2.restype = _errcode
    lib.ext2fs_read_bitmaps.argtypes = [p]
    lib.ext2fs_read_bitmaps.restype = _errcode
    lib.ext2fs_inode_alloc_stats2.argtypes = [p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
    lib.ext2fs_inode_alloc_stats2.restype = None
    lib.ext2fs_new_range.argtypes = [
        p,
        ctypes.c_int,
        _u64,
        _u64,
        p,
        ctypes.POINTER(_u64),
        ctypes.POINTER(_u64),
    ]
    lib.ext2fs_new_range.restype = _errcode
    lib.ext2fs_block_alloc_stats_range.argtypes = [p, _u64, ctypes.c_uint32, ctypes.c_int]
    lib.ext2fs_block_alloc_stats_range.restype = None
    lib.ext2fs_write_inode_full.argtypes = [p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_int]
    lib.ext2fs_write_inode_full.restype = _errcode
    lib.ext2fs_punch.argtypes = [p, ctypes.c_uint32, p, p, _u64, _u64]
    lib.ext2fs_punch.restype = _errcode
    lib.ext2fs_close2.argtypes = [p, ctypes.c_int]
    lib.ext2fs_close2.restype = _errcode
    lib.ext2fs_free.argtypes = [p]
    lib.ext2fs_free.restype = None
    return lib, com_err


_lib: ctypes.CDLL | None = None
_com_err: ctypes.CDLL | None = None


def _libs() -> ctypes.CDLL:
    global _lib, _com_err
    if _lib is None:
        _lib, _com_err = _load()
    return _lib


def _check(err: int, what: str) -> None:
    if err:
        msg = None
        if _com_err is not None:
            raw = _com_err.error_message(err)
            msg = raw.decode(errors="replace") if raw else None
        raise Ext2Error(f"libext2fs: {what}: {msg or f'error {err}'}")


class Ext2Fs:
    """An open filesystem; close() writes the bitmaps, descriptors and superblock."""

    def __init__(self, path: str) -> None:
        lib = _libs()
        self._lib = lib
        manager = ctypes.c_void_p.in_dll(lib, "unix_io_manager")
        fs = ctypes.c_void_p()
        _check(
            lib.ext2fs_open2(
                path.encode(),
                None,
                EXT2_FLAG_RW | EXT2_FLAG_64BITS,
                0,
                0,
                manager,
                ctypes.byref(fs),
            ),
            f"open {path}",
        )
        self._fs = fs
        try:
            _check(lib.ext2fs_read_bitmaps(fs), "read bitmaps")
        except Ext2Error:
            lib.ext2fs_free(fs)
            raise

    def alloc_inode(self, ino: int, is_dir: bool) -> None:
        self._lib.ext2fs_inode_alloc_stats2(self._fs, ino, 1, int(is_dir))

    def new_range(self, goal: int, length: int) -> tuple[int, int]:
        """Mark and return (first block, count <= length) of a free run at or after goal."""
        blk, got = _u64(), _u64()
        _check(
            self._lib.ext2fs_new_range(
                self._fs, 0, goal, length, None, ctypes.byref(blk), ctypes.byref(got)
            ),
            "allocate blocks",
        )
        n = min(got.value, length, 1 << 31)
        self._lib.ext2fs_block_alloc_stats_range(self._fs, blk.value, n, 1)
        return blk.value, n

    def free_range(self, blk: int, count: int) -> None:
        self._lib.ext2fs_block_alloc_stats_range(self._fs, blk, count, -1)

    def write_inode(self, ino: int, raw: bytes) -> None:
        """Write a full inode; libext2fs sets its checksum."""
        _check(
            self._lib.ext2fs_write_inode_full(self._fs, ino, raw, len(raw)), f"write inode {ino}"
        )

    def punch(self, ino: int) -> None:
        """Free every block of an inode mke2fs made (the root, lost+found)."""
        _check(
            self._lib.ext2fs_punch(self._fs, ino, None, None, 0, (1 << 64) - 1), f"free inode {ino}"
        )

    def close(self) -> None:
        if self._fs:
            fs, self._fs = self._fs, None
            _check(self._lib.ext2fs_close2(fs, 0), "close")

    def abandon(self) -> None:
        if self._fs:
            self._lib.ext2fs_free(self._fs)
            self._fs = None
