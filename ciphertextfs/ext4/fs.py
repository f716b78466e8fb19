"""`Filesystem`: the public API of the ext4 layer.

Everything above this module sees inodes, directory entries, xattrs,
symlink bodies, mappings and file bytes; how they are found on disk, the
journal overlay, caching and checksum checks stay here.  Checksum
mismatches never stop a read: they are recorded in `warnings`, because a
backup of a slightly damaged filesystem is worth more than none.
"""

from __future__ import annotations

import bisect
import os

from ciphertextfs.lru import LRU

from . import dirent as _dirent
from . import xattr as _xattr
from .blockdev import BlockSource
from .dirent import DirEntry
from .errors import CorruptError, Ext4Error, NotExt4Error
from .extents import BlockRange, Mapping, blockmap_mappings, extent_mappings
from .inode import (
    EXT4_CASEFOLD_FL,
    EXT4_EA_INODE_FL,
    EXT4_ENCRYPT_FL,
    EXT4_INDEX_FL,
    I_BLOCK_SIZE,
    Inode,
    inode_checksum_ok,
    inode_csum_seed,
    parse_inode,
)
from .superblock import (
    COMPAT_DIR_INDEX,
    COMPAT_HAS_JOURNAL,
    INCOMPAT_EA_INODE,
    INCOMPAT_FILETYPE,
    INCOMPAT_KNOWN,
    INCOMPAT_RECOVER,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    GroupDesc,
    Superblock,
    descriptor_block,
    group_desc_checksum,
    parse_group_desc,
    parse_superblock,
)
from .xattr import Xattr

__all__ = ["DirEntry", "Filesystem", "Inode", "Mapping", "Xattr"]

MAX_WARNINGS = 1000
META_CACHE_BLOCKS = 2048
META_CACHE_BYTES = 16 << 20
INODE_CACHE = 8192
GDESC_CACHE = 16384
MAPPING_CACHE = 256
MAX_XATTR_VALUES = 16 << 20
MAX_JOURNAL_BLOCKS = 1 << 24


class Filesystem:
    """A read-only ext4 filesystem on a block device or image file."""

    def __init__(self, source: BlockSource, sb: Superblock) -> None:
        self.source = source
        self.sb = sb
        self.block_size = sb.block_size
        self.uuid = sb.s_uuid
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._overlay: dict[int, bytes] = {}
        self._overlay_keys: list[int] = []
        self._blocks = LRU(META_CACHE_BLOCKS, META_CACHE_BYTES)
        self._inodes = LRU(INODE_CACHE)
        self._gdescs = LRU(GDESC_CACHE)
        self._maps = LRU(MAPPING_CACHE)
        self._set_geometry(sb)

    def _set_geometry(self, sb: Superblock) -> None:
        self.sb = sb
        self.uuid = sb.s_uuid
        self._blocks_count = sb.blocks_count
        self._limits = BlockRange(sb.s_first_data_block, sb.blocks_count)
        self._csum_seed = sb.csum_seed if sb.metadata_csum else None

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        replay_journal: bool = True,
        *,
        direct_io: bool = True,
    ) -> Filesystem:
        """Open a source read-only.

        Metadata is always read through the page cache; `direct_io` chooses
        O_DIRECT (default) or buffered reads for file data.  Raises
        NotExt4Error when the source holds no usable ext4 filesystem and
        OSError when it cannot be opened.
        """
        source = BlockSource(path, direct_io=direct_io)
        try:
            try:
                raw = source.read_meta(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "superblock")
            except CorruptError as e:
                raise NotExt4Error(str(e)) from e
            sb = parse_superblock(raw)
            fs = cls(source, sb)
            fs._check_superblock()
            if replay_journal:
                fs._replay_journal()
            return fs
        except BaseException:
            source.close()
            raise

    def _check_superblock(self) -> None:
        sb = self.sb
        if sb.metadata_csum and not sb.checksum_ok():
            self._warn("superblock checksum mismatch")
        unknown = sb.s_feature_incompat & ~INCOMPAT_KNOWN
        if unknown:
            self._warn(f"unknown incompatible features {unknown:#x}")

    def _replay_journal(self) -> None:
        sb = self.sb
        if not (sb.has_compat(COMPAT_HAS_JOURNAL) and sb.has_incompat(INCOMPAT_RECOVER)):
            return
        if sb.s_journal_inum == 0:
            self._warn("journal needs recovery but is external: not replayed")
            return
        try:
            from .journal import replay
        except ImportError:
            self._warn("journal needs recovery but journal replay is unavailable")
            return
        try:
            jinode = self.inode(sb.s_journal_inum)
            blocks = self._journal_blocks(jinode)
            overlay, warnings = replay(self._read_block_raw, blocks, self.block_size)
        except Ext4Error as e:
            self._warn(f"journal not replayed: {e}")
            return
        for w in warnings:
            self._warn(f"journal: {w}")
        self._overlay = {
            blk: bytes(data)
            for blk, data in overlay.items()
            if 0 <= blk < self._blocks_count and len(data) == self.block_size
        }
        self._overlay_keys = sorted(self._overlay)
        self._blocks.clear()
        self._inodes.clear()
        self._gdescs.clear()
        self._maps.clear()
        self._reload_superblock()

    def _reload_superblock(self) -> None:
        """Re-read the superblock when the journal rewrote its block."""
        blk, off = divmod(SUPERBLOCK_OFFSET, self.block_size)
        if blk not in self._overlay:
            return
        raw = self._overlay[blk][off : off + SUPERBLOCK_SIZE]
        try:
            sb = parse_superblock(raw)
        except NotExt4Error as e:
            self._warn(f"journal holds a bad superblock, kept the old one: {e}")
            return
        if sb.block_size != self.block_size:
            self._warn("journal holds a superblock with another block size, kept the old one")
            return
        self._set_geometry(sb)

    def _journal_blocks(self, jinode: Inode) -> list[int]:
        """Physical block of each journal block, which must have no holes."""
        nblocks = -(-jinode.i_size // self.block_size)
        if nblocks > MAX_JOURNAL_BLOCKS:
            raise CorruptError("journal inode too large")
        out: list[int] = []
        for m in self.mappings(jinode):
            if m.lblk != len(out):
                raise CorruptError("journal inode has a hole")
            if m.lblk >= nblocks:
                break
            out.extend(range(m.pblk, m.pblk + min(m.len, nblocks - m.lblk)))
        if len(out) < nblocks:
            raise CorruptError("journal inode shorter than its size")
        return out

    def drop_caches(self) -> None:
        """Forget cached metadata, for a source that a mounted ext4 keeps changing."""
        for cache in (self._blocks, self._inodes, self._gdescs, self._maps):
            cache.clear()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --------------------------------------------------------

    def _warn(self, msg: str) -> None:
        if msg in self._warned:
            return
        if len(self.warnings) >= MAX_WARNINGS:
            if len(self.warnings) == MAX_WARNINGS:
                self.warnings.append("further warnings suppressed")
            return
        self._warned.add(msg)
        self.warnings.append(msg)

    def _read_block_raw(self, pblk: int) -> bytes:
        """A block as on disk, ignoring the journal overlay (for the replay)."""
        if not 0 <= pblk < self._blocks_count:
            raise CorruptError(f"block {pblk} outside the filesystem")
        bs = self.block_size
        return self.source.read_meta(pblk * bs, bs, f"block {pblk}")

    def _read_block(self, pblk: int, cache: bool = True) -> bytes:
        """A metadata block, journal overlay first."""
        if not 0 <= pblk < self._blocks_count:
            raise CorruptError(f"block {pblk} outside the filesystem")
        data = self._overlay.get(pblk)
        if data is not None:
            return data
        data = self._blocks.get(pblk)
        if data is not None:
            return data
        bs = self.block_size
        data = self.source.read_meta(pblk * bs, bs, f"block {pblk}")
        if cache:
            self._blocks.put(pblk, data, len(data))
        return data

    def group_desc(self, group: int) -> GroupDesc:
        """Descriptor of one block group (checksum mismatches are warnings)."""
        sb = self.sb
        if not 0 <= group < sb.group_count:
            raise CorruptError(f"group {group} does not exist")
        gd = self._gdescs.get(group)
        if gd is not None:
            return gd
        blk, off = descriptor_block(sb, group)
        block = self._read_block(blk)
        raw = block[off : off + sb.desc_size]
        gd = parse_group_desc(raw, group, sb.desc_size)
        if self._csum_seed is not None:
            if group_desc_checksum(raw, group, self._csum_seed) != gd.bg_checksum:
                self._warn(f"group {group}: descriptor checksum mismatch")
        self._gdescs.put(group, gd)
        return gd

    # -- inodes -----------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """Read inode `ino` (CorruptError when it cannot be located or parsed)."""
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        sb = self.sb
        if not 1 <= ino <= sb.s_inodes_count:
            raise CorruptError(f"inode {ino} out of range")
        group, index = divmod(ino - 1, sb.s_inodes_per_group)
        gd = self.group_desc(group)
        isz = sb.inode_size
        table_blocks = -(-(sb.s_inodes_per_group * isz) // self.block_size)
        if not self._limits.valid(gd.bg_inode_table, table_blocks):
            raise CorruptError(f"inode {ino}: group {group} inode table outside the filesystem")
        blk, off = divmod(index * isz, self.block_size)
        block = self._read_block(gd.bg_inode_table + blk)
        inode = parse_inode(sb, ino, block[off : off + isz])
        if self._csum_seed is not None and not inode_checksum_ok(inode, self._csum_seed):
            self._warn(f"inode {ino}: checksum mismatch")
        self._inodes.put(ino, inode)
        return inode

    def _inode_seed(self, inode: Inode) -> int | None:
        if self._csum_seed is None:
            return None
        return inode_csum_seed(self._csum_seed, inode.ino, inode.i_generation)

    def _is_fast_symlink(self, inode: Inode) -> bool:
        """As the kernel's ext4_inode_is_fast_symlink()."""
        if not inode.is_symlink:
            return False
        if inode.i_flags & EXT4_EA_INODE_FL:
            return 0 < inode.i_size < I_BLOCK_SIZE
        if inode.has_inline_data:
            return False
        ea_blocks = self.sb.cluster_size >> 9 if inode.i_file_acl else 0
        return inode.i_blocks - ea_blocks == 0

    # -- block mapping and data -------------------------------------------

    def mappings(self, inode: Inode) -> list[Mapping]:
        """Every mapped extent of the file, sorted by logical block."""
        return list(self._mappings(inode)[0])

    def _mappings(self, inode: Inode) -> tuple[list[Mapping], list[int]]:
        key = (inode.ino, inode.i_generation, inode.i_flags, inode.i_size, inode.i_block)
        cached = self._maps.get(key)
        if cached is not None:
            return cached
        maps: list[Mapping]
        what = f"inode {inode.ino}"
        if (
            inode.has_inline_data
            or self._is_fast_symlink(inode)
            or not (inode.is_reg or inode.is_dir or inode.is_symlink)
        ):
            maps = []
        elif inode.has_extents:
            maps = extent_mappings(
                inode.i_block,
                self._read_block,
                block_size=self.block_size,
                limits=self._limits,
                csum_seed=self._inode_seed(inode),
                warn=self._warn,
                what=what,
            )
        else:
            maps = blockmap_mappings(
                inode.i_block,
                self._read_block,
                block_size=self.block_size,
                limits=self._limits,
                max_lblk=-(-inode.i_size // self.block_size),
                what=what,
            )
        result = (maps, [m.lblk for m in maps])
        self._maps.put(key, result)
        return result

    def _inline_data(self, inode: Inode) -> bytes:
        """i_block followed by the "system.data" xattr of an inline-data inode."""
        entries = _xattr.ibody_entries(
            inode.raw, inode.i_extra_isize, f"inode {inode.ino}", self._ea_inode_feature
        )
        extra = _xattr.find_system_data(entries)
        if extra is None:
            return inode.i_block
        return inode.i_block + extra

    @property
    def _ea_inode_feature(self) -> bool:
        return self.sb.has_incompat(INCOMPAT_EA_INODE)

    def read(self, inode: Inode, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of the file from `offset`, without clipping at i_size.

        Holes, unwritten extents and anything past the last mapped block
        read as zeros; contiguous physical runs are read in one request.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if length == 0:
            return b""
        if inode.has_inline_data or self._is_fast_symlink(inode):
            data = self._inline_data(inode) if inode.has_inline_data else inode.i_block
            if self._is_fast_symlink(inode):
                data = data[: inode.i_size]
            chunk = data[offset : offset + length]
            return chunk + bytes(length - len(chunk))
        bs = self.block_size
        end = offset + length
        first = offset // bs
        last = -(-end // bs)
        runs = self._runs(inode, first, last)
        pieces = []
        for lblk, pblk, count in runs:
            fstart = max(lblk * bs, offset)
            fend = min((lblk + count) * bs, end)
            pieces.append((fstart - offset, pblk * bs + (fstart - lblk * bs), fend - fstart))
        what = f"inode {inode.ino} data"
        if not self._overlay_keys:
            return self.source.read_scattered(length, pieces, what)
        out = bytearray(length)
        for (pos, pstart, n), (lblk, pblk, count) in zip(pieces, runs, strict=True):
            out[pos : pos + n] = self.source.read_data(pstart, n, what)
            self._patch_overlay(out, offset, lblk, pblk, count, pos + offset, pos + offset + n)
        return bytes(out)

    def _runs(self, inode: Inode, first: int, last: int) -> list[list[int]]:
        """[logical block, physical block, count] of the written blocks in [first, last).

        Adjacent extents that are also physically adjacent merge into one
        run, so that each run is one device request.
        """
        maps, starts = self._mappings(inode)
        i = max(bisect.bisect_right(starts, first) - 1, 0)
        runs: list[list[int]] = []
        while i < len(maps) and maps[i].lblk < last:
            m = maps[i]
            i += 1
            lo = max(m.lblk, first)
            hi = min(m.lblk + m.len, last)
            if hi <= lo or m.unwritten:
                continue
            pblk = m.pblk + (lo - m.lblk)
            if runs and runs[-1][0] + runs[-1][2] == lo and runs[-1][1] + runs[-1][2] == pblk:
                runs[-1][2] += hi - lo
            else:
                runs.append([lo, pblk, hi - lo])
        return runs

    def read_files(
        self, wanted: list[tuple[Inode, int]], *, max_gap: int, max_span: int
    ) -> dict[int, bytes]:
        """The first `length` bytes of each (inode, length), in few device requests.

        The small files of one directory usually lie close together on
        disk: sorted by physical position and merged across gaps of at most
        `max_gap` bytes into spans of at most `max_span`, a thousand of them
        cost a few sequential reads instead of a thousand random ones.  What
        cannot be batched (inline data, journal-patched blocks) or cannot
        be read is left out of the result; the caller reads it on its own,
        so each damaged inode still reports its own error.
        """
        if self._overlay_keys:
            return {}
        bs = self.block_size
        limit = self.source.size
        pieces: list[tuple[int, int, int, int]] = []  # device offset, bytes, ino, file offset
        lengths: dict[int, int] = {}
        single: dict[int, bool] = {}
        for inode, length in wanted:
            if length <= 0 or inode.ino in lengths:
                continue
            if inode.has_inline_data or self._is_fast_symlink(inode):
                continue
            try:
                runs = self._runs(inode, 0, -(-length // bs))
            except Ext4Error:
                continue
            own = []
            for lblk, pblk, count in runs:
                start = lblk * bs
                nbytes = min(count * bs, length - start)
                if pblk * bs + nbytes > limit:
                    break
                own.append((pblk * bs, nbytes, inode.ino, start))
            else:
                pieces.extend(own)
                lengths[inode.ino] = length
                single[inode.ino] = len(own) == 1
        pieces.sort()
        spans: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
        for piece in pieces:
            start, nbytes = piece[0], piece[1]
            if spans:
                s_start, s_end, members = spans[-1]
                end = max(s_end, start + nbytes)
                if start - s_end <= max_gap and end - s_start <= max_span:
                    spans[-1] = (s_start, end, members)
                    members.append(piece)
                    continue
            spans.append((start, start + nbytes, [piece]))
        whole: dict[int, bytes] = {}
        parts: dict[int, bytearray] = {}
        failed: set[int] = set()
        got = self.source.read_data_many([(a, b - a) for a, b, _ in spans], "file data")
        for (s_start, s_end, members), data in zip(spans, got, strict=True):
            if data is None:
                self._warn(f"batched read of bytes {s_start}..{s_end} failed")
                failed.update(p[2] for p in members)
                continue
            for start, nbytes, ino, foff in members:
                a = start - s_start
                if single[ino] and nbytes == lengths[ino]:
                    whole[ino] = data[a : a + nbytes]
                    continue
                buf = parts.get(ino)
                if buf is None:
                    buf = parts[ino] = bytearray(lengths[ino])
                buf[foff : foff + nbytes] = memoryview(data)[a : a + nbytes]
        whole.update((ino, bytes(buf)) for ino, buf in parts.items())
        return {ino: data for ino, data in whole.items() if ino not in failed}

    def _patch_overlay(
        self, out: bytearray, offset: int, lblk: int, pblk: int, count: int, fs: int, fe: int
    ) -> None:
        """Apply journal-replayed blocks that fall inside one physical run."""
        bs = self.block_size
        keys = self._overlay_keys
        j = bisect.bisect_left(keys, pblk)
        while j < len(keys) and keys[j] < pblk + count:
            blk = keys[j]
            j += 1
            bstart = (lblk + blk - pblk) * bs
            lo, hi = max(bstart, fs), min(bstart + bs, fe)
            if hi > lo:
                block = self._overlay[blk]
                out[lo - offset : hi - offset] = block[lo - bstart : hi - bstart]

    # -- directories ------------------------------------------------------

    def is_dx_dir(self, inode: Inode) -> bool:
        """As the kernel's is_dx_dir(): whether readdir uses hash order."""
        if not self.sb.has_compat(COMPAT_DIR_INDEX):
            return False
        return bool(
            inode.i_flags & EXT4_INDEX_FL
            or (inode.i_size // self.block_size) == 1
            or inode.has_inline_data
        )

    def dx_root_hash_version(self, inode: Inode) -> int | None:
        """The dx_root's hash version of an indexed directory, else None."""
        if not inode.i_flags & EXT4_INDEX_FL or inode.has_inline_data:
            return None
        maps, _ = self._mappings(inode)
        if not maps or maps[0].lblk != 0 or maps[0].unwritten:
            raise CorruptError(f"directory {inode.ino}: indexed, but block 0 is not mapped")
        return _dirent.dx_root_hash_version(self._read_block(maps[0].pblk, cache=False))

    def read_dir(self, inode: Inode) -> list[DirEntry]:
        """All sound entries of a directory except "." and "..", in on-disk order."""
        return self.read_dir_checked(inode)[0]

    def read_dir_checked(self, inode: Inode) -> tuple[list[DirEntry], list[str]]:
        """The sound entries of a directory, and what could not be read of it.

        Each damaged block (a bad entry, a checksum that does not match, a
        hole, an unreadable block) adds one message naming the directory's
        inode and the block; its entries before a bad one are kept.  A
        caller must not present a directory with damage as complete: the
        kernel's ext4 fails such a listing with EBADMSG or EUCLEAN.
        """
        if not inode.is_dir:
            raise CorruptError(f"inode {inode.ino} is not a directory")
        what = f"directory inode {inode.ino}"
        hashed = (inode.i_flags & (EXT4_ENCRYPT_FL | EXT4_CASEFOLD_FL)) == (
            EXT4_ENCRYPT_FL | EXT4_CASEFOLD_FL
        )
        damage: list[str] = []

        def bad(msg: str) -> None:
            damage.append(msg)
            self._warn(msg)

        common = {
            "inodes_count": self.sb.s_inodes_count,
            "filetype": self.sb.has_incompat(INCOMPAT_FILETYPE),
            "hashed": hashed,
            "warn": bad,
        }
        if inode.has_inline_data:
            data = self._inline_data(inode)
            out = _dirent.parse_entries(
                data[4:I_BLOCK_SIZE], block_size=I_BLOCK_SIZE, what=what, **common
            )
            if len(data) > I_BLOCK_SIZE:
                rest = data[I_BLOCK_SIZE:]
                out += _dirent.parse_entries(rest, block_size=len(rest), what=what, **common)
            return out, damage
        bs = self.block_size
        nblocks = -(-inode.i_size // bs)
        indexed = bool(inode.i_flags & EXT4_INDEX_FL)
        seed = self._inode_seed(inode)
        out = []
        maps, _ = self._mappings(inode)
        expect = 0
        for m in maps:
            if m.lblk >= nblocks:
                break
            if m.lblk > expect:
                bad(f"{what}: hole at block {expect}")
            expect = max(expect, m.lblk + m.len)
            if m.unwritten:
                continue
            for k in range(min(m.len, nblocks - m.lblk)):
                lblk = m.lblk + k
                bwhat = f"{what} block {lblk}"
                try:
                    block = self._read_block(m.pblk + k, cache=False)
                except (CorruptError, OSError) as e:
                    bad(f"{bwhat}: cannot be read: {e}")
                    continue
                if indexed and lblk == 0:
                    if seed is not None:
                        self._check_dx(block, _dirent.dx_root_count_offset(block), seed, bwhat)
                elif indexed and _dirent.is_dx_node_block(block, bs):
                    if seed is not None:
                        self._check_dx(block, _dirent.DX_NODE_COUNT_OFFSET, seed, bwhat)
                    continue
                elif seed is not None:
                    ok = _dirent.leaf_checksum_ok(block, seed)
                    if ok is None:
                        bad(f"{bwhat}: no directory checksum tail")
                    elif not ok:
                        bad(f"{bwhat}: directory block checksum mismatch")
                out += _dirent.parse_entries(block, block_size=bs, what=bwhat, **common)
        if expect < nblocks:
            bad(f"{what}: hole at block {expect}")
        return out, damage

    def _check_dx(self, block: bytes, count_offset: int, seed: int, what: str) -> None:
        ok = _dirent.dx_checksum_ok(block, count_offset, seed)
        if ok is None:
            self._warn(f"{what}: no htree checksum tail")
        elif not ok:
            self._warn(f"{what}: htree block checksum mismatch")

    # -- xattrs -----------------------------------------------------------

    def xattrs(self, inode: Inode) -> list[Xattr]:
        """In-inode xattrs, then those of the EA block, EA inode values resolved."""
        what = f"inode {inode.ino}"
        ea_inode = self._ea_inode_feature
        entries = _xattr.ibody_entries(inode.raw, inode.i_extra_isize, what, ea_inode)
        if inode.i_file_acl:
            blk = inode.i_file_acl
            if not self._limits.valid(blk):
                raise CorruptError(f"{what}: xattr block {blk} outside the filesystem")
            block = self._read_block(blk)
            if self._csum_seed is not None and not _xattr.block_checksum_ok(
                block, blk, self._csum_seed
            ):
                self._warn(f"{what}: xattr block {blk} checksum mismatch")
            entries += _xattr.block_entries(block, f"{what} xattr block {blk}", ea_inode)
        out: list[Xattr] = []
        total = 0
        for e in entries:
            total += e.value_size
            if total > MAX_XATTR_VALUES:
                raise CorruptError(f"{what}: xattr values too large")
            value = e.value if not e.value_inum else self._ea_inode_value(inode, e)
            out.append(Xattr(e.name_index, e.name, value))
        return out

    def _ea_inode_value(self, owner: Inode, e: _xattr.RawEntry) -> bytes:
        what = f"inode {owner.ino}: xattr value inode {e.value_inum}"
        if e.value_inum == owner.ino:
            raise CorruptError(f"{what} is the inode itself")
        ea = self.inode(e.value_inum)
        if not ea.i_flags & EXT4_EA_INODE_FL or not ea.is_reg:
            raise CorruptError(f"{what} is not an EA inode")
        if ea.i_size != e.value_size:
            raise CorruptError(f"{what} has size {ea.i_size}, expected {e.value_size}")
        return self.read(ea, 0, e.value_size)

    # -- symlinks ---------------------------------------------------------

    def symlink_body(self, inode: Inode) -> bytes:
        """The raw symlink body of i_size bytes (for encrypted ones: length + ciphertext)."""
        what = f"symlink {inode.ino}"
        if not inode.is_symlink:
            raise CorruptError(f"inode {inode.ino} is not a symlink")
        size = inode.i_size
        if size == 0:
            raise CorruptError(f"{what}: empty target")
        if inode.has_inline_data:
            data = self._inline_data(inode)
        elif self._is_fast_symlink(inode):
            data = inode.i_block
        else:
            if size > self.block_size:
                raise CorruptError(f"{what}: target longer than a block")
            maps, _ = self._mappings(inode)
            if not maps or maps[0].lblk != 0 or maps[0].unwritten:
                raise CorruptError(f"{what}: target block missing")
            return self.read(inode, 0, size)
        if size > len(data):
            raise CorruptError(f"{what}: i_size {size} exceeds the inline target")
        return bytes(data[:size])
