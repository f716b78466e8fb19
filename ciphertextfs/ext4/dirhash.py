"""The htree directory hash of ext4 (the kernel's ext4fs_dirhash, non-casefold).

The kernel places each entry of an indexed directory by this hash, and for an
encrypted directory it hashes the ciphertext name: arbitrary bytes, so the
signed/unsigned char distinction of the legacy algorithms matters for every
byte >= 0x80.  Only the algorithms without a casefold step are here; SipHash
(DX_HASH_SIPHASH, casefolded encrypted directories) stores its hash on disk.

Listing an encrypted htree directory hashes every name it shows, which in
Python is the largest single cost of a `find` over the view.  When
e2fsprogs' libext2fs is installed (it comes with e2fsprogs), its
ext2fs_dirhash computes the same hashes in C; the Python implementation
below is the reference, always used without the library, and the tests
hold the two equal to each other and to debugfs.
"""

import ctypes
import ctypes.util
import struct
import threading

from ciphertextfs.ext4.errors import CorruptError

DX_HASH_LEGACY = 0
DX_HASH_HALF_MD4 = 1
DX_HASH_TEA = 2
DX_HASH_LEGACY_UNSIGNED = 3
DX_HASH_HALF_MD4_UNSIGNED = 4
DX_HASH_TEA_UNSIGNED = 5
DX_HASH_SIPHASH = 6

EXT2_FLAGS_SIGNED_HASH = 0x0001
EXT2_FLAGS_UNSIGNED_HASH = 0x0002

# The largest hash a 32-bit htree cookie can carry; the kernel keeps names
# off the value that means end-of-directory to readdir.
EXT4_HTREE_EOF_32BIT = 0x7FFFFFFF

_M = 0xFFFFFFFF
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_K2 = 0x5A827999
_K3 = 0x6ED9EBA1
_TEA_DELTA = 0x9E3779B9
_TEA_SUMS = tuple((_TEA_DELTA * i) & _M for i in range(1, 17))


def dx_hash_version(s_def_hash_version: int, s_flags: int) -> int:
    """Return the hash version the kernel really uses for a stored version.

    The legacy, half_md4 and tea algorithms were first written with C
    `char`, whose signedness depends on the architecture, so the superblock
    records which one made the directories.  The kernel adds 3 (the
    _UNSIGNED variant) when EXT2_FLAGS_UNSIGNED_HASH is set; the same
    adjustment applies to the hash_version of a dx_root.
    """
    if s_def_hash_version <= DX_HASH_TEA and s_flags & EXT2_FLAGS_UNSIGNED_HASH:
        return s_def_hash_version + 3
    return s_def_hash_version


def _seed_words(seed: bytes | None) -> tuple[int, int, int, int]:
    """An all-zero s_hash_seed means "no seed": the MD4 initial values."""
    if seed is None:
        return _DEFAULT_SEED
    if len(seed) != 16:
        raise ValueError("s_hash_seed is 16 bytes")
    words = struct.unpack("<4I", seed)
    if not any(words):
        return _DEFAULT_SEED
    return words


def _legacy(name: bytes, signed: bool) -> int:
    hash0, hash1 = 0x12A3FE2D, 0x37ABE8F9
    for c in name:
        if signed and c >= 0x80:
            c -= 256
        h = (hash1 + (hash0 ^ ((c * 7152373) & _M))) & _M
        if h & 0x80000000:
            h = (h - 0x7FFFFFFF) & _M
        hash1, hash0 = hash0, h
    return (hash0 << 1) & _M


def _str2hashbuf(chunk: bytes, length: int, num: int, signed: bool) -> list[int]:
    """Pack up to num*4 bytes into num big-endian words as the kernel does.

    `length` is the length of the rest of the name (not only this chunk):
    it fills the padding, so names differing only by trailing bytes
    beyond a chunk still differ.  A signed char subtracts 256 at its own
    position, which after the shifts is 2 << (bit of the byte's top bit);
    the first byte of a word is shifted out entirely, so only the other
    three bytes' top bits count.
    """
    pad = (length | (length << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    n_full = len(chunk) // 4
    words = list(struct.unpack_from(f">{n_full}I", chunk))
    if signed:
        words = [(w - ((w & 0x00808080) << 1)) & _M for w in words]
    if n_full < num:
        rest = chunk[n_full * 4 :]
        k = len(rest)
        val = int.from_bytes(rest, "big")
        word = ((pad << (8 * k)) + val) & _M
        if signed:
            high = int.from_bytes(bytes(0x80 if b >= 0x80 else 0 for b in rest), "big")
            word = (word - (high << 1)) & _M
        words.append(word)
        words.extend([pad] * (num - n_full - 1))
    return words


def _half_md4_transform(buf: list[int], w: list[int]) -> None:
    """MD4 cut down to 8 input words and three rounds, as in the kernel."""
    a, b, c, d = buf
    w0, w1, w2, w3, w4, w5, w6, w7 = w
    # Round 1: F(x, y, z) = z ^ (x & (y ^ z))
    a = (a + (d ^ (b & (c ^ d))) + w0) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (c ^ (a & (b ^ c))) + w1) & _M
    d = ((d << 7) | (d >> 25)) & _M
    c = (c + (b ^ (d & (a ^ b))) + w2) & _M
    c = ((c << 11) | (c >> 21)) & _M
    b = (b + (a ^ (c & (d ^ a))) + w3) & _M
    b = ((b << 19) | (b >> 13)) & _M
    a = (a + (d ^ (b & (c ^ d))) + w4) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (c ^ (a & (b ^ c))) + w5) & _M
    d = ((d << 7) | (d >> 25)) & _M
    c = (c + (b ^ (d & (a ^ b))) + w6) & _M
    c = ((c << 11) | (c >> 21)) & _M
    b = (b + (a ^ (c & (d ^ a))) + w7) & _M
    b = ((b << 19) | (b >> 13)) & _M
    # Round 2: G(x, y, z) = (x & y) + ((x ^ y) & z)
    a = (a + (b & c) + ((b ^ c) & d) + w1 + _K2) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (a & b) + ((a ^ b) & c) + w3 + _K2) & _M
    d = ((d << 5) | (d >> 27)) & _M
    c = (c + (d & a) + ((d ^ a) & b) + w5 + _K2) & _M
    c = ((c << 9) | (c >> 23)) & _M
    b = (b + (c & d) + ((c ^ d) & a) + w7 + _K2) & _M
    b = ((b << 13) | (b >> 19)) & _M
    a = (a + (b & c) + ((b ^ c) & d) + w0 + _K2) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (a & b) + ((a ^ b) & c) + w2 + _K2) & _M
    d = ((d << 5) | (d >> 27)) & _M
    c = (c + (d & a) + ((d ^ a) & b) + w4 + _K2) & _M
    c = ((c << 9) | (c >> 23)) & _M
    b = (b + (c & d) + ((c ^ d) & a) + w6 + _K2) & _M
    b = ((b << 13) | (b >> 19)) & _M
    # Round 3: H(x, y, z) = x ^ y ^ z
    a = (a + (b ^ c ^ d) + w3 + _K3) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (a ^ b ^ c) + w7 + _K3) & _M
    d = ((d << 9) | (d >> 23)) & _M
    c = (c + (d ^ a ^ b) + w2 + _K3) & _M
    c = ((c << 11) | (c >> 21)) & _M
    b = (b + (c ^ d ^ a) + w6 + _K3) & _M
    b = ((b << 15) | (b >> 17)) & _M
    a = (a + (b ^ c ^ d) + w1 + _K3) & _M
    a = ((a << 3) | (a >> 29)) & _M
    d = (d + (a ^ b ^ c) + w5 + _K3) & _M
    d = ((d << 9) | (d >> 23)) & _M
    c = (c + (d ^ a ^ b) + w0 + _K3) & _M
    c = ((c << 11) | (c >> 21)) & _M
    b = (b + (c ^ d ^ a) + w4 + _K3) & _M
    b = ((b << 15) | (b >> 17)) & _M
    buf[0] = (buf[0] + a) & _M
    buf[1] = (buf[1] + b) & _M
    buf[2] = (buf[2] + c) & _M
    buf[3] = (buf[3] + d) & _M


def _tea_transform(buf: list[int], w: list[int]) -> None:
    b0, b1 = buf[0], buf[1]
    a, b, c, d = w
    for s in _TEA_SUMS:
        b0 = (b0 + ((((b1 << 4) + a) & _M) ^ ((b1 + s) & _M) ^ ((b1 >> 5) + b))) & _M
        b1 = (b1 + ((((b0 << 4) + c) & _M) ^ ((b0 + s) & _M) ^ ((b0 >> 5) + d))) & _M
    buf[0] = (buf[0] + b0) & _M
    buf[1] = (buf[1] + b1) & _M


def _finish(hash_: int) -> int:
    """Clear bit 0 (the htree collision marker) and keep off the EOF cookie."""
    hash_ &= ~1 & _M
    if hash_ == EXT4_HTREE_EOF_32BIT << 1:
        hash_ = (EXT4_HTREE_EOF_32BIT - 1) << 1
    return hash_


def _load_ext2fs_dirhash():  # noqa: ANN202 - a ctypes function or None
    """libext2fs's ext2fs_dirhash(version, name, len, seed, &hash, &minor), or None.

    It takes the name with its length, so NUL bytes of a ciphertext name
    are hashed like any other byte.  No argtypes: every listing hashes each
    of its names, and ctypes' default conversions (a Python int to a C int,
    bytes to char *, None to NULL, byref to a pointer) are what it takes,
    several times cheaper than checked ones.
    """
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("ext2fs") or "libext2fs.so.2")
        fn = lib.ext2fs_dirhash
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


class _HashOut(threading.local):
    """The two output words of one thread's calls (ctypes drops the GIL while in C)."""

    def __init__(self) -> None:
        self.hash = ctypes.c_uint32()
        self.minor = ctypes.c_uint32()
        self.hash_ref = ctypes.byref(self.hash)
        self.minor_ref = ctypes.byref(self.minor)


_ext2fs_dirhash = _load_ext2fs_dirhash()
_out = _HashOut()
_NATIVE_VERSIONS = frozenset(range(DX_HASH_LEGACY, DX_HASH_TEA_UNSIGNED + 1))


def ext4fs_dirhash(name: bytes, hash_version: int, seed: bytes | None) -> tuple[int, int]:
    """Return (hash, minor_hash) of a directory entry name as the kernel does.

    `hash_version` is the effective version (see `dx_hash_version`); `seed`
    is s_hash_seed (16 bytes; all zero or None for the default).  The
    legacy hash has no minor hash (0) and ignores the seed.
    """
    fn = _ext2fs_dirhash
    if fn is None or hash_version not in _NATIVE_VERSIONS:
        return python_dirhash(name, hash_version, seed)
    if seed is not None and len(seed) != 16:
        raise ValueError("s_hash_seed is 16 bytes")
    out = _out
    if fn(hash_version, name, len(name), seed, out.hash_ref, out.minor_ref):
        return python_dirhash(name, hash_version, seed)
    return out.hash.value, out.minor.value


def python_dirhash(name: bytes, hash_version: int, seed: bytes | None) -> tuple[int, int]:
    """ext4fs_dirhash written out in Python: the reference, and the fallback."""
    if hash_version in (DX_HASH_LEGACY, DX_HASH_LEGACY_UNSIGNED):
        return _finish(_legacy(name, hash_version == DX_HASH_LEGACY)), 0
    if hash_version in (DX_HASH_HALF_MD4, DX_HASH_HALF_MD4_UNSIGNED):
        signed = hash_version == DX_HASH_HALF_MD4
        buf = list(_seed_words(seed))
        length = len(name)
        pos = 0
        while length > 0:
            chunk = name[pos : pos + 32]
            _half_md4_transform(buf, _str2hashbuf(chunk, length, 8, signed))
            length -= 32
            pos += 32
        return _finish(buf[1]), buf[2]
    if hash_version in (DX_HASH_TEA, DX_HASH_TEA_UNSIGNED):
        signed = hash_version == DX_HASH_TEA
        buf = list(_seed_words(seed))
        length = len(name)
        pos = 0
        while length > 0:
            chunk = name[pos : pos + 16]
            _tea_transform(buf, _str2hashbuf(chunk, length, 4, signed))
            length -= 16
            pos += 16
        return _finish(buf[0]), buf[1]
    raise CorruptError(f"unsupported directory hash version {hash_version}")
