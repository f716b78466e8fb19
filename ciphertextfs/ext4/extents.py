"""Logical-to-physical block mapping: extent trees and legacy block maps.

Both walkers return the whole mapping of a file as sorted `Mapping` runs so
the data path can issue one large read per physically contiguous run.
Every pointer read from disk is range-checked and every tree block may be
visited once only, so a damaged or hostile tree ends in CorruptError, never
in a loop or an unbounded walk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .crc import crc32c
from .errors import CorruptError

EXT4_EXT_MAGIC = 0xF30A
EXT4_EXT_MAX_DEPTH = 5
EXT_INIT_MAX_LEN = 1 << 15
EXT4_IND_BLOCK = 12
EXT4_DIND_BLOCK = 13
EXT4_TIND_BLOCK = 14
EXT4_NDIR_BLOCKS = 12

# Upper bounds on the work one file may cost (far above any real file:
# 2^22 extents of up to 32768 blocks each).
MAX_TREE_NODES = 1 << 20
MAX_MAPPINGS = 1 << 22

_HDR = struct.Struct("<HHHHI")
_ENTRY = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_INDEX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused


@dataclass(frozen=True, slots=True)
class Mapping:
    """`len` file blocks from logical block `lblk` live at physical block `pblk`."""

    lblk: int
    pblk: int
    len: int
    unwritten: bool


@dataclass(frozen=True, slots=True)
class BlockRange:
    """Where mapped blocks may lie: (s_first_data_block, s_blocks_count)."""

    first_data_block: int
    blocks_count: int

    def valid(self, pblk: int, count: int = 1) -> bool:
        """As the kernel's ext4_inode_block_valid, without the system zone."""
        return pblk > self.first_data_block and pblk + count <= self.blocks_count


ReadBlock = Callable[[int], bytes]
Warn = Callable[[str], None]


def _parse_header(buf: bytes, what: str, max_entries: int) -> tuple[int, int, int]:
    magic, entries, eh_max, depth, _gen = _HDR.unpack_from(buf, 0)
    if magic != EXT4_EXT_MAGIC:
        raise CorruptError(f"{what}: bad extent header magic {magic:#x}")
    if depth > EXT4_EXT_MAX_DEPTH:
        raise CorruptError(f"{what}: extent depth {depth} too large")
    if eh_max > max_entries:
        raise CorruptError(f"{what}: eh_max {eh_max} exceeds {max_entries}")
    if entries > eh_max:
        raise CorruptError(f"{what}: eh_entries {entries} exceeds eh_max {eh_max}")
    return entries, eh_max, depth


def extent_mappings(
    i_block: bytes,
    read_block: ReadBlock,
    *,
    block_size: int,
    limits: BlockRange,
    csum_seed: int | None,
    warn: Warn,
    what: str,
) -> list[Mapping]:
    """Walk an extent tree rooted in i_block into sorted mappings.

    `csum_seed` is the inode's checksum seed when metadata_csum is on; a
    bad extent block checksum is reported through `warn` only.
    """
    root_max = (len(i_block) - _HDR.size) // _ENTRY.size
    entries, _eh_max, depth = _parse_header(i_block, what, root_max)
    block_max = (block_size - _HDR.size) // _ENTRY.size
    out: list[Mapping] = []
    visited: set[int] = set()
    last_end = 0
    # Stack of pending nodes, each (buffer, entry count, depth), visited in
    # key order: children are pushed in reverse.
    stack: list[tuple[bytes, int, int]] = [(i_block, entries, depth)]
    while stack:
        buf, entries, depth = stack.pop()
        if depth == 0:
            for i in range(entries):
                ee_block, ee_len, start_hi, start_lo = _ENTRY.unpack_from(buf, 12 + 12 * i)
                unwritten = ee_len > EXT_INIT_MAX_LEN
                length = ee_len - EXT_INIT_MAX_LEN if unwritten else ee_len
                pblk = start_lo | (start_hi << 32)
                if length == 0:
                    raise CorruptError(f"{what}: zero-length extent at {ee_block}")
                if ee_block < last_end or ee_block + length > 1 << 32:
                    raise CorruptError(f"{what}: extents overlap or out of order at {ee_block}")
                if not limits.valid(pblk, length):
                    raise CorruptError(f"{what}: extent points outside the filesystem")
                last_end = ee_block + length
                out.append(Mapping(ee_block, pblk, length, unwritten))
                if len(out) > MAX_MAPPINGS:
                    raise CorruptError(f"{what}: too many extents")
            continue
        children: list[int] = []
        prev_key = -1
        for i in range(entries):
            ei_block, leaf_lo, leaf_hi, _ = _INDEX.unpack_from(buf, 12 + 12 * i)
            if ei_block <= prev_key:
                raise CorruptError(f"{what}: extent index out of order")
            prev_key = ei_block
            leaf = leaf_lo | (leaf_hi << 32)
            if not limits.valid(leaf):
                raise CorruptError(f"{what}: extent index points outside the filesystem")
            children.append(leaf)
        for leaf in reversed(children):
            if leaf in visited:
                raise CorruptError(f"{what}: extent tree loop at block {leaf}")
            visited.add(leaf)
            if len(visited) > MAX_TREE_NODES:
                raise CorruptError(f"{what}: extent tree too large")
        nodes = []
        for leaf in children:
            node = read_block(leaf)
            c_entries, c_max, c_depth = _parse_header(node, f"{what} block {leaf}", block_max)
            if c_depth != depth - 1:
                raise CorruptError(f"{what}: extent block {leaf} has depth {c_depth}")
            if csum_seed is not None:
                _verify_extent_block(node, c_max, csum_seed, warn, f"{what} block {leaf}")
            nodes.append((node, c_entries, c_depth))
        stack.extend(reversed(nodes))
    return out


def _verify_extent_block(node: bytes, eh_max: int, seed: int, warn: Warn, what: str) -> None:
    tail = _HDR.size + _ENTRY.size * eh_max
    if tail + 4 > len(node):
        warn(f"{what}: no room for the extent block checksum")
        return
    (stored,) = struct.unpack_from("<I", node, tail)
    if crc32c(seed, node[:tail]) != stored:
        warn(f"{what}: extent block checksum mismatch")


def blockmap_mappings(
    i_block: bytes,
    read_block: ReadBlock,
    *,
    block_size: int,
    limits: BlockRange,
    max_lblk: int,
    what: str,
) -> list[Mapping]:
    """Walk an ext2/3 direct/indirect block map into sorted mappings.

    Only logical blocks below `max_lblk` (the file's size in blocks) are
    followed: pointers past the end of a file are never used by the kernel
    either, and garbage there must not cost the file.
    """
    per_block = block_size // 4
    ptrs = struct.unpack_from("<15I", i_block, 0)
    out: list[Mapping] = []
    visited: set[int] = set()
    run = [0, 0, 0]  # lblk, pblk, len of the run being built

    def emit(lblk: int, pblk: int) -> None:
        if not limits.valid(pblk):
            raise CorruptError(f"{what}: block pointer {pblk} outside the filesystem")
        if run[2] and run[0] + run[2] == lblk and run[1] + run[2] == pblk:
            run[2] += 1
            return
        if run[2]:
            out.append(Mapping(run[0], run[1], run[2], False))
            if len(out) > MAX_MAPPINGS:
                raise CorruptError(f"{what}: too many block runs")
        run[0], run[1], run[2] = lblk, pblk, 1

    def walk(pblk: int, level: int, first_lblk: int) -> None:
        """Follow an indirect block of `level` (1 = single) covering first_lblk on."""
        if not limits.valid(pblk):
            raise CorruptError(f"{what}: indirect block {pblk} outside the filesystem")
        if pblk in visited:
            raise CorruptError(f"{what}: indirect block {pblk} used twice")
        visited.add(pblk)
        span = per_block ** (level - 1)
        children = struct.unpack_from(f"<{per_block}I", read_block(pblk), 0)
        for i, child in enumerate(children):
            lblk = first_lblk + i * span
            if lblk >= max_lblk:
                break
            if not child:
                continue
            if level == 1:
                emit(lblk, child)
            else:
                walk(child, level - 1, lblk)

    for i in range(min(EXT4_NDIR_BLOCKS, max_lblk)):
        if ptrs[i]:
            emit(i, ptrs[i])
    first = EXT4_NDIR_BLOCKS
    for level, slot in ((1, EXT4_IND_BLOCK), (2, EXT4_DIND_BLOCK), (3, EXT4_TIND_BLOCK)):
        if first >= max_lblk:
            break
        if ptrs[slot]:
            walk(ptrs[slot], level, first)
        first += per_block**level
    if run[2]:
        out.append(Mapping(run[0], run[1], run[2], False))
    return out


# -- encoding (the image writer) ----------------------------------------------

EXT4_EXT_MAGIC = 0xF30A
EXT_TAIL_SIZE = 4


def extents_per_block(block_size: int) -> int:
    """eh_max of a tree block, as the kernel's ext4_ext_space_block."""
    return (block_size - _HDR.size) // _ENTRY.size


def encode_header(entries: int, eh_max: int, depth: int) -> bytes:
    return _HDR.pack(EXT4_EXT_MAGIC, entries, eh_max, depth, 0)


def encode_leaf(entries: list[Mapping]) -> bytes:
    """Leaf entries (no header); each mapping at most EXT_INIT_MAX_LEN, initialized."""
    out = []
    for m in entries:
        if not 0 < m.len <= EXT_INIT_MAX_LEN or m.unwritten:
            raise ValueError("extent length out of range")
        out.append(_ENTRY.pack(m.lblk, m.len, m.pblk >> 32, m.pblk & 0xFFFFFFFF))
    return b"".join(out)


def encode_index(lblk: int, leaf: int) -> bytes:
    return _INDEX.pack(lblk, leaf & 0xFFFFFFFF, leaf >> 32, 0)


def extent_block_tail(node: bytes, seed: int) -> bytes:
    """The ext4_extent_tail of a tree block: crc32c over header and eh_max entries."""
    (_magic, _entries, eh_max, _depth, _gen) = _HDR.unpack_from(node, 0)
    return struct.pack("<I", crc32c(seed, node[: _HDR.size + eh_max * _ENTRY.size]))
