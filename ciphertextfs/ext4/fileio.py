"""File data: block mappings, ranged reads and batched reads (libext2fs's fileio).

What a file's bytes are: its mapped extents merged into physical runs, holes
and unwritten extents as zeros, inline data and fast symlinks out of the
inode, journal-replayed blocks patched in.  Planning which device requests
serve a batch of small files is a pure function of their runs.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, NamedTuple

from ciphertextfs.lru import LRU

from . import xattr as _xattr
from .errors import CorruptError, Ext4Error
from .extents import Mapping, blockmap_mappings, extent_mappings
from .inode import EXT4_EA_INODE_FL, I_BLOCK_SIZE, Inode

if TYPE_CHECKING:
    from .fs import Filesystem

__all__ = ["FileData", "Run", "Piece", "Span", "merge_runs", "plan_spans"]

MAPPING_CACHE = 256


class Run(NamedTuple):
    """`count` written blocks, logically from `lblk`, physically from `pblk`."""

    lblk: int
    pblk: int
    count: int


class Piece(NamedTuple):
    """`nbytes` of file `ino` from `file_offset`, found at `dev_offset` on the device."""

    dev_offset: int
    nbytes: int
    ino: int
    file_offset: int


class Span(NamedTuple):
    """One device request [start, end) serving the pieces in `members`."""

    start: int
    end: int
    members: list[Piece]


def merge_runs(maps: list[Mapping], starts: list[int], first: int, last: int) -> list[Run]:
    """The written blocks of logical [first, last), one Run per device request.

    `starts` are the mappings' logical starts, for the bisection.  Adjacent
    extents that are also physically adjacent merge into one run.
    """
    i = max(bisect.bisect_right(starts, first) - 1, 0)
    runs: list[Run] = []
    while i < len(maps) and maps[i].lblk < last:
        m = maps[i]
        i += 1
        lo = max(m.lblk, first)
        hi = min(m.lblk + m.len, last)
        if hi <= lo or m.unwritten:
            continue
        pblk = m.pblk + (lo - m.lblk)
        prev = runs[-1] if runs else None
        if prev is not None and prev.lblk + prev.count == lo and prev.pblk + prev.count == pblk:
            runs[-1] = prev._replace(count=prev.count + hi - lo)
        else:
            runs.append(Run(lo, pblk, hi - lo))
    return runs


def plan_spans(pieces: list[Piece], *, max_gap: int, max_span: int) -> list[Span]:
    """Pieces sorted by device offset, merged across gaps of at most `max_gap` bytes.

    No span grows beyond `max_span` bytes, so that one request stays one
    reasonable buffer.
    """
    spans: list[Span] = []
    for piece in sorted(pieces):
        start, nbytes = piece.dev_offset, piece.nbytes
        if spans:
            last = spans[-1]
            end = max(last.end, start + nbytes)
            if start - last.end <= max_gap and end - last.start <= max_span:
                spans[-1] = last._replace(end=end)
                last.members.append(piece)
                continue
        spans.append(Span(start, start + nbytes, [piece]))
    return spans


class FileData:
    """The data of one filesystem's files, with a cache of their mappings."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._maps = LRU(MAPPING_CACHE)

    def clear(self) -> None:
        self._maps.clear()

    def forget(self, ino: int) -> list[int]:
        """Drop the cached mappings of inode `ino`; answer the tree blocks they were read from."""
        cached = self._maps.pop(ino)
        return [] if cached is None else cached[1][2]

    def is_fast_symlink(self, inode: Inode) -> bool:
        """As the kernel's ext4_inode_is_fast_symlink()."""
        if not inode.is_symlink:
            return False
        if inode.i_flags & EXT4_EA_INODE_FL:
            return 0 < inode.i_size < I_BLOCK_SIZE
        if inode.has_inline_data:
            return False
        ea_blocks = self.fs.sb.cluster_size >> 9 if inode.i_file_acl else 0
        return inode.i_blocks - ea_blocks == 0

    def inline_data(self, inode: Inode) -> bytes:
        """i_block followed by the "system.data" xattr of an inline-data inode."""
        entries = _xattr.ibody_entries(
            inode.raw, inode.i_extra_isize, f"inode {inode.ino}", self.fs.ea_inode_feature
        )
        extra = _xattr.find_system_data(entries)
        if extra is None:
            return inode.i_block
        return inode.i_block + extra

    def mappings(self, inode: Inode) -> list[Mapping]:
        """Every mapped extent of the file, sorted by logical block."""
        return list(self._mappings(inode)[0])

    def _mappings(self, inode: Inode) -> tuple[list[Mapping], list[int], list[int]]:
        """(mappings, their first logical blocks, the tree blocks read for them).

        The tree blocks are kept so that a live source's changed file can
        drop them from the block cache along with its mappings.
        """
        # Cached per inode number, valid while what the mappings derive from stays.
        key = (inode.i_generation, inode.i_flags, inode.i_size, inode.i_block)
        cached = self._maps.get(inode.ino)
        if cached is not None and cached[0] == key:
            return cached[1]
        fs = self.fs
        tree: list[int] = []

        def read_block(pblk: int) -> bytes:
            tree.append(pblk)
            return fs.read_block(pblk)

        maps: list[Mapping]
        what = f"inode {inode.ino}"
        if (
            inode.has_inline_data
            or self.is_fast_symlink(inode)
            or not (inode.is_reg or inode.is_dir or inode.is_symlink)
        ):
            maps = []
        elif inode.has_extents:
            maps = extent_mappings(
                inode.i_block,
                read_block,
                block_size=fs.block_size,
                limits=fs.limits,
                csum_seed=fs.inode_csum_seed(inode),
                warn=fs.warn,
                what=what,
            )
        else:
            maps = blockmap_mappings(
                inode.i_block,
                read_block,
                block_size=fs.block_size,
                limits=fs.limits,
                max_lblk=-(-inode.i_size // fs.block_size),
                what=what,
            )
        result = (maps, [m.lblk for m in maps], tree)
        self._maps.put(inode.ino, (key, result))
        return result

    def first_block(self, inode: Inode) -> int | None:
        """The physical block behind logical block 0, None unless it is written."""
        maps, _, _ = self._mappings(inode)
        if not maps or maps[0].lblk != 0 or maps[0].unwritten:
            return None
        return maps[0].pblk

    def block_at(self, inode: Inode, lblk: int) -> int | None:
        """The physical block behind logical block `lblk`, None unless it is written."""
        runs = self.runs(inode, lblk, lblk + 1)
        return runs[0].pblk if runs else None

    def runs(self, inode: Inode, first: int, last: int) -> list[Run]:
        maps, starts, _ = self._mappings(inode)
        return merge_runs(maps, starts, first, last)

    def read(self, inode: Inode, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of the file from `offset`, without clipping at i_size.

        Holes, unwritten extents and anything past the last mapped block
        read as zeros; contiguous physical runs are read in one request.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if length == 0:
            return b""
        if inode.has_inline_data or self.is_fast_symlink(inode):
            data = self.inline_data(inode) if inode.has_inline_data else inode.i_block
            if self.is_fast_symlink(inode):
                data = data[: inode.i_size]
            chunk = data[offset : offset + length]
            return chunk + bytes(length - len(chunk))
        fs = self.fs
        bs = fs.block_size
        end = offset + length
        runs = self.runs(inode, offset // bs, -(-end // bs))
        pieces = []
        for run in runs:
            fstart = max(run.lblk * bs, offset)
            fend = min((run.lblk + run.count) * bs, end)
            pieces.append(
                (fstart - offset, run.pblk * bs + (fstart - run.lblk * bs), fend - fstart)
            )
        what = f"inode {inode.ino} data"
        if not fs.overlay:
            return fs.source.read_scattered(length, pieces, what)
        out = bytearray(length)
        for (pos, pstart, n), run in zip(pieces, runs, strict=True):
            out[pos : pos + n] = fs.source.read_data(pstart, n, what)
            fs.overlay.patch(out, offset, *run, pos + offset, pos + offset + n)
        return bytes(out)

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
        fs = self.fs
        if fs.overlay:
            return {}
        bs = fs.block_size
        limit = fs.source.size
        pieces: list[Piece] = []
        lengths: dict[int, int] = {}
        single: dict[int, bool] = {}
        for inode, length in wanted:
            if length <= 0 or inode.ino in lengths:
                continue
            if inode.has_inline_data or self.is_fast_symlink(inode):
                continue
            try:
                runs = self.runs(inode, 0, -(-length // bs))
            except Ext4Error:
                continue
            own = []
            for run in runs:
                start = run.lblk * bs
                nbytes = min(run.count * bs, length - start)
                if run.pblk * bs + nbytes > limit:
                    break
                own.append(Piece(run.pblk * bs, nbytes, inode.ino, start))
            else:
                pieces.extend(own)
                lengths[inode.ino] = length
                single[inode.ino] = len(own) == 1
        spans = plan_spans(pieces, max_gap=max_gap, max_span=max_span)
        whole: dict[int, bytes] = {}
        parts: dict[int, bytearray] = {}
        failed: set[int] = set()
        got = fs.source.read_data_many([(s.start, s.end - s.start) for s in spans], "file data")
        for span, data in zip(spans, got, strict=True):
            if data is None:
                fs.warn(f"batched read of bytes {span.start}..{span.end} failed")
                failed.update(p.ino for p in span.members)
                continue
            for piece in span.members:
                a = piece.dev_offset - span.start
                ino, nbytes = piece.ino, piece.nbytes
                if single[ino] and nbytes == lengths[ino]:
                    whole[ino] = data[a : a + nbytes]
                    continue
                buf = parts.get(ino)
                if buf is None:
                    buf = parts[ino] = bytearray(lengths[ino])
                buf[piece.file_offset : piece.file_offset + nbytes] = memoryview(data)[
                    a : a + nbytes
                ]
        whole.update((ino, bytes(buf)) for ino, buf in parts.items())
        return {ino: data for ino, data in whole.items() if ino not in failed}

    def symlink_body(self, inode: Inode) -> bytes:
        """The raw symlink body of i_size bytes (for encrypted ones: length + ciphertext)."""
        what = f"symlink {inode.ino}"
        if not inode.is_symlink:
            raise CorruptError(f"inode {inode.ino} is not a symlink")
        size = inode.i_size
        if size == 0:
            raise CorruptError(f"{what}: empty target")
        if inode.has_inline_data:
            data = self.inline_data(inode)
        elif self.is_fast_symlink(inode):
            data = inode.i_block
        else:
            if size > self.fs.block_size:
                raise CorruptError(f"{what}: target longer than a block")
            if self.first_block(inode) is None:
                raise CorruptError(f"{what}: target block missing")
            return self.read(inode, 0, size)
        if size > len(data):
            raise CorruptError(f"{what}: i_size {size} exceeds the inline target")
        return bytes(data[:size])
