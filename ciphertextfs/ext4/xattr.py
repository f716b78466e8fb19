"""Extended attributes: in the inode body, in the EA block, in EA inodes.

The name index is kept raw (the view decides what `user.`, `system.` or
index 9 "c", the fscrypt context, become).  Values stored in EA inodes are
returned as references so the caller, which can read inodes, fetches them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .crc import crc32c
from .errors import CorruptError

EXT4_XATTR_MAGIC = 0xEA020000
EXT4_XATTR_INDEX_USER = 1
EXT4_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EXT4_XATTR_INDEX_TRUSTED = 4
EXT4_XATTR_INDEX_SECURITY = 6
EXT4_XATTR_INDEX_SYSTEM = 7
EXT4_XATTR_INDEX_RICHACL = 8
EXT4_XATTR_INDEX_ENCRYPTION = 9
EXT4_XATTR_NAME_ENCRYPTION_CONTEXT = b"c"  # the fscrypt context lives at (9, "c")
EXT4_XATTR_SIZE_MAX = 1 << 24
XATTR_HEADER_SIZE = 32
ENTRY_HEADER = 16

_ENTRY = struct.Struct("<BBHIII")  # name_len, name_index, value_offs, value_inum, size, hash


@dataclass(frozen=True, slots=True)
class Xattr:
    """One extended attribute with its raw name index and name suffix."""

    name_index: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RawEntry:
    """An entry as parsed; `value_inum` != 0 means the value lives in an EA inode."""

    name_index: int
    name: bytes
    value: bytes
    value_inum: int
    value_size: int


def parse_entries(
    region: bytes, entries_start: int, value_base: int, what: str, ea_inode: bool
) -> list[RawEntry]:
    """Parse the entry list starting at `entries_start` in `region`.

    Values are found at `value_base + e_value_offs` (the first entry for the
    inode body, the block start for an EA block); each must lie within the
    region and after the entry table, as the kernel checks.
    """
    end = len(region)
    off = entries_start
    found: list[tuple[int, bytes, int, int, int]] = []
    while True:
        if off + 4 > end:
            raise CorruptError(f"{what}: xattr list not terminated")
        if region[off : off + 4] == b"\0\0\0\0":
            break
        if off + ENTRY_HEADER > end:
            raise CorruptError(f"{what}: xattr entry runs past its area")
        name_len, index, value_offs, value_inum, size, _h = _ENTRY.unpack_from(region, off)
        next_off = off + ((ENTRY_HEADER + name_len + 3) & ~3)
        if next_off > end:
            raise CorruptError(f"{what}: xattr name runs past its area")
        name = bytes(region[off + ENTRY_HEADER : off + ENTRY_HEADER + name_len])
        found.append((index, name, value_offs, value_inum, size))
        off = next_off
    table_end = off + 4
    out: list[RawEntry] = []
    for index, name, value_offs, value_inum, size in found:
        if size > EXT4_XATTR_SIZE_MAX:
            raise CorruptError(f"{what}: xattr value size {size} too large")
        if value_inum:
            if not ea_inode:
                raise CorruptError(f"{what}: xattr in an EA inode without the ea_inode feature")
            out.append(RawEntry(index, name, b"", value_inum, size))
            continue
        start = value_base + value_offs
        if size and (start < table_end or start + size > end):
            raise CorruptError(f"{what}: xattr value outside its area")
        out.append(RawEntry(index, name, bytes(region[start : start + size]), 0, size))
    return out


def ibody_entries(raw_inode: bytes, extra_isize: int, what: str, ea_inode: bool) -> list[RawEntry]:
    """Xattrs stored in the inode body after i_extra_isize."""
    start = 128 + extra_isize
    if len(raw_inode) <= 128 or start + 4 > len(raw_inode):
        return []
    (magic,) = struct.unpack_from("<I", raw_inode, start)
    if magic != EXT4_XATTR_MAGIC:
        return []
    first = start + 4
    return parse_entries(raw_inode, first, first, what, ea_inode)


def block_entries(block: bytes, what: str, ea_inode: bool) -> list[RawEntry]:
    """Xattrs of an EA block (i_file_acl)."""
    if len(block) < XATTR_HEADER_SIZE + 4:
        raise CorruptError(f"{what}: xattr block too small")
    magic, _refcount, h_blocks = struct.unpack_from("<III", block, 0)
    if magic != EXT4_XATTR_MAGIC:
        raise CorruptError(f"{what}: bad xattr block magic {magic:#x}")
    if h_blocks != 1:
        raise CorruptError(f"{what}: xattr block h_blocks {h_blocks}")
    return parse_entries(block, XATTR_HEADER_SIZE, 0, what, ea_inode)


def block_checksum_ok(block: bytes, blocknr: int, seed: int) -> bool:
    """metadata_csum of an EA block: seeded with its block number, h_checksum zeroed."""
    (stored,) = struct.unpack_from("<I", block, 16)
    crc = crc32c(seed, struct.pack("<Q", blocknr))
    crc = crc32c(crc, block[:16])
    crc = crc32c(crc, b"\0\0\0\0")
    crc = crc32c(crc, block[20:])
    return crc == stored


def find_system_data(entries: list[RawEntry]) -> bytes | None:
    """The value of "system.data", the inline-data continuation, if present."""
    for e in entries:
        if e.name_index == EXT4_XATTR_INDEX_SYSTEM and e.name == b"data" and not e.value_inum:
            return e.value
    return None
