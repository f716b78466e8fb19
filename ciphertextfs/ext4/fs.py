"""`Filesystem`: the open filesystem, and the public API of the ext4 layer.

Everything above this module sees inodes, directory entries, xattrs,
symlink bodies, mappings and file bytes.  This module holds what every part
needs, split the way libext2fs splits it: the superblock and geometry,
block and inode access with their caches and the journal overlay
(openfs, inode); file data lives in fileio.py, directories in directory.py,
xattrs in ext_attr.py, and the methods at the end of `Filesystem` are the
layer's public surface over them.  Checksum mismatches never stop a read:
they are recorded in `warnings`, because a backup of a slightly damaged
filesystem is worth more than none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ciphertextfs.lru import LRU

from .blockdev import BlockSource
from .directory import Directories, ReaddirHash
from .dirent import DirEntry
from .errors import CorruptError, Ext4Error, NotExt4Error
from .ext_attr import find_xattr, read_xattrs
from .extents import BlockRange, Mapping
from .fileio import FileData
from .inode import (
    Inode,
    inode_checksum_ok,
    inode_csum_seed,
    parse_inode,
)
from .journal import replay
from .overlay import JournalOverlay
from .superblock import (
    COMPAT_HAS_JOURNAL,
    INCOMPAT_EA_INODE,
    INCOMPAT_KNOWN,
    INCOMPAT_RECOVER,
    RO_COMPAT_GDT_CSUM,
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
#: Inode tables are read and cached this many bytes at a time (at least one
#: block).  A directory lists its inodes in hash order, scattered over the
#: tables, so larger chunks only copy more per miss once the tables outgrow
#: the cache; reading ahead is left to the page cache (`_advise_table`).
INODE_TABLE_CHUNK = 4 << 10
INODE_TABLE_CACHE_BYTES = 32 << 20
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
        self.overlay = JournalOverlay(self.block_size)
        self._blocks = LRU(META_CACHE_BLOCKS, META_CACHE_BYTES)
        self._inodes = LRU(INODE_CACHE)
        self._gdescs = LRU(GDESC_CACHE)
        self._tables = LRU(INODE_TABLE_CACHE_BYTES // INODE_TABLE_CHUNK, INODE_TABLE_CACHE_BYTES)
        """Inode table chunks by (table's first block, chunk number)."""
        self._advised: set[int] = set()
        """Inode tables whose reading ahead was asked for (`_advise_table`)."""
        self.files = FileData(self)
        self.dirs = Directories(self)
        self._set_geometry(sb)

    def _set_geometry(self, sb: Superblock) -> None:
        self.sb = sb
        self.uuid = sb.s_uuid
        self._blocks_count = sb.blocks_count
        #: Where mapped blocks may lie, for the extent and block map walkers.
        self.limits = BlockRange(sb.s_first_data_block, sb.blocks_count)
        #: The filesystem's metadata checksum seed, None without metadata_csum.
        self.csum_seed: int | None = sb.csum_seed if sb.metadata_csum else None
        self._group_count = sb.group_count
        self._inode_size = sb.inode_size
        self._table_blocks = -(-(sb.s_inodes_per_group * sb.inode_size) // self.block_size)
        self._chunk_blocks = max(1, INODE_TABLE_CHUNK // self.block_size)
        self._chunk_bytes = self._chunk_blocks * self.block_size

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
            self.warn("superblock checksum mismatch")
        unknown = sb.s_feature_incompat & ~INCOMPAT_KNOWN
        if unknown:
            self.warn(f"unknown incompatible features {unknown:#x}")

    def _replay_journal(self) -> None:
        sb = self.sb
        if not (sb.has_compat(COMPAT_HAS_JOURNAL) and sb.has_incompat(INCOMPAT_RECOVER)):
            return
        if sb.s_journal_inum == 0:
            self.warn("journal needs recovery but is external: not replayed")
            return
        try:
            jinode = self.inode(sb.s_journal_inum)
            blocks = self._journal_blocks(jinode)
            overlay, warnings = replay(self._read_block_raw, blocks, self.block_size)
        except Ext4Error as e:
            self.warn(f"journal not replayed: {e}")
            return
        for w in warnings:
            self.warn(f"journal: {w}")
        self.overlay = JournalOverlay(
            self.block_size,
            {
                blk: bytes(data)
                for blk, data in overlay.items()
                if 0 <= blk < self._blocks_count and len(data) == self.block_size
            },
        )
        self.drop_caches()
        self._reload_superblock()

    def _reload_superblock(self) -> None:
        """Re-read the superblock when the journal rewrote its block."""
        blk, off = divmod(SUPERBLOCK_OFFSET, self.block_size)
        block = self.overlay.get(blk)
        if block is None:
            return
        raw = block[off : off + SUPERBLOCK_SIZE]
        try:
            sb = parse_superblock(raw)
        except NotExt4Error as e:
            self.warn(f"journal holds a bad superblock, kept the old one: {e}")
            return
        if sb.block_size != self.block_size:
            self.warn("journal holds a superblock with another block size, kept the old one")
            return
        self._set_geometry(sb)

    def _journal_blocks(self, jinode: Inode) -> list[int]:
        """Physical block of each journal block, which must have no holes."""
        nblocks = -(-jinode.i_size // self.block_size)
        if nblocks > MAX_JOURNAL_BLOCKS:
            raise CorruptError("journal inode too large")
        out: list[int] = []
        for m in self.files.mappings(jinode):
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
        for cache in (self._blocks, self._inodes, self._gdescs, self._tables):
            cache.clear()
        self._advised.clear()
        self.files.clear()

    def forget_inode(self, ino: int) -> None:
        """Forget what is cached of one inode that a mounted ext4 has changed.

        The inode, the inode table block that holds it, its xattr block and
        its block mappings with the tree blocks they were read from: every
        block of its metadata that is cached.  Directory blocks are never
        cached here.
        """
        old = self._inodes.pop(ino)
        if old is not None and old.i_file_acl:
            self._blocks.pop(old.i_file_acl)
        for pblk in self.files.forget(ino):
            self._blocks.pop(pblk)
        try:
            key, _off = self._inode_place(ino)
        except CorruptError:
            return
        self._tables.pop(key)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the layer's parts share ---------------------------------------

    def warn(self, msg: str) -> None:
        """Record a damage warning once; reads go on."""
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

    def read_block(self, pblk: int, cache: bool = True) -> bytes:
        """A metadata block, journal overlay first."""
        if not 0 <= pblk < self._blocks_count:
            raise CorruptError(f"block {pblk} outside the filesystem")
        data = self.overlay.get(pblk)
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

    def read_run(self, pblk: int, count: int) -> bytes:
        """`count` consecutive metadata blocks in one request, journal overlay applied.

        For directories, whose blocks are read once per listing and not
        cached: one request per extent rather than per block.
        """
        if count <= 0 or not self.limits.valid(pblk, count):
            raise CorruptError(f"blocks {pblk}..{pblk + count} outside the filesystem")
        bs = self.block_size
        data = self.source.read_meta(pblk * bs, count * bs, f"blocks {pblk}..{pblk + count}")
        if self.overlay:
            patched = bytearray(data)
            self.overlay.patch(patched, 0, 0, pblk, count, 0, len(patched))
            data = bytes(patched)
        return data

    def group_desc(self, group: int) -> GroupDesc:
        """Descriptor of one block group (checksum mismatches are warnings)."""
        sb = self.sb
        if not 0 <= group < self._group_count:
            raise CorruptError(f"group {group} does not exist")
        gd = self._gdescs.get(group)
        if gd is not None:
            return gd
        blk, off = descriptor_block(sb, group)
        block = self.read_block(blk)
        raw = block[off : off + sb.desc_size]
        gd = parse_group_desc(raw, group, sb.desc_size)
        if self.csum_seed is not None:
            if group_desc_checksum(raw, group, self.csum_seed) != gd.bg_checksum:
                self.warn(f"group {group}: descriptor checksum mismatch")
        self._gdescs.put(group, gd)
        return gd

    # -- inodes -----------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """Read inode `ino` (CorruptError when it cannot be located or parsed)."""
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        key, off = self._inode_place(ino)
        inode = self._parse_inode(ino, self._table_chunk(key), off)
        self._inodes.put(ino, inode)
        return inode

    def inodes(self, inos: Sequence[int], *, cache: bool = True) -> list[Inode | None]:
        """Several inodes at once, each inode table chunk looked up once for all of them.

        None where an inode cannot be read (damaged, or an I/O error): its
        own `inode` call says why.
        Consecutive numbers share table chunks, so a caller sorts them.
        Without `cache`, the inode cache is neither asked nor filled: for a
        caller that keeps what it needs of each inode itself, and whose
        thousands of inodes would only push out the others.
        """
        out: list[Inode | None] = []
        fresh = []
        chunk_key: tuple[int, int] | None = None
        chunk = b""
        cached = self._inodes.get if cache else lambda _ino: None
        for ino in inos:
            inode = cached(ino)
            if inode is None:
                try:
                    key, off = self._inode_place(ino)
                    if key != chunk_key:
                        chunk, chunk_key = self._table_chunk(key), key
                    inode = self._parse_inode(ino, chunk, off)
                except (CorruptError, OSError):
                    chunk_key = None
                else:
                    fresh.append((ino, inode))
            out.append(inode)
        if cache:
            self._inodes.put_many(fresh)
        return out

    def _inode_place(self, ino: int) -> tuple[tuple[int, int], int]:
        """((table's first block, chunk number), offset in the chunk) of inode `ino`."""
        sb = self.sb
        if not 1 <= ino <= sb.s_inodes_count:
            raise CorruptError(f"inode {ino} out of range")
        group, index = divmod(ino - 1, sb.s_inodes_per_group)
        gd = self.group_desc(group)
        if not self.limits.valid(gd.bg_inode_table, self._table_blocks):
            raise CorruptError(f"inode {ino}: group {group} inode table outside the filesystem")
        if gd.bg_inode_table not in self._advised:
            self._advise_table(gd)
        chunk, off = divmod(index * self._inode_size, self._chunk_bytes)
        return (gd.bg_inode_table, chunk), off

    def _advise_table(self, gd: GroupDesc) -> None:
        """Ask the kernel to read a group's used inode table ahead, in large requests.

        A directory's inodes are asked for in hash order, scattered over
        the tables; read one block at a time, each first touch would wait
        for its own small read.  Only the part mke2fs and the kernel have
        used (below bg_itable_unused, where the group descriptors are
        checksummed and so trustworthy) is asked for.
        """
        self._advised.add(gd.bg_inode_table)
        per_group = self.sb.s_inodes_per_group
        used = per_group
        if self.sb.has_ro_compat(RO_COMPAT_GDT_CSUM) or self.sb.metadata_csum:
            used = per_group - min(gd.bg_itable_unused, per_group)
        length = -(-(used * self._inode_size) // self.block_size) * self.block_size
        if length:
            self.source.advise(gd.bg_inode_table * self.block_size, length)

    def _table_chunk(self, key: tuple[int, int]) -> bytes:
        """One chunk of an inode table (whose extent `_inode_place` checked), journal applied."""
        data = self._tables.get(key)
        if data is not None:
            return data
        table, chunk = key
        first = table + chunk * self._chunk_blocks
        count = min(self._chunk_blocks, self._table_blocks - chunk * self._chunk_blocks)
        data = self.read_run(first, count)
        self._tables.put(key, data, len(data))
        return data

    def _parse_inode(self, ino: int, block: bytes, off: int) -> Inode:
        inode = parse_inode(self.sb, ino, block[off : off + self._inode_size])
        if self.csum_seed is not None and not inode_checksum_ok(inode, self.csum_seed):
            self.warn(f"inode {ino}: checksum mismatch")
        return inode

    def inode_csum_seed(self, inode: Inode) -> int | None:
        """The checksum seed of an inode's own metadata, None without metadata_csum."""
        if self.csum_seed is None:
            return None
        return inode_csum_seed(self.csum_seed, inode.ino, inode.i_generation)

    @property
    def ea_inode_feature(self) -> bool:
        return self.sb.has_incompat(INCOMPAT_EA_INODE)

    # -- the public API of the layer: file data, directories, xattrs ------

    def mappings(self, inode: Inode) -> list[Mapping]:
        """Every mapped extent of the file, sorted by logical block."""
        return self.files.mappings(inode)

    def read(self, inode: Inode, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset` (see FileData.read)."""
        return self.files.read(inode, offset, length)

    def read_files(
        self, wanted: list[tuple[Inode, int]], *, max_gap: int, max_span: int
    ) -> dict[int, bytes]:
        """Many small files in few device requests (see FileData.read_files)."""
        return self.files.read_files(wanted, max_gap=max_gap, max_span=max_span)

    def symlink_body(self, inode: Inode) -> bytes:
        """The raw symlink body of i_size bytes (for encrypted ones: length + ciphertext)."""
        return self.files.symlink_body(inode)

    def is_dx_dir(self, inode: Inode) -> bool:
        """As the kernel's is_dx_dir(): whether readdir uses hash order."""
        return self.dirs.is_dx_dir(inode)

    def dx_root_hash_version(self, inode: Inode) -> int | None:
        """The dx_root's hash version of an indexed directory, else None."""
        return self.dirs.dx_root_hash_version(inode)

    @property
    def default_dirhash(self) -> tuple[int, bytes]:
        return self.dirs.default_hash()

    def readdir_hash(self, inode: Inode) -> ReaddirHash:
        """The (hash, minor hash) the kernel's readdir passes for each entry."""
        return self.dirs.readdir_hash(inode)

    def dx_find(
        self,
        inode: Inode,
        name: bytes | None,
        hash_: int | None,
        match: Callable[[DirEntry], bool],
    ) -> DirEntry | None:
        """One entry through the htree (see Directories.dx_find; IndexInconclusive)."""
        return self.dirs.dx_find(inode, name, hash_, match)

    def read_dir(self, inode: Inode) -> list[DirEntry]:
        """All sound entries of a directory except "." and "..", in on-disk order."""
        return self.dirs.read_dir(inode)

    def read_dir_checked(self, inode: Inode) -> tuple[list[DirEntry], list[str]]:
        """The sound entries, and what could not be read (see Directories)."""
        return self.dirs.read_dir_checked(inode)

    def xattrs(self, inode: Inode) -> list[Xattr]:
        """In-inode xattrs, then those of the EA block, EA inode values resolved."""
        return read_xattrs(self, inode)

    def xattr(self, inode: Inode, name_index: int, name: bytes) -> bytes | None:
        """One xattr's value or None, reading the EA block only when the body lacks it."""
        return find_xattr(self, inode, name_index, name)
