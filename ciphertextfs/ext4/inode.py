"""ext4 inodes: the on-disk `struct ext4_inode` and its flags."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from .crc import crc32c
from .errors import CorruptError
from .superblock import (
    EXT4_GOOD_OLD_INODE_SIZE,
    INCOMPAT_64BIT,
    INCOMPAT_LARGEDIR,
    RO_COMPAT_HUGE_FILE,
    Superblock,
)

# i_flags
EXT4_SECRM_FL = 0x1
EXT4_UNRM_FL = 0x2
EXT4_COMPR_FL = 0x4
EXT4_SYNC_FL = 0x8
EXT4_IMMUTABLE_FL = 0x10
EXT4_APPEND_FL = 0x20
EXT4_NODUMP_FL = 0x40
EXT4_NOATIME_FL = 0x80
EXT4_ENCRYPT_FL = 0x800
EXT4_INDEX_FL = 0x1000
EXT4_IMAGIC_FL = 0x2000
EXT4_JOURNAL_DATA_FL = 0x4000
EXT4_NOTAIL_FL = 0x8000
EXT4_DIRSYNC_FL = 0x10000
EXT4_TOPDIR_FL = 0x20000
EXT4_HUGE_FILE_FL = 0x40000
EXT4_EXTENTS_FL = 0x80000
EXT4_VERITY_FL = 0x100000
EXT4_EA_INODE_FL = 0x200000
EXT4_DAX_FL = 0x2000000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_PROJINHERIT_FL = 0x20000000
EXT4_CASEFOLD_FL = 0x40000000

EXT4_N_BLOCKS = 15
I_BLOCK_SIZE = EXT4_N_BLOCKS * 4  # 60 bytes
EXT4_EPOCH_MASK = 0x3
EXT4_NSEC_SHIFT = 2

# Reserved inode numbers.
EXT4_ROOT_INO = 2
EXT4_GOOD_OLD_FIRST_INO = 11  # the first unreserved inode: lost+found, as mke2fs makes it

# Offsets of the fields after the 128-byte base inode.
_OFF_EXTRA_ISIZE = 0x80
_OFF_CHECKSUM_HI = 0x82
_OFF_CTIME_EXTRA = 0x84
_OFF_MTIME_EXTRA = 0x88
_OFF_ATIME_EXTRA = 0x8C
_OFF_CRTIME = 0x90
_OFF_CRTIME_EXTRA = 0x94
_OFF_PROJID = 0x9C
_OFF_CHECKSUM_LO = 0x7C

_BASE = struct.Struct("<HHIIIIIHHII4x60sIIII")
_OSD2 = struct.Struct("<HHHHHH")
_BASE_OSD2 = struct.Struct("<HHIIIIIHHII4x60sIIIIHHHHHH")  # both, the 128-byte base inode
_EXTRA = struct.Struct("<HHIIIIIII")  # i_extra_isize .. i_projid
_EXTRA_ALL = _OFF_PROJID + 4 - EXT4_GOOD_OLD_INODE_SIZE  # i_extra_isize covering all of _EXTRA
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_INO_GEN = struct.Struct("<II")
_OFF_OSD1 = 0x24  # l_i_version


@dataclass(slots=True, unsafe_hash=True)
class Inode:
    """One parsed inode.  `raw` keeps the on-disk bytes for the in-inode xattrs.

    Never assigned to once parsed, but not frozen: a frozen dataclass is
    much slower to build, and a listing builds one per entry.
    """

    ino: int
    i_mode: int
    i_uid: int
    i_gid: int
    i_size: int
    i_links_count: int
    i_flags: int
    i_atime_ns: int
    i_mtime_ns: int
    i_ctime_ns: int
    i_crtime_ns: int | None
    i_dtime: int
    i_generation: int
    i_file_acl: int
    i_block: bytes
    i_extra_isize: int
    i_blocks: int  # in 512-byte units
    i_projid: int
    rdev: tuple[int, int] | None
    raw: bytes

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.i_mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.i_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.i_mode)

    @property
    def is_encrypted(self) -> bool:
        return bool(self.i_flags & EXT4_ENCRYPT_FL)

    @property
    def has_inline_data(self) -> bool:
        return bool(self.i_flags & EXT4_INLINE_DATA_FL)

    @property
    def is_casefold(self) -> bool:
        return bool(self.i_flags & EXT4_CASEFOLD_FL)

    @property
    def has_extents(self) -> bool:
        return bool(self.i_flags & EXT4_EXTENTS_FL)


def _fits(extra_isize: int, offset: int, size: int) -> bool:
    """Whether a field past the base inode lies within i_extra_isize."""
    return offset + size <= EXT4_GOOD_OLD_INODE_SIZE + extra_isize


def _time_ns(seconds: int, extra: int | None) -> int:
    """Decode a 32-bit signed time plus its optional epoch/nanosecond word."""
    sec = seconds - (1 << 32) if seconds & 0x80000000 else seconds
    if extra is None:
        return sec * 1_000_000_000
    sec += (extra & EXT4_EPOCH_MASK) << 32
    return sec * 1_000_000_000 + (extra >> EXT4_NSEC_SHIFT)


def _decode_rdev(i_block: bytes) -> tuple[int, int]:
    """Device numbers: the old 16-bit encoding in i_block[0], else the new one in i_block[1]."""
    old, new = struct.unpack_from("<II", i_block, 0)
    if old:
        return (old >> 8) & 0xFF, old & 0xFF
    return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


def parse_inode(sb: Superblock, ino: int, raw: bytes) -> Inode:
    """Parse one inode of s_inode_size bytes."""
    isz = sb.inode_size
    if len(raw) < isz:
        raise CorruptError(f"inode {ino}: short read")
    raw = bytes(raw[:isz])
    (
        mode,
        uid_lo,
        size_lo,
        atime,
        ctime,
        mtime,
        dtime,
        gid_lo,
        links,
        blocks_lo,
        flags,
        i_block,
        generation,
        acl_lo,
        size_hi,
        _faddr,
        blocks_hi,
        acl_hi,
        uid_hi,
        gid_hi,
        _csum_lo,
        _res,
    ) = _BASE_OSD2.unpack_from(raw, 0)

    extra_isize = 0
    ctime_x = mtime_x = atime_x = crtime = crtime_x = None
    projid = 0
    if isz > EXT4_GOOD_OLD_INODE_SIZE:
        (extra_isize,) = _U16.unpack_from(raw, _OFF_EXTRA_ISIZE)
        if EXT4_GOOD_OLD_INODE_SIZE + extra_isize > isz or extra_isize & 3:
            raise CorruptError(f"inode {ino}: bad i_extra_isize {extra_isize}")
        if extra_isize >= _EXTRA_ALL:
            _x, _c, ctime_x, mtime_x, atime_x, crtime, crtime_x, _v, projid = _EXTRA.unpack_from(
                raw, _OFF_EXTRA_ISIZE
            )
        else:
            ctime_x = _extra(raw, extra_isize, _OFF_CTIME_EXTRA)
            mtime_x = _extra(raw, extra_isize, _OFF_MTIME_EXTRA)
            atime_x = _extra(raw, extra_isize, _OFF_ATIME_EXTRA)
            crtime = _extra(raw, extra_isize, _OFF_CRTIME)
            crtime_x = _extra(raw, extra_isize, _OFF_CRTIME_EXTRA)

    crtime_ns = None
    if crtime is not None:
        crtime_ns = _time_ns(crtime, crtime_x)

    size = size_lo
    if mode & 0o170000 == stat.S_IFREG or sb.s_feature_incompat & INCOMPAT_LARGEDIR:
        size |= size_hi << 32
    if size >= 1 << 63:
        raise CorruptError(f"inode {ino}: negative i_size")

    i_blocks = blocks_lo
    if sb.s_feature_ro_compat & RO_COMPAT_HUGE_FILE:
        i_blocks |= blocks_hi << 32
        if flags & EXT4_HUGE_FILE_FL:
            i_blocks *= sb.block_size // 512

    file_acl = acl_lo
    if sb.s_feature_incompat & INCOMPAT_64BIT:
        file_acl |= acl_hi << 32

    rdev = None
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        rdev = _decode_rdev(i_block)

    return Inode(
        ino,
        mode,
        uid_lo | (uid_hi << 16),
        gid_lo | (gid_hi << 16),
        size,
        links,
        flags,
        _time_ns(atime, atime_x),
        _time_ns(mtime, mtime_x),
        _time_ns(ctime, ctime_x),
        crtime_ns,
        dtime,
        generation,
        file_acl,
        i_block,
        extra_isize,
        i_blocks,
        projid,
        rdev,
        raw,
    )


def _extra(raw: bytes, extra_isize: int, off: int) -> int | None:
    """A 32-bit field past the base inode, None when i_extra_isize leaves it out."""
    if not _fits(extra_isize, off, 4):
        return None
    return _U32.unpack_from(raw, off)[0]


def inode_csum_seed(fs_seed: int, ino: int, generation: int) -> int:
    """Per-inode seed of the inode, extent, directory and dx checksums."""
    return crc32c(fs_seed, _INO_GEN.pack(ino, generation))


def inode_checksum_ok(inode: Inode, fs_seed: int) -> bool:
    """Verify the metadata_csum checksum (lo 16 bits, plus hi when it fits)."""
    raw = inode.raw
    has_hi = len(raw) > EXT4_GOOD_OLD_INODE_SIZE and _fits(inode.i_extra_isize, _OFF_CHECKSUM_HI, 2)
    stored = _U16.unpack_from(raw, _OFF_CHECKSUM_LO)[0]
    lo_end = _OFF_CHECKSUM_LO + 2
    if has_hi:
        stored |= _U16.unpack_from(raw, _OFF_CHECKSUM_HI)[0] << 16
        hi_end = _OFF_CHECKSUM_HI + 2
        zeroed = (
            raw[:_OFF_CHECKSUM_LO] + b"\0\0" + raw[lo_end:_OFF_CHECKSUM_HI] + b"\0\0" + raw[hi_end:]
        )
    else:
        zeroed = raw[:_OFF_CHECKSUM_LO] + b"\0\0" + raw[lo_end:]
    crc = crc32c(inode_csum_seed(fs_seed, inode.ino, inode.i_generation), zeroed)
    if not has_hi:
        crc &= 0xFFFF
    return crc == stored


# -- encoding (the image writer) ----------------------------------------------

EXT4_EXTRA_ISIZE = 32
"""i_extra_isize the writer gives every inode: up to i_projid, as mke2fs does."""


EXT4_TIME_MIN = -(1 << 31)
EXT4_TIME_MAX = (1 << 31) - 1 + (3 << 32)
"""Seconds ext4 can store with the two epoch bits (1901 to 2446); others are clamped."""


def _time_fields(ns: int) -> tuple[int, int]:
    """(seconds low 32 bits, extra: epoch bits and nanoseconds) of a time."""
    sec, nsec = divmod(ns, 1_000_000_000)
    if not EXT4_TIME_MIN <= sec <= EXT4_TIME_MAX:
        sec, nsec = min(max(sec, EXT4_TIME_MIN), EXT4_TIME_MAX), 0
    lo = sec & 0xFFFFFFFF
    signed_lo = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((sec - signed_lo) >> 32) & EXT4_EPOCH_MASK
    return lo, epoch | (nsec << EXT4_NSEC_SHIFT)


def encode_rdev(major: int, minor: int) -> bytes:
    """i_block of a device node, the inverse of _decode_rdev."""
    if major < 256 and minor < 256:
        return struct.pack("<II", (major << 8) | minor, 0).ljust(I_BLOCK_SIZE, b"\0")
    new = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return struct.pack("<II", 0, new & 0xFFFFFFFF).ljust(I_BLOCK_SIZE, b"\0")


def encode_inode(
    inode_size: int,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    links: int,
    flags: int,
    atime_ns: int,
    mtime_ns: int,
    ctime_ns: int,
    crtime_ns: int,
    i_block: bytes,
    i_blocks: int,
    file_acl: int = 0,
    generation: int = 0,
    ibody_xattrs: bytes = b"",
    version: int = 0,
) -> bytes:
    """An inode of `inode_size` bytes, checksum fields zero (the caller sets them).

    `i_blocks` is in 512-byte units (no huge_file scaling: the caller keeps
    it below 2**48); `ibody_xattrs` is the in-inode xattr area after
    i_extra_isize (see xattr.encode_ibody); `version` the low 32 bits of
    i_version (l_i_version), which an EA inode uses for its reference count.
    """
    if len(i_block) != I_BLOCK_SIZE:
        raise ValueError("i_block is 60 bytes")
    atime, atime_x = _time_fields(atime_ns)
    mtime, mtime_x = _time_fields(mtime_ns)
    ctime, ctime_x = _time_fields(ctime_ns)
    crtime, crtime_x = _time_fields(crtime_ns)
    buf = bytearray(inode_size)
    _BASE.pack_into(
        buf,
        0,
        mode,
        uid & 0xFFFF,
        size & 0xFFFFFFFF,
        atime,
        ctime,
        mtime,
        0,
        gid & 0xFFFF,
        links,
        i_blocks & 0xFFFFFFFF,
        flags,
        i_block,
        generation,
        file_acl & 0xFFFFFFFF,
        size >> 32,
        0,
    )
    struct.pack_into("<I", buf, _OFF_OSD1, version & 0xFFFFFFFF)
    _OSD2.pack_into(
        buf, 0x74, (i_blocks >> 32) & 0xFFFF, file_acl >> 32, uid >> 16, gid >> 16, 0, 0
    )
    if inode_size > EXT4_GOOD_OLD_INODE_SIZE:
        struct.pack_into("<H", buf, _OFF_EXTRA_ISIZE, EXT4_EXTRA_ISIZE)
        for off, value in (
            (_OFF_CTIME_EXTRA, ctime_x),
            (_OFF_MTIME_EXTRA, mtime_x),
            (_OFF_ATIME_EXTRA, atime_x),
            (_OFF_CRTIME, crtime),
            (_OFF_CRTIME_EXTRA, crtime_x),
        ):
            struct.pack_into("<I", buf, off, value)
        start = EXT4_GOOD_OLD_INODE_SIZE + EXT4_EXTRA_ISIZE
        if len(ibody_xattrs) > inode_size - start:
            raise ValueError("in-inode xattrs do not fit")
        buf[start : start + len(ibody_xattrs)] = ibody_xattrs
    elif ibody_xattrs:
        raise ValueError("128-byte inodes hold no xattrs")
    return bytes(buf)


def ibody_xattr_space(inode_size: int) -> int:
    """Bytes the writer's inodes leave for in-inode xattrs (magic included)."""
    return max(inode_size - EXT4_GOOD_OLD_INODE_SIZE - EXT4_EXTRA_ISIZE, 0)
