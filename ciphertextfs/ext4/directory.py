"""Directories: entries in on-disk order, htree checks, and the hash readdir passes.

As libext2fs's dir_iterate: linear and htree leaf blocks alike yield their
entries, dx_root and dx_node blocks are checked and skipped.  Which hash
the kernel's readdir reports for an entry (is_dx_dir(), the dx_root's hash
version, the unsigned-char flag) is ext4 knowledge too: it is what an
encrypted entry's no-key name carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import dirent as _dirent
from .dirent import DirEntry
from .dirhash import DX_HASH_TEA, dx_hash_version, ext4fs_dirhash
from .errors import CorruptError
from .inode import EXT4_CASEFOLD_FL, EXT4_ENCRYPT_FL, EXT4_INDEX_FL, I_BLOCK_SIZE, Inode
from .superblock import COMPAT_DIR_INDEX, INCOMPAT_FILETYPE, INCOMPAT_LARGEDIR

#: Directory blocks read in one request (an extent longer than this takes several).
DIR_RUN_BLOCKS = 256

if TYPE_CHECKING:
    from .fs import Filesystem

__all__ = ["Directories", "IndexInconclusive", "ReaddirHash"]

ReaddirHash = Callable[[DirEntry], tuple[int, int]]


class IndexInconclusive(Exception):
    """The htree cannot answer this lookup: read the directory linearly.

    Not indexed, casefolded, or an index or leaf block that fails a check
    (as the kernel falls back to a linear search on ERR_BAD_DX_DIR).
    """


class Directories:
    """The directories of one filesystem."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    def is_dx_dir(self, inode: Inode) -> bool:
        """As the kernel's is_dx_dir(): whether readdir uses hash order."""
        fs = self.fs
        if not fs.sb.has_compat(COMPAT_DIR_INDEX):
            return False
        return bool(
            inode.i_flags & EXT4_INDEX_FL
            or (inode.i_size // fs.block_size) == 1
            or inode.has_inline_data
        )

    def dx_root_hash_version(self, inode: Inode) -> int | None:
        """The dx_root's hash version of an indexed directory, else None."""
        if not inode.i_flags & EXT4_INDEX_FL or inode.has_inline_data:
            return None
        pblk = self.fs.files.first_block(inode)
        if pblk is None:
            raise CorruptError(f"directory {inode.ino}: indexed, but block 0 is not mapped")
        return _dirent.dx_root_hash_version(self.fs.read_block(pblk, cache=False))

    def default_hash(self) -> tuple[int, bytes]:
        """(hash version, seed) of a directory without a dx_root of its own, as
        the kernel uses it (unsigned-char flag applied): also what a
        directory the kernel indexes later records."""
        sb = self.fs.sb
        return dx_hash_version(sb.s_def_hash_version, sb.s_flags), sb.s_hash_seed

    def readdir_hash(self, inode: Inode) -> ReaddirHash:
        """The (hash, minor hash) the kernel's readdir passes for each entry.

        A directory read through the htree code gets hashes, one read
        linearly gets zeros.  An indexed directory hashes with the version
        in its dx_root, any other with the superblock's default; both honour
        the unsigned-char flag.  Encrypted+casefolded directories store the
        hash after each name.
        """
        if inode.is_casefold:
            return lambda de: (de.hash or 0, de.minor_hash or 0)
        if not self.is_dx_dir(inode):
            return lambda de: (0, 0)
        sb = self.fs.sb
        version = self.dx_root_hash_version(inode)
        if version is None:
            version = sb.s_def_hash_version
        v = dx_hash_version(version, sb.s_flags)
        seed = sb.s_hash_seed
        return lambda de: ext4fs_dirhash(de.name, v, seed)

    def dx_find(
        self,
        inode: Inode,
        name: bytes | None,
        hash_: int | None,
        match: Callable[[DirEntry], bool],
    ) -> DirEntry | None:
        """Find an entry through the htree as the kernel's ext4_dx_find_entry does.

        The hash is that of `name` under the dx_root's hash version, or
        `hash_` as given (a long no-key name carries it).  Returns the first
        entry `match` accepts in the leaf the index designates and in those
        continuing its hash (collision bit); None when the index says the
        name is absent, which only a sound index makes true (a damaged one
        without checksums can send the probe to the wrong leaf);
        IndexInconclusive when a block fails a check.
        """
        try:
            return self._dx_find(inode, name, hash_, match)
        except (CorruptError, OSError) as e:
            raise IndexInconclusive(f"directory {inode.ino}: {e}") from e

    def _dx_find(
        self,
        inode: Inode,
        name: bytes | None,
        hash_: int | None,
        match: Callable[[DirEntry], bool],
    ) -> DirEntry | None:
        fs = self.fs
        sb = fs.sb
        if not (
            inode.is_dir
            and sb.has_compat(COMPAT_DIR_INDEX)
            and inode.i_flags & EXT4_INDEX_FL
            and not inode.has_inline_data
        ):
            raise IndexInconclusive(f"directory {inode.ino}: not indexed")
        if inode.is_casefold:
            raise IndexInconclusive(f"directory {inode.ino}: casefolded")
        bs = fs.block_size
        nblocks = inode.i_size // bs
        seed = fs.inode_csum_seed(inode)
        tail = _dirent.DX_TAIL_SIZE if seed is not None else 0
        node_limit = (bs - _dirent.DX_NODE_COUNT_OFFSET - tail) // 8
        max_levels = (
            _dirent.EXT4_HTREE_LEVEL
            if sb.has_incompat(INCOMPAT_LARGEDIR)
            else _dirent.EXT4_HTREE_LEVEL_COMPAT
        )

        root_block = self._dx_block(inode, 0, nblocks)
        root = _dirent.parse_dx_root(root_block, max_levels)
        if root.hash_version > DX_HASH_TEA:
            raise CorruptError(f"unrecognised hash version {root.hash_version}")
        if seed is not None and not _dirent.dx_checksum_ok(root_block, root.count_offset, seed):
            raise CorruptError("dx_root checksum")
        if name is not None:
            v = dx_hash_version(root.hash_version, sb.s_flags)
            hash_ = ext4fs_dirhash(name, v, sb.s_hash_seed)[0]
        if hash_ is None:
            raise ValueError("dx_find needs a name or a hash")
        root_limit = (bs - root.count_offset - tail) // 8
        frames = [_dirent.dx_entries(root_block, root.count_offset, root_limit)]
        ats = [_dirent.dx_probe_at(frames[0], hash_)]
        path = {0}

        def descend(level: int, probe: bool) -> None:
            """Fill the frames below `level` down to the leaves: by the hash on
            the way in, from their first entry when moving to the next leaf."""
            del frames[level + 1 :], ats[level + 1 :]
            while len(frames) <= root.indirect_levels:
                lblk = frames[-1][ats[-1]][1] & _dirent.DX_BLOCK_MASK
                if lblk in path:
                    raise CorruptError(f"htree loop at block {lblk}")
                path.add(lblk)
                block = self._dx_block(inode, lblk, nblocks)
                if not _dirent.is_dx_node_block(block, bs):
                    raise CorruptError(f"block {lblk} is not a dx node")
                off = _dirent.DX_NODE_COUNT_OFFSET
                if seed is not None and not _dirent.dx_checksum_ok(block, off, seed):
                    raise CorruptError(f"dx node {lblk} checksum")
                frames.append(_dirent.dx_entries(block, off, node_limit))
                ats.append(_dirent.dx_probe_at(frames[-1], hash_) if probe else 0)

        descend(0, probe=True)
        for _ in range(nblocks):
            lblk = frames[-1][ats[-1]][1] & _dirent.DX_BLOCK_MASK
            found = self._search_leaf(inode, lblk, nblocks, seed, match)
            if found is not None:
                return found
            # The next leaf holds more of this hash only if its first hash
            # is this one with the collision bit (ext4_htree_next_block).
            level = len(frames) - 1
            while level >= 0 and ats[level] + 1 >= len(frames[level]):
                level -= 1
            if level < 0:
                break
            bhash = frames[level][ats[level] + 1][0]
            if not hash_ & 1 and (bhash & ~1) != hash_:
                break
            ats[level] += 1
            descend(level, probe=False)
        return None

    def _dx_block(self, inode: Inode, lblk: int, nblocks: int) -> bytes:
        if not 0 <= lblk < nblocks:
            raise CorruptError(f"htree block {lblk} past i_size")
        pblk = self.fs.files.block_at(inode, lblk)
        if pblk is None:
            raise CorruptError(f"htree block {lblk} is a hole")
        return self.fs.read_block(pblk, cache=False)

    def _search_leaf(
        self,
        inode: Inode,
        lblk: int,
        nblocks: int,
        seed: int | None,
        match: Callable[[DirEntry], bool],
    ) -> DirEntry | None:
        """The first matching entry of one leaf; CorruptError if the leaf is not sound."""
        fs = self.fs
        block = self._dx_block(inode, lblk, nblocks)
        if seed is not None and not _dirent.leaf_checksum_ok(block, seed):
            raise CorruptError(f"leaf {lblk} checksum")
        problems: list[str] = []
        entries = _dirent.parse_entries(
            block,
            block_size=fs.block_size,
            inodes_count=fs.sb.s_inodes_count,
            filetype=fs.sb.has_incompat(INCOMPAT_FILETYPE),
            hashed=False,
            what=f"directory inode {inode.ino} block {lblk}",
            warn=problems.append,
        )
        for de in entries:
            if match(de):
                return de
        if problems:
            raise CorruptError(problems[0])
        return None

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
        fs = self.fs
        what = f"directory inode {inode.ino}"
        hashed = (inode.i_flags & (EXT4_ENCRYPT_FL | EXT4_CASEFOLD_FL)) == (
            EXT4_ENCRYPT_FL | EXT4_CASEFOLD_FL
        )
        damage: list[str] = []

        def bad(msg: str) -> None:
            damage.append(msg)
            fs.warn(msg)

        common = {
            "inodes_count": fs.sb.s_inodes_count,
            "filetype": fs.sb.has_incompat(INCOMPAT_FILETYPE),
            "hashed": hashed,
            "warn": bad,
        }
        if inode.has_inline_data:
            data = fs.files.inline_data(inode)
            out = _dirent.parse_entries(
                data[4:I_BLOCK_SIZE], block_size=I_BLOCK_SIZE, what=what, **common
            )
            if len(data) > I_BLOCK_SIZE:
                rest = data[I_BLOCK_SIZE:]
                out += _dirent.parse_entries(rest, block_size=len(rest), what=what, **common)
            return out, damage
        bs = fs.block_size
        nblocks = -(-inode.i_size // bs)
        indexed = bool(inode.i_flags & EXT4_INDEX_FL)
        seed = fs.inode_csum_seed(inode)
        out = []
        expect = 0
        for m in fs.files.mappings(inode):
            if m.lblk >= nblocks:
                break
            if m.lblk > expect:
                bad(f"{what}: hole at block {expect}")
            expect = max(expect, m.lblk + m.len)
            if m.unwritten:
                continue
            for k, block in enumerate(
                self._dir_blocks(m.pblk, min(m.len, nblocks - m.lblk), m.lblk, what, bad)
            ):
                if block is None:
                    continue
                lblk = m.lblk + k
                bwhat = f"{what} block {lblk}"
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

    def _dir_blocks(
        self, pblk: int, count: int, lblk: int, what: str, bad: Callable[[str], None]
    ) -> Iterator[bytes | None]:
        """The blocks of one extent, read DIR_RUN_BLOCKS at a time; None for one unreadable.

        A run that cannot be read is read again block by block, so that
        each bad block is reported and the others are still listed.
        """
        fs = self.fs
        bs = fs.block_size
        for first in range(0, count, DIR_RUN_BLOCKS):
            n = min(DIR_RUN_BLOCKS, count - first)
            try:
                run = fs.read_run(pblk + first, n)
            except (CorruptError, OSError):
                pass
            else:
                for i in range(n):
                    yield run[i * bs : (i + 1) * bs]
                continue
            for k in range(first, first + n):
                try:
                    yield fs.read_block(pblk + k, cache=False)
                except (CorruptError, OSError) as e:
                    bad(f"{what} block {lblk + k}: cannot be read: {e}")
                    yield None

    def _check_dx(self, block: bytes, count_offset: int, seed: int, what: str) -> None:
        ok = _dirent.dx_checksum_ok(block, count_offset, seed)
        if ok is None:
            self.fs.warn(f"{what}: no htree checksum tail")
        elif not ok:
            self.fs.warn(f"{what}: htree block checksum mismatch")
