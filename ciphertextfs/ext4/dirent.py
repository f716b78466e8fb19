"""Directory entries: linear blocks, htree blocks, inline directories.

A whole directory is read by parsing every leaf block in logical order and
skipping the htree's interior (dx) blocks: the kernel's readdir returns the
same set of entries whatever the index says, and a damaged index cannot hide
a leaf this way.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .crc import crc32c
from .errors import CorruptError

EXT4_DIR_ROUND = 3
EXT4_NAME_LEN = 255
DIRENT_HEADER = 8
DIR_TAIL_SIZE = 12
EXT4_DIR_FT_DIR_CSUM = 0xDE
DX_NODE_COUNT_OFFSET = 0x8  # one fake empty dirent
DX_TAIL_SIZE = 8

# file_type values in ext4_dir_entry_2
EXT4_FT_UNKNOWN = 0
EXT4_FT_REG_FILE = 1
EXT4_FT_DIR = 2
EXT4_FT_CHRDEV = 3
EXT4_FT_BLKDEV = 4
EXT4_FT_FIFO = 5
EXT4_FT_SOCK = 6
EXT4_FT_SYMLINK = 7

FILE_TYPE_IFMT = (
    0,
    stat.S_IFREG,
    stat.S_IFDIR,
    stat.S_IFCHR,
    stat.S_IFBLK,
    stat.S_IFIFO,
    stat.S_IFSOCK,
    stat.S_IFLNK,
)
"""The S_IFMT bits of each file_type, as the kernel's getdents reports them
(fs_ftype_to_dtype); EXT4_FT_UNKNOWN, and any value past the table, say nothing."""


def file_type_ifmt(file_type: int) -> int:
    """The S_IFMT bits a directory entry gives its inode; 0 when it does not say."""
    return FILE_TYPE_IFMT[file_type] if file_type < len(FILE_TYPE_IFMT) else 0


_DIRENT = struct.Struct("<IHBB")
_TAIL = struct.Struct("<IHBBI")
_COUNTLIMIT = struct.Struct("<HH")


class DirEntry(NamedTuple):
    """One directory entry; `name` is the raw on-disk bytes (a tuple: one per entry).

    hash/minor_hash are set only for encrypted+casefolded directories, which
    store the name's hash after the name because it cannot be recomputed
    without the key.
    """

    inode: int
    name: bytes
    file_type: int
    hash: int | None = None
    minor_hash: int | None = None


def rec_len_from_disk(value: int, block_size: int) -> int:
    """Decode rec_len; with 64 KiB blocks the value 65535 or 0 means 65536."""
    if block_size < 65536:
        return value
    if value in (65535, 0):
        return 1 << 16
    return (value & 65532) | ((value & 3) << 16)


def dir_rec_len(name_len: int, hashed: bool) -> int:
    """Minimal rec_len of an entry with this name length."""
    length = (name_len + DIRENT_HEADER + EXT4_DIR_ROUND) & ~EXT4_DIR_ROUND
    return length + 8 if hashed else length


_MIN_REC_LEN = dir_rec_len(1, False)


def parse_entries(
    buf: bytes,
    *,
    block_size: int,
    inodes_count: int,
    filetype: bool,
    hashed: bool,
    what: str,
    warn: Callable[[str], None],
) -> list[DirEntry]:
    """Parse one region of directory entries (a block, or an inline area).

    As the kernel's readdir does, a damaged entry ends the region with a
    warning: entries before it are kept, the rest of the region is skipped.
    "." and ".." and unused entries (inode 0) are left out.
    """
    out: list[DirEntry] = []
    end = len(buf)
    off = 0
    unpack = _DIRENT.unpack_from
    while off + DIRENT_HEADER <= end:
        ino, raw_rec_len, name_len, ftype = unpack(buf, off)
        rec_len = rec_len_from_disk(raw_rec_len, block_size)
        start = off + DIRENT_HEADER
        name = buf[start : start + name_len]
        dots = name_len <= 2 and name in (b".", b"..")
        problem = None
        if rec_len < _MIN_REC_LEN:
            problem = f"rec_len {rec_len} too small"
        elif rec_len & 3:
            problem = f"rec_len {rec_len} not a multiple of 4"
        elif rec_len < dir_rec_len(name_len, hashed and ino != 0 and not dots):
            problem = f"rec_len {rec_len} too small for name_len {name_len}"
        elif off + rec_len > end:
            problem = f"rec_len {rec_len} runs past the block"
        elif ino > inodes_count:
            problem = f"inode {ino} out of range"
        if problem:
            warn(f"{what}: bad directory entry at offset {off}: {problem}")
            break
        if ino and name_len and not dots:
            h = mh = None
            if hashed:
                hoff = off + ((DIRENT_HEADER + name_len + EXT4_DIR_ROUND) & ~EXT4_DIR_ROUND)
                h, mh = struct.unpack_from("<II", buf, hoff)
            out.append(DirEntry(ino, bytes(name), ftype if filetype else 0, h, mh))
        off += rec_len
    return out


def leaf_tail_offset(block: bytes) -> int | None:
    """Offset of the checksum tail (det_reserved_ft 0xDE) of a leaf block, if any."""
    off = len(block) - DIR_TAIL_SIZE
    if off < 0:
        return None
    zero1, rec_len, zero2, ft, _csum = _TAIL.unpack_from(block, off)
    if zero1 == 0 and rec_len == DIR_TAIL_SIZE and zero2 == 0 and ft == EXT4_DIR_FT_DIR_CSUM:
        return off
    return None


def leaf_checksum_ok(block: bytes, seed: int) -> bool | None:
    """Verify a leaf block's tail; None when the block has no tail at all."""
    off = leaf_tail_offset(block)
    if off is None:
        return None
    (stored,) = struct.unpack_from("<I", block, off + 8)
    return crc32c(seed, block[:off]) == stored


def is_dx_node_block(block: bytes, block_size: int) -> bool:
    """Whether a block of an indexed directory is an interior dx node.

    A dx node starts with one empty fake entry spanning the whole block; an
    empty leaf may look the same, but it holds no entries either, so
    treating it as a node loses nothing.
    """
    if len(block) < DX_NODE_COUNT_OFFSET + 4:
        return False
    ino, raw_rec_len, name_len, _ = _DIRENT.unpack_from(block, 0)
    return ino == 0 and name_len == 0 and rec_len_from_disk(raw_rec_len, block_size) == len(block)


def dx_checksum_ok(block: bytes, count_offset: int, seed: int) -> bool | None:
    """Verify an htree root or node checksum; None when it has no room for a tail."""
    if count_offset + 4 > len(block):
        return None
    limit, count = _COUNTLIMIT.unpack_from(block, count_offset)
    tail = count_offset + 8 * limit
    if count > limit or tail + DX_TAIL_SIZE > len(block):
        return None
    size = count_offset + 8 * count
    crc = crc32c(seed, block[:size])
    crc = crc32c(crc, block[tail : tail + 4])
    crc = crc32c(crc, b"\0\0\0\0")
    (stored,) = struct.unpack_from("<I", block, tail + 4)
    return crc == stored


DX_ROOT_INFO_OFFSET = 0x18  # after the fake "." and ".." entries
DX_ROOT_INFO = struct.Struct("<IBBBB")  # reserved_zero, hash_version, info_length, levels, flags
_DX_ROOT_HASH_VERSION = DX_ROOT_INFO_OFFSET + 4
_DX_ROOT_INFO_LENGTH = DX_ROOT_INFO_OFFSET + 5
DX_ROOT_COUNT_OFFSET = DX_ROOT_INFO_OFFSET + DX_ROOT_INFO.size  # as written with info_length 8


def dx_root_count_offset(block: bytes) -> int:
    """Where dx_countlimit starts in a dx root: after dx_root_info (info_length)."""
    if len(block) <= _DX_ROOT_INFO_LENGTH:
        return DX_ROOT_COUNT_OFFSET
    return DX_ROOT_INFO_OFFSET + block[_DX_ROOT_INFO_LENGTH]


def dx_root_hash_version(block: bytes) -> int:
    """The hash version recorded in a dx_root's dx_root_info.

    The kernel hashes lookups and readdir of an indexed directory with this
    version, not the superblock default, so a view that reproduces its
    readdir hashes must use it too.
    """
    if len(block) <= _DX_ROOT_HASH_VERSION:
        raise CorruptError("dx_root too short")
    return block[_DX_ROOT_HASH_VERSION]


DX_BLOCK_MASK = 0x0FFFFFFF
"""dx_entry.block keeps its top four bits for flags the kernel masks off (dx_get_block)."""
EXT4_HTREE_LEVEL_COMPAT = 2
EXT4_HTREE_LEVEL = 3  # with largedir
DX_ROOT_INFO_LEN = 8


@dataclass(frozen=True, slots=True)
class DxRoot:
    """What a lookup needs of block 0 of an indexed directory."""

    hash_version: int
    indirect_levels: int
    count_offset: int


def parse_dx_root(block: bytes, max_levels: int) -> DxRoot:
    """Check a dx_root as the kernel's dx_probe does before trusting it.

    The fake "." (rec_len 12) and ".." (to the end of the block) entries,
    dx_root_info's reserved flag, its info_length and its depth are checked;
    any surprise is a CorruptError: the caller then reads the directory
    linearly, as ext4 does on ERR_BAD_DX_DIR.
    """
    bs = len(block)
    if bs < DX_ROOT_COUNT_OFFSET + 4:
        raise CorruptError("dx_root too short")
    _ino, dot_len, _nl, _ft = _DIRENT.unpack_from(block, 0)
    _ino2, dotdot_len, _nl2, _ft2 = _DIRENT.unpack_from(block, 12)
    if rec_len_from_disk(dot_len, bs) != 12 or rec_len_from_disk(dotdot_len, bs) != bs - 12:
        raise CorruptError("dx_root without its fake dot entries")
    _zero, hash_version, info_length, levels, flags = DX_ROOT_INFO.unpack_from(
        block, DX_ROOT_INFO_OFFSET
    )
    if flags & 1:
        raise CorruptError(f"dx_root: unimplemented hash flags {flags:#x}")
    if info_length != DX_ROOT_INFO_LEN:
        raise CorruptError(f"dx_root: info_length {info_length}")
    if levels >= max_levels:
        raise CorruptError(f"dx_root: depth {levels} beyond {max_levels - 1}")
    return DxRoot(hash_version, levels, DX_ROOT_INFO_OFFSET + info_length)


def dx_entries(block: bytes, count_offset: int, limit: int) -> list[tuple[int, int]]:
    """The (hash, block) pairs of a dx root or node, the first hash being 0.

    The stored limit must be the one the block size implies and the count
    within it, as dx_probe checks; hashes must not decrease, or a binary
    search over them would land anywhere.
    """
    if count_offset + 4 > len(block):
        raise CorruptError("dx block too short for its count")
    stored_limit, count = _COUNTLIMIT.unpack_from(block, count_offset)
    if stored_limit != limit:
        raise CorruptError(f"dx limit {stored_limit} where {limit} belongs")
    if not 0 < count <= limit or count_offset + 8 * count > len(block):
        raise CorruptError(f"dx count {count} (limit {limit})")
    first = struct.unpack_from("<I", block, count_offset + 4)[0]
    rest = struct.unpack_from(f"<{2 * (count - 1)}I", block, count_offset + 8)
    hashes = rest[0::2]
    if list(hashes) != sorted(hashes):
        raise CorruptError("dx hashes out of order")
    return [(0, first), *zip(hashes, rest[1::2], strict=True)]


def dx_probe_at(entries: list[tuple[int, int]], hash_: int) -> int:
    """Index of the last entry whose hash is <= `hash_` (entry 0 covers from 0)."""
    lo, hi = 1, len(entries) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if entries[mid][0] > hash_:
            hi = mid - 1
        else:
            lo = mid + 1
    return lo - 1


# -- encoding (the image writer) ----------------------------------------------


def encode_entry(inode: int, name: bytes, file_type: int, rec_len: int) -> bytes:
    """One ext4_dir_entry_2 padded to `rec_len` (which the caller sized with dir_rec_len)."""
    if not 0 < len(name) <= EXT4_NAME_LEN:
        raise ValueError("directory entry name length out of range")
    head = _DIRENT.pack(inode, rec_len, len(name), file_type) + name
    return head.ljust(rec_len, b"\0")


def leaf_tail(block_without_tail: bytes, seed: int) -> bytes:
    """The ext4_dir_entry_tail closing a leaf block under metadata_csum."""
    return _TAIL.pack(0, DIR_TAIL_SIZE, 0, EXT4_DIR_FT_DIR_CSUM, crc32c(seed, block_without_tail))


def pack_leaf_blocks(
    entries: list[tuple[int, bytes, int]], block_size: int, tail: bool
) -> list[list[tuple[int, bytes, int, int]]]:
    """Split (inode, name, file_type) entries into leaf blocks, in order.

    Returns, per block, (inode, name, file_type, rec_len) with the last
    entry's rec_len stretched to the end of the usable area, as ext4 does.
    """
    usable = block_size - (DIR_TAIL_SIZE if tail else 0)
    blocks: list[list[tuple[int, bytes, int, int]]] = []
    cur: list[tuple[int, bytes, int, int]] = []
    used = 0
    for ino, name, ft in entries:
        need = dir_rec_len(len(name), False)
        if cur and used + need > usable:
            blocks.append(cur)
            cur, used = [], 0
        cur.append((ino, name, ft, need))
        used += need
    if cur or not blocks:
        blocks.append(cur)
    out = []
    for blk in blocks:
        if blk:
            ino, name, ft, _ = blk[-1]
            blk[-1] = (ino, name, ft, usable - sum(r for *_, r in blk[:-1]))
        out.append(blk)
    return out


def encode_leaf_block(
    entries: list[tuple[int, bytes, int, int]], block_size: int, seed: int | None
) -> bytes:
    """A leaf block from pack_leaf_blocks' output; with a seed, a checksum tail."""
    usable = block_size - (DIR_TAIL_SIZE if seed is not None else 0)
    if entries:
        body = b"".join(encode_entry(i, n, f, r) for i, n, f, r in entries)
    else:
        body = _DIRENT.pack(0, usable, 0, 0).ljust(usable, b"\0")
    if len(body) != usable:
        raise ValueError("directory entries do not fill the block")
    if seed is None:
        return body
    return body + leaf_tail(body, seed)


def encode_dots(ino: int, parent: int, dotdot_rec_len: int) -> bytes:
    """The "." and ".." entries that start a directory's first block."""
    return encode_entry(ino, b".", EXT4_FT_DIR, 12) + encode_entry(
        parent, b"..", EXT4_FT_DIR, dotdot_rec_len
    )


def dx_tail(block: bytes, count_offset: int, seed: int) -> bytes:
    """The dx_tail (dt_reserved, dt_checksum) of an htree root or node."""
    limit, count = _COUNTLIMIT.unpack_from(block, count_offset)
    tail = count_offset + 8 * limit
    crc = crc32c(seed, block[: count_offset + 8 * count])
    crc = crc32c(crc, block[tail : tail + 4])
    crc = crc32c(crc, b"\0\0\0\0")
    return struct.pack("<II", 0, crc)


def encode_dx_entries(limit: int, entries: list[tuple[int, int]]) -> bytes:
    """dx_countlimit then dx_entry (hash, block) pairs; the first hash is implied 0."""
    if not entries or len(entries) > limit:
        raise ValueError("dx entry count out of range")
    out = [_COUNTLIMIT.pack(limit, len(entries)), struct.pack("<I", entries[0][1])]
    out += [struct.pack("<II", h, b) for h, b in entries[1:]]
    return b"".join(out)


def dx_limit(block_size: int, count_offset: int, csum: bool) -> int:
    """dx_countlimit.limit of a root (DX_ROOT_COUNT_OFFSET) or node (DX_NODE_COUNT_OFFSET)."""
    return (block_size - count_offset - (DX_TAIL_SIZE if csum else 0)) // 8


def encode_dx_root(
    ino: int,
    parent: int,
    hash_version: int,
    indirect_levels: int,
    entries: list[tuple[int, int]],
    block_size: int,
    seed: int | None,
) -> bytes:
    """Block 0 of an indexed directory: "." and "..", dx_root_info, the dx entries."""
    buf = bytearray(block_size)
    buf[:DX_ROOT_INFO_OFFSET] = encode_dots(ino, parent, block_size - 12)[:DX_ROOT_INFO_OFFSET]
    DX_ROOT_INFO.pack_into(
        buf, DX_ROOT_INFO_OFFSET, 0, hash_version, DX_ROOT_INFO.size, indirect_levels, 0
    )
    return _with_dx_entries(buf, DX_ROOT_COUNT_OFFSET, entries, seed)


def encode_dx_node(entries: list[tuple[int, int]], block_size: int, seed: int | None) -> bytes:
    """An interior htree block: one empty fake entry over the block, then dx entries."""
    buf = bytearray(block_size)
    raw_len = block_size if block_size < 65536 else 65535
    _DIRENT.pack_into(buf, 0, 0, raw_len, 0, 0)
    return _with_dx_entries(buf, DX_NODE_COUNT_OFFSET, entries, seed)


def _with_dx_entries(
    buf: bytearray, count_offset: int, entries: list[tuple[int, int]], seed: int | None
) -> bytes:
    """A dx block's entries from `count_offset`, and its dx_tail past `limit` of them."""
    limit = dx_limit(len(buf), count_offset, seed is not None)
    body = encode_dx_entries(limit, entries)
    buf[count_offset : count_offset + len(body)] = body
    if seed is not None:
        tail = count_offset + 8 * limit
        buf[tail : tail + DX_TAIL_SIZE] = dx_tail(bytes(buf), count_offset, seed)
    return bytes(buf)
