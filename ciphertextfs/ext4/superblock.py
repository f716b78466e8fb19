"""The ext4 superblock and group descriptors.

The superblock decides how every other structure is laid out (block size,
inode size, descriptor size, features), so its values are validated here
once; everything read later relies on these bounds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .crc import crc32c
from .errors import CorruptError, NotExt4Error

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_SUPER_MAGIC = 0xEF53

# s_feature_compat
COMPAT_DIR_PREALLOC = 0x1
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400
COMPAT_STABLE_INODES = 0x800
COMPAT_ORPHAN_FILE = 0x1000

# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

# s_feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

INCOMPAT_KNOWN = (
    INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD
)

EXT4_GOOD_OLD_INODE_SIZE = 128
EXT4_MIN_DESC_SIZE = 32
EXT4_MIN_DESC_SIZE_64BIT = 64
EXT4_MAX_BLOCK_LOG_SIZE = 16  # 64 KiB, the largest block size Linux mounts
EXT4_CRC32C_CHKSUM = 1

# bg_flags
EXT4_BG_INODE_UNINIT = 0x1
EXT4_BG_BLOCK_UNINIT = 0x2
EXT4_BG_INODE_ZEROED = 0x4

# (name, offset, struct format) of every superblock field the reader uses.
_SB_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("s_inodes_count", 0x0, "I"),
    ("s_blocks_count_lo", 0x4, "I"),
    ("s_r_blocks_count_lo", 0x8, "I"),
    ("s_free_blocks_count_lo", 0xC, "I"),
    ("s_free_inodes_count", 0x10, "I"),
    ("s_first_data_block", 0x14, "I"),
    ("s_log_block_size", 0x18, "I"),
    ("s_log_cluster_size", 0x1C, "I"),
    ("s_blocks_per_group", 0x20, "I"),
    ("s_clusters_per_group", 0x24, "I"),
    ("s_inodes_per_group", 0x28, "I"),
    ("s_mtime", 0x2C, "I"),
    ("s_wtime", 0x30, "I"),
    ("s_mnt_count", 0x34, "H"),
    ("s_max_mnt_count", 0x36, "H"),
    ("s_magic", 0x38, "H"),
    ("s_state", 0x3A, "H"),
    ("s_errors", 0x3C, "H"),
    ("s_minor_rev_level", 0x3E, "H"),
    ("s_lastcheck", 0x40, "I"),
    ("s_checkinterval", 0x44, "I"),
    ("s_creator_os", 0x48, "I"),
    ("s_rev_level", 0x4C, "I"),
    ("s_def_resuid", 0x50, "H"),
    ("s_def_resgid", 0x52, "H"),
    ("s_first_ino", 0x54, "I"),
    ("s_inode_size", 0x58, "H"),
    ("s_block_group_nr", 0x5A, "H"),
    ("s_feature_compat", 0x5C, "I"),
    ("s_feature_incompat", 0x60, "I"),
    ("s_feature_ro_compat", 0x64, "I"),
    ("s_uuid", 0x68, "16s"),
    ("s_volume_name", 0x78, "16s"),
    ("s_last_mounted", 0x88, "64s"),
    ("s_algorithm_usage_bitmap", 0xC8, "I"),
    ("s_prealloc_blocks", 0xCC, "B"),
    ("s_prealloc_dir_blocks", 0xCD, "B"),
    ("s_reserved_gdt_blocks", 0xCE, "H"),
    ("s_journal_uuid", 0xD0, "16s"),
    ("s_journal_inum", 0xE0, "I"),
    ("s_journal_dev", 0xE4, "I"),
    ("s_last_orphan", 0xE8, "I"),
    ("s_hash_seed", 0xEC, "16s"),
    ("s_def_hash_version", 0xFC, "B"),
    ("s_jnl_backup_type", 0xFD, "B"),
    ("s_desc_size", 0xFE, "H"),
    ("s_default_mount_opts", 0x100, "I"),
    ("s_first_meta_bg", 0x104, "I"),
    ("s_mkfs_time", 0x108, "I"),
    ("s_blocks_count_hi", 0x150, "I"),
    ("s_r_blocks_count_hi", 0x154, "I"),
    ("s_free_blocks_count_hi", 0x158, "I"),
    ("s_min_extra_isize", 0x15C, "H"),
    ("s_want_extra_isize", 0x15E, "H"),
    ("s_flags", 0x160, "I"),
    ("s_raid_stride", 0x164, "H"),
    ("s_mmp_interval", 0x166, "H"),
    ("s_mmp_block", 0x168, "Q"),
    ("s_raid_stripe_width", 0x170, "I"),
    ("s_log_groups_per_flex", 0x174, "B"),
    ("s_checksum_type", 0x175, "B"),
    ("s_encryption_level", 0x176, "B"),
    ("s_kbytes_written", 0x178, "Q"),
    ("s_backup_bgs", 0x24C, "8s"),
    ("s_encrypt_algos", 0x254, "4s"),
    ("s_encrypt_pw_salt", 0x258, "16s"),
    ("s_lpf_ino", 0x268, "I"),
    ("s_checksum_seed", 0x270, "I"),
    ("s_encoding", 0x27C, "H"),
    ("s_encoding_flags", 0x27E, "H"),
    ("s_orphan_file_inum", 0x280, "I"),
    ("s_checksum", 0x3FC, "I"),
)


@dataclass(frozen=True, slots=True)
class Superblock:
    """The parsed primary superblock plus the values derived from it."""

    s_inodes_count: int
    s_blocks_count_lo: int
    s_r_blocks_count_lo: int
    s_free_blocks_count_lo: int
    s_free_inodes_count: int
    s_first_data_block: int
    s_log_block_size: int
    s_log_cluster_size: int
    s_blocks_per_group: int
    s_clusters_per_group: int
    s_inodes_per_group: int
    s_mtime: int
    s_wtime: int
    s_mnt_count: int
    s_max_mnt_count: int
    s_magic: int
    s_state: int
    s_errors: int
    s_minor_rev_level: int
    s_lastcheck: int
    s_checkinterval: int
    s_creator_os: int
    s_rev_level: int
    s_def_resuid: int
    s_def_resgid: int
    s_first_ino: int
    s_inode_size: int
    s_block_group_nr: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_volume_name: bytes
    s_last_mounted: bytes
    s_algorithm_usage_bitmap: int
    s_prealloc_blocks: int
    s_prealloc_dir_blocks: int
    s_reserved_gdt_blocks: int
    s_journal_uuid: bytes
    s_journal_inum: int
    s_journal_dev: int
    s_last_orphan: int
    s_hash_seed: bytes
    s_def_hash_version: int
    s_jnl_backup_type: int
    s_desc_size: int
    s_default_mount_opts: int
    s_first_meta_bg: int
    s_mkfs_time: int
    s_blocks_count_hi: int
    s_r_blocks_count_hi: int
    s_free_blocks_count_hi: int
    s_min_extra_isize: int
    s_want_extra_isize: int
    s_flags: int
    s_raid_stride: int
    s_mmp_interval: int
    s_mmp_block: int
    s_raid_stripe_width: int
    s_log_groups_per_flex: int
    s_checksum_type: int
    s_encryption_level: int
    s_kbytes_written: int
    s_backup_bgs: bytes
    s_encrypt_algos: bytes
    s_encrypt_pw_salt: bytes
    s_lpf_ino: int
    s_checksum_seed: int
    s_encoding: int
    s_encoding_flags: int
    s_orphan_file_inum: int
    s_checksum: int
    raw: bytes

    # -- derived values -------------------------------------------------

    def has_compat(self, flag: int) -> bool:
        return bool(self.s_feature_compat & flag)

    def has_incompat(self, flag: int) -> bool:
        return bool(self.s_feature_incompat & flag)

    def has_ro_compat(self, flag: int) -> bool:
        return bool(self.s_feature_ro_compat & flag)

    @property
    def block_size(self) -> int:
        return 1024 << self.s_log_block_size

    @property
    def cluster_size(self) -> int:
        """Allocation unit; only differs from the block size with bigalloc."""
        if self.has_ro_compat(RO_COMPAT_BIGALLOC):
            return 1024 << self.s_log_cluster_size
        return self.block_size

    @property
    def is_64bit(self) -> bool:
        return self.has_incompat(INCOMPAT_64BIT)

    def _wide(self, lo: int, hi: int) -> int:
        """A 64-bit count split in two: the high half only counts with 64bit.

        Without the feature the high field is whatever was left in the padding.
        """
        return lo | ((hi if self.is_64bit else 0) << 32)

    @property
    def blocks_count(self) -> int:
        return self._wide(self.s_blocks_count_lo, self.s_blocks_count_hi)

    def statfs_counts(self) -> tuple[int, int, int]:
        """(blocks, free blocks, reserved blocks) as ext4_statfs() reports them.

        Free may exceed the total on a damaged superblock, which statfs must
        not report.  On extent filesystems the kernel also holds back 2% (at
        most 4096 clusters) for extent tree splits, so df on the view shows
        what df on the filesystem would.
        """
        blocks = self.blocks_count
        free = min(self._wide(self.s_free_blocks_count_lo, self.s_free_blocks_count_hi), blocks)
        reserved = self._wide(self.s_r_blocks_count_lo, self.s_r_blocks_count_hi)
        if self.has_incompat(INCOMPAT_EXTENTS):
            cluster = self.cluster_size // self.block_size
            reserved += min(blocks // cluster // 50, 4096) * cluster
        return blocks, free, min(reserved, blocks)

    @property
    def inode_size(self) -> int:
        if self.s_rev_level == 0:
            return EXT4_GOOD_OLD_INODE_SIZE
        return self.s_inode_size

    @property
    def desc_size(self) -> int:
        return self.s_desc_size if self.is_64bit else EXT4_MIN_DESC_SIZE

    @property
    def group_count(self) -> int:
        span = self.blocks_count - self.s_first_data_block
        return (span + self.s_blocks_per_group - 1) // self.s_blocks_per_group

    @property
    def metadata_csum(self) -> bool:
        return self.has_ro_compat(RO_COMPAT_METADATA_CSUM)

    @property
    def csum_seed(self) -> int:
        """Seed of every metadata checksum except the superblock's own."""
        if self.has_incompat(INCOMPAT_CSUM_SEED):
            return self.s_checksum_seed
        return crc32c(0xFFFFFFFF, self.s_uuid)

    @property
    def backup_bgs(self) -> tuple[int, int]:
        a, b = struct.unpack("<II", self.s_backup_bgs)
        return a, b

    def checksum_ok(self) -> bool:
        return crc32c(0xFFFFFFFF, self.raw[:0x3FC]) == self.s_checksum

    def group_has_super(self, group: int) -> bool:
        """Whether a group carries a superblock backup (and so a GDT copy)."""
        if group == 0:
            return True
        if self.has_compat(COMPAT_SPARSE_SUPER2):
            return group in self.backup_bgs
        if group <= 1 or not self.has_ro_compat(RO_COMPAT_SPARSE_SUPER):
            return True
        if not group & 1:
            return False
        return _is_power_of(group, 3) or _is_power_of(group, 5) or _is_power_of(group, 7)


def _is_power_of(n: int, base: int) -> bool:
    p = 1
    while p < n:
        p *= base
    return p == n


def with_fields(raw: bytes, **fields: int | bytes) -> bytes:
    """The superblock `raw` with some s_* fields replaced, checksum recomputed.

    The image writer sets fields mke2fs has no option for; libext2fs then
    copies the superblock to its backups when it closes the filesystem.
    """
    out = bytearray(raw[:SUPERBLOCK_SIZE])
    layout = {name: (off, fmt) for name, off, fmt in _SB_FIELDS}
    for name, value in fields.items():
        off, fmt = layout[name]
        struct.pack_into("<" + fmt, out, off, value)
    if parse_superblock(bytes(out)).metadata_csum:
        struct.pack_into("<I", out, 0x3FC, crc32c(0xFFFFFFFF, bytes(out[:0x3FC])))
    return bytes(out)


def parse_superblock(raw: bytes) -> Superblock:
    """Parse and validate the 1024-byte superblock.

    Raises NotExt4Error when the values make the filesystem unreadable: a
    wrong geometry would make every later offset meaningless.
    """
    if len(raw) < SUPERBLOCK_SIZE:
        raise NotExt4Error("source too small for an ext4 superblock")
    values = {}
    for name, off, fmt in _SB_FIELDS:
        (values[name],) = struct.unpack_from("<" + fmt, raw, off)
    sb = Superblock(raw=bytes(raw[:SUPERBLOCK_SIZE]), **values)
    if sb.s_magic != EXT4_SUPER_MAGIC:
        raise NotExt4Error("no ext2/3/4 superblock magic")
    if sb.s_log_block_size > EXT4_MAX_BLOCK_LOG_SIZE - 10:
        raise NotExt4Error(f"unsupported block size log {sb.s_log_block_size}")
    if sb.has_ro_compat(RO_COMPAT_BIGALLOC) and not (
        sb.s_log_block_size <= sb.s_log_cluster_size <= 30
    ):
        raise NotExt4Error(f"bad cluster size log {sb.s_log_cluster_size}")
    if sb.has_incompat(INCOMPAT_JOURNAL_DEV):
        raise NotExt4Error("this is an external journal device, not a filesystem")
    bs = sb.block_size
    if sb.s_blocks_per_group == 0 or sb.s_blocks_per_group > 8 * bs * (sb.cluster_size // bs):
        raise NotExt4Error(f"bad s_blocks_per_group {sb.s_blocks_per_group}")
    if sb.s_inodes_per_group == 0 or sb.s_inodes_per_group > 8 * bs:
        raise NotExt4Error(f"bad s_inodes_per_group {sb.s_inodes_per_group}")
    if sb.s_rev_level > 1:
        raise NotExt4Error(f"unknown revision level {sb.s_rev_level}")
    isz = sb.inode_size
    if isz < EXT4_GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
        raise NotExt4Error(f"bad s_inode_size {isz}")
    if sb.is_64bit:
        ds = sb.s_desc_size
        if ds < EXT4_MIN_DESC_SIZE_64BIT or ds > 1024 or ds & (ds - 1) or ds > bs:
            raise NotExt4Error(f"bad s_desc_size {ds}")
    if sb.blocks_count <= sb.s_first_data_block:
        raise NotExt4Error("s_blocks_count does not exceed s_first_data_block")
    if sb.s_first_data_block > 1 or (bs > 1024 and sb.s_first_data_block != 0):
        raise NotExt4Error(f"bad s_first_data_block {sb.s_first_data_block}")
    if sb.s_inodes_count == 0 or sb.s_inodes_count > sb.group_count * sb.s_inodes_per_group:
        raise NotExt4Error(f"bad s_inodes_count {sb.s_inodes_count}")
    if sb.s_rev_level >= 1 and not (1 <= sb.s_first_ino <= sb.s_inodes_count):
        raise NotExt4Error(f"bad s_first_ino {sb.s_first_ino}")
    if sb.metadata_csum and sb.s_checksum_type != EXT4_CRC32C_CHKSUM:
        raise NotExt4Error(f"unknown checksum type {sb.s_checksum_type}")
    return sb


@dataclass(frozen=True, slots=True)
class GroupDesc:
    """One block group descriptor, with the 64-bit halves already joined."""

    group: int
    bg_block_bitmap: int
    bg_inode_bitmap: int
    bg_inode_table: int
    bg_free_blocks_count: int
    bg_free_inodes_count: int
    bg_used_dirs_count: int
    bg_flags: int
    bg_itable_unused: int
    bg_checksum: int


def parse_group_desc(raw: bytes, group: int, desc_size: int) -> GroupDesc:
    """Parse one descriptor of `desc_size` bytes (32, or 64+ with 64bit)."""
    if len(raw) < desc_size or desc_size < EXT4_MIN_DESC_SIZE:
        raise CorruptError(f"group {group}: short group descriptor")
    (
        bb_lo,
        ib_lo,
        it_lo,
        fb_lo,
        fi_lo,
        ud_lo,
        flags,
        _excl_lo,
        _bbc_lo,
        _ibc_lo,
        iu_lo,
        csum,
    ) = struct.unpack_from("<IIIHHHHIHHHH", raw, 0)
    bb_hi = ib_hi = it_hi = fb_hi = fi_hi = ud_hi = iu_hi = 0
    if desc_size >= EXT4_MIN_DESC_SIZE_64BIT:
        bb_hi, ib_hi, it_hi, fb_hi, fi_hi, ud_hi, iu_hi = struct.unpack_from("<IIIHHHH", raw, 0x20)
    return GroupDesc(
        group=group,
        bg_block_bitmap=bb_lo | (bb_hi << 32),
        bg_inode_bitmap=ib_lo | (ib_hi << 32),
        bg_inode_table=it_lo | (it_hi << 32),
        bg_free_blocks_count=fb_lo | (fb_hi << 16),
        bg_free_inodes_count=fi_lo | (fi_hi << 16),
        bg_used_dirs_count=ud_lo | (ud_hi << 16),
        bg_flags=flags,
        bg_itable_unused=iu_lo | (iu_hi << 16),
        bg_checksum=csum,
    )


def group_desc_checksum(raw: bytes, group: int, csum_seed: int) -> int:
    """metadata_csum checksum of one descriptor (bg_checksum counted as zero)."""
    crc = crc32c(csum_seed, struct.pack("<I", group))
    crc = crc32c(crc, raw[:0x1E])
    crc = crc32c(crc, b"\0\0")
    crc = crc32c(crc, raw[0x20:])
    return crc & 0xFFFF


def descriptor_block(sb: Superblock, group: int) -> tuple[int, int]:
    """(block number, byte offset in it) of group `group`'s descriptor.

    Without meta_bg the table follows the superblock; with meta_bg each
    meta group (one descriptor block worth of groups) keeps its descriptor
    block in its own first group, after that group's superblock backup.
    """
    bs = sb.block_size
    ds = sb.desc_size
    per_block = bs // ds
    nr, index = divmod(group, per_block)
    sb_block = SUPERBLOCK_OFFSET // bs  # 1 with 1 KiB blocks, else 0
    if not sb.has_incompat(INCOMPAT_META_BG) or nr < sb.s_first_meta_bg:
        return sb_block + nr + 1, index * ds
    first = nr * per_block
    has_super = 1 if sb.group_has_super(first) else 0
    if bs == 1024 and nr == 0 and sb.s_first_data_block == 0:
        has_super += 1
    return sb.s_first_data_block + first * sb.s_blocks_per_group + has_super, index * ds
