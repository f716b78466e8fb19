"""Extended attributes: in the inode body, in the EA block, in EA inodes.

The name index is kept raw (the view decides what `user.`, `system.` or
index 9 "c", the fscrypt context, become).  Values stored in EA inodes are
returned as references so the caller, which can read inodes, fetches them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ciphertextfs.posix_acl import XATTR_NAME_POSIX_ACL_ACCESS, XATTR_NAME_POSIX_ACL_DEFAULT

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
EXT4_XATTR_NAME_MAX = 255  # e_name_len is one byte
EXT4_XATTR_SIZE_MAX = 1 << 24

EXT4_XATTR_PREFIXES = {
    EXT4_XATTR_INDEX_USER: b"user.",
    EXT4_XATTR_INDEX_TRUSTED: b"trusted.",
    EXT4_XATTR_INDEX_SECURITY: b"security.",
}
"""The indexes whose entries are named attributes, as the kernel's handler map
names them: prefix + e_name.  Index 7 holds system.data (inline data) and 9
the fscrypt context: neither is an attribute anyone sees."""

EXT4_XATTR_ACL_NAMES = {
    EXT4_XATTR_INDEX_POSIX_ACL_ACCESS: XATTR_NAME_POSIX_ACL_ACCESS,
    EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT: XATTR_NAME_POSIX_ACL_DEFAULT,
}
"""The POSIX ACL indexes: one entry each, with an empty e_name and the value
in ext4's own ACL format."""
XATTR_HEADER_SIZE = 32
ENTRY_HEADER = 16

_ENTRY = struct.Struct("<BBHIII")  # name_len, name_index, value_offs, value_inum, size, hash


class Xattr(NamedTuple):
    """One extended attribute with its raw name index and name suffix."""

    name_index: int
    name: bytes
    value: bytes


class RawEntry(NamedTuple):
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


def encryption_context_xattr(context: bytes) -> Xattr:
    """The entry that holds an inode's raw fscrypt context."""
    return Xattr(EXT4_XATTR_INDEX_ENCRYPTION, EXT4_XATTR_NAME_ENCRYPTION_CONTEXT, context)


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


# -- encoding (the image writer) ----------------------------------------------

NAME_HASH_SHIFT = 5
VALUE_HASH_SHIFT = 16
BLOCK_HASH_SHIFT = 16


def entry_hash(name: bytes, value: bytes) -> int:
    """ext4_xattr_hash_entry (unsigned char names, as kernels since 6.2 and e2fsck accept)."""
    h = 0
    for c in name:
        h = ((h << NAME_HASH_SHIFT) & 0xFFFFFFFF) ^ (h >> (32 - NAME_HASH_SHIFT)) ^ c
    padded = value + b"\0" * (-len(value) % 4)
    for (w,) in struct.iter_unpack("<I", padded):
        h = ((h << VALUE_HASH_SHIFT) & 0xFFFFFFFF) ^ (h >> (32 - VALUE_HASH_SHIFT)) ^ w
    return h


def ea_inode_entry_hash(name: bytes, value_hash: int) -> int:
    """e_hash of an entry whose value lives in an EA inode: the value's crc32c
    (kept in the EA inode's i_atime) takes the place of the value."""
    return entry_hash(name, struct.pack("<I", value_hash))


def ea_inode_value_hash(csum_seed: int, value: bytes) -> int:
    """What an EA inode records of its value (ext4_xattr_inode_hash)."""
    return crc32c(csum_seed, value)


def min_large_ea_size(block_size: int) -> int:
    """Above this padded size the kernel puts a value in an EA inode
    (EXT4_XATTR_MIN_LARGE_EA_SIZE): it could not share a block with anything."""
    return block_size - 3 - ENTRY_HEADER - 4


EaRefs = dict[tuple[int, bytes], tuple[int, int]]
"""(name index, name) -> (EA inode number, value hash) of values kept in EA inodes."""


def _entry_size(name: bytes) -> int:
    return (ENTRY_HEADER + len(name) + 3) & ~3


def _value_size(value: bytes) -> int:
    return (len(value) + 3) & ~3


def area_size(xattrs: list[Xattr], ea_refs: EaRefs | None = None) -> int:
    """Bytes the entries and values take (without magic/header and the end marker)."""
    refs = ea_refs or {}
    return sum(
        _entry_size(x.name) + (0 if (x.name_index, x.name) in refs else _value_size(x.value))
        for x in xattrs
    )


def sort_key(x: Xattr) -> tuple[int, int, bytes]:
    """The order the kernel's lookup in an EA block relies on."""
    return (x.name_index, len(x.name), x.name)


def _encode_area(
    xattrs: list[Xattr],
    size: int,
    first: int,
    value_base: int,
    hashed: bool,
    ea_refs: EaRefs | None = None,
) -> bytearray:
    """Entries from `first`, values packed down from the end of a `size`-byte area.

    An entry in `ea_refs` names its EA inode and carries no value here; its
    hash is set in the inode body too, as the kernel sets it."""
    refs = ea_refs or {}
    buf = bytearray(size)
    off = first
    vend = size
    for x in xattrs:
        ref = refs.get((x.name_index, x.name))
        if ref is not None:
            inum, value_hash = ref
            h = ea_inode_entry_hash(x.name, value_hash)
            _ENTRY.pack_into(buf, off, len(x.name), x.name_index, 0, inum, len(x.value), h)
        else:
            vsize = _value_size(x.value)
            vend -= vsize
            h = entry_hash(x.name, x.value) if hashed else 0
            voff = vend - value_base if x.value else 0
            _ENTRY.pack_into(buf, off, len(x.name), x.name_index, voff, 0, len(x.value), h)
            buf[vend : vend + len(x.value)] = x.value
        buf[off + ENTRY_HEADER : off + ENTRY_HEADER + len(x.name)] = x.name
        off += _entry_size(x.name)
    if off + 4 > vend:
        raise ValueError("xattrs do not fit")
    return buf


def encode_ibody(xattrs: list[Xattr], space: int, ea_refs: EaRefs | None = None) -> bytes:
    """The in-inode xattr area (magic, entries, values) of `space` bytes."""
    if not xattrs:
        return b""
    if 4 + area_size(xattrs, ea_refs) + 4 > space:
        raise ValueError("xattrs do not fit in the inode")
    area = _encode_area(xattrs, space - 4, 0, 0, False, ea_refs)
    return struct.pack("<I", EXT4_XATTR_MAGIC) + bytes(area)


def encode_block(
    xattrs: list[Xattr],
    block_size: int,
    blocknr: int,
    seed: int | None,
    ea_refs: EaRefs | None = None,
) -> bytes:
    """An EA block (refcount 1) holding `xattrs` sorted, with hashes and checksum."""
    xs = sorted(xattrs, key=sort_key)
    if XATTR_HEADER_SIZE + area_size(xs, ea_refs) + 4 > block_size:
        raise ValueError("xattrs do not fit in one block")
    buf = _encode_area(xs, block_size, XATTR_HEADER_SIZE, 0, True, ea_refs)
    bh = 0
    off = XATTR_HEADER_SIZE
    for x in xs:
        eh = struct.unpack_from("<I", buf, off + 12)[0]
        bh = ((bh << BLOCK_HASH_SHIFT) & 0xFFFFFFFF) ^ (bh >> (32 - BLOCK_HASH_SHIFT)) ^ eh
        off += _entry_size(x.name)
    struct.pack_into("<IIII", buf, 0, EXT4_XATTR_MAGIC, 1, 1, bh)
    if seed is not None:
        crc = crc32c(seed, struct.pack("<Q", blocknr))
        crc = crc32c(crc, bytes(buf[:16]))
        crc = crc32c(crc, b"\0\0\0\0")
        crc = crc32c(crc, bytes(buf[20:]))
        struct.pack_into("<I", buf, 16, crc)
    return bytes(buf)
