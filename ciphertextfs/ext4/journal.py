"""jbd2 journal replay into an in-memory overlay, as the kernel does at mount.

A filesystem copied or snapshotted while mounted has committed metadata that
lives only in the journal; reading it without replay shows a stale tree.  We
never write to the source, so the replay result is an overlay of block
contents for the reader to prefer over the device.

The walk follows fs/jbd2/recovery.c (scan for the end of the log, collect
revoke records, replay), except that a damaged transaction does not fail
the whole replay: it ends the log there with a warning, so the view shows
the state after the last good transaction, which is always consistent.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ciphertextfs.ext4.crc import crc32c
from ciphertextfs.ext4.errors import CorruptError

JBD2_MAGIC_NUMBER = 0xC03B3998

JBD2_DESCRIPTOR_BLOCK = 1
JBD2_COMMIT_BLOCK = 2
JBD2_SUPERBLOCK_V1 = 3
JBD2_SUPERBLOCK_V2 = 4
JBD2_REVOKE_BLOCK = 5

JBD2_FEATURE_COMPAT_CHECKSUM = 0x1
JBD2_FEATURE_INCOMPAT_REVOKE = 0x1
JBD2_FEATURE_INCOMPAT_64BIT = 0x2
JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT = 0x4
JBD2_FEATURE_INCOMPAT_CSUM_V2 = 0x8
JBD2_FEATURE_INCOMPAT_CSUM_V3 = 0x10
JBD2_FEATURE_INCOMPAT_FAST_COMMIT = 0x20
JBD2_KNOWN_COMPAT_FEATURES = JBD2_FEATURE_COMPAT_CHECKSUM
JBD2_KNOWN_INCOMPAT_FEATURES = 0x3F

JBD2_FLAG_ESCAPE = 0x1
JBD2_FLAG_SAME_UUID = 0x2
JBD2_FLAG_DELETED = 0x4
JBD2_FLAG_LAST_TAG = 0x8

JBD2_CRC32_CHKSUM = 1
JBD2_CRC32C_CHKSUM = 4
JBD2_CRC32_CHKSUM_SIZE = 4

JBD2_DEFAULT_FAST_COMMIT_BLOCKS = 256
EXT4_FC_TAG_HEAD = 0x0009

_JOURNAL_HEADER = struct.Struct(">III")  # h_magic, h_blocktype, h_sequence
_SB_SIZE = 1024
_M = 0xFFFFFFFF


@dataclass(frozen=True)
class JournalSuperblock:
    """journal_superblock_t; a v1 superblock has no feature words (all zero)."""

    h_blocktype: int
    s_blocksize: int
    s_maxlen: int
    s_first: int
    s_sequence: int
    s_start: int
    s_errno: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_checksum_type: int
    s_num_fc_blks: int
    s_checksum: int

    @property
    def has_csum_v2or3(self) -> bool:
        return bool(
            self.s_feature_incompat
            & (JBD2_FEATURE_INCOMPAT_CSUM_V2 | JBD2_FEATURE_INCOMPAT_CSUM_V3)
        )

    @property
    def is_64bit(self) -> bool:
        return bool(self.s_feature_incompat & JBD2_FEATURE_INCOMPAT_64BIT)

    @property
    def has_fast_commit(self) -> bool:
        return bool(self.s_feature_incompat & JBD2_FEATURE_INCOMPAT_FAST_COMMIT)

    @property
    def tag_bytes(self) -> int:
        """journal_tag_bytes(): the descriptor tag size for these features."""
        if self.s_feature_incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3:
            return 16
        size = 12
        if self.s_feature_incompat & JBD2_FEATURE_INCOMPAT_CSUM_V2:
            size += 2
        return size if self.is_64bit else size - 4

    @property
    def log_end(self) -> int:
        """One past the last block of the circular log (j_last)."""
        if self.has_fast_commit:
            return self.s_maxlen - (self.s_num_fc_blks or JBD2_DEFAULT_FAST_COMMIT_BLOCKS)
        return self.s_maxlen


def parse_journal_superblock(block: bytes, block_size: int, journal_len: int) -> JournalSuperblock:
    """Parse and validate the journal superblock (journal block 0).

    Raises CorruptError where the kernel would refuse to load the journal:
    the replay cannot be trusted at all then.
    """
    if len(block) < _SB_SIZE:
        raise CorruptError("journal superblock is short")
    magic, blocktype, _seq = _JOURNAL_HEADER.unpack_from(block, 0)
    if magic != JBD2_MAGIC_NUMBER:
        raise CorruptError("journal superblock has no jbd2 magic")
    if blocktype not in (JBD2_SUPERBLOCK_V1, JBD2_SUPERBLOCK_V2):
        raise CorruptError(f"unknown journal superblock type {blocktype}")
    s_blocksize, s_maxlen, s_first, s_sequence, s_start, s_errno = struct.unpack_from(
        ">IIIIIi", block, 0x0C
    )
    compat = incompat = ro_compat = 0
    if blocktype == JBD2_SUPERBLOCK_V2:
        compat, incompat, ro_compat = struct.unpack_from(">III", block, 0x24)
    (s_checksum_type,) = struct.unpack_from(">B", block, 0x50)
    (s_num_fc_blks,) = struct.unpack_from(">I", block, 0x54)
    (s_checksum,) = struct.unpack_from(">I", block, 0xFC)
    jsb = JournalSuperblock(
        h_blocktype=blocktype,
        s_blocksize=s_blocksize,
        s_maxlen=s_maxlen,
        s_first=s_first,
        s_sequence=s_sequence,
        s_start=s_start,
        s_errno=s_errno,
        s_feature_compat=compat,
        s_feature_incompat=incompat,
        s_feature_ro_compat=ro_compat,
        s_uuid=bytes(block[0x30:0x40]),
        s_checksum_type=s_checksum_type,
        s_num_fc_blks=s_num_fc_blks,
        s_checksum=s_checksum,
    )
    if s_blocksize != block_size:
        raise CorruptError(f"journal block size {s_blocksize} is not the fs block size")
    if incompat & ~JBD2_KNOWN_INCOMPAT_FEATURES:
        raise CorruptError(f"unknown journal incompat features {incompat:#x}")
    if s_maxlen > journal_len:
        raise CorruptError(f"journal s_maxlen {s_maxlen} exceeds its {journal_len} blocks")
    if jsb.has_csum_v2or3:
        if (incompat & JBD2_FEATURE_INCOMPAT_CSUM_V2) and (
            incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3
        ):
            raise CorruptError("journal has both csum v2 and v3")
        if compat & JBD2_FEATURE_COMPAT_CHECKSUM:
            raise CorruptError("journal has both csum v1 and v2/v3")
        if s_checksum_type != JBD2_CRC32C_CHKSUM:
            raise CorruptError(f"unknown journal checksum type {s_checksum_type}")
        raw = bytearray(block[:_SB_SIZE])
        raw[0xFC:0x100] = bytes(4)
        if crc32c(_M, bytes(raw)) != s_checksum:
            raise CorruptError("journal superblock checksum mismatch")
    if s_first == 0 or s_first >= jsb.log_end or jsb.log_end > s_maxlen:
        raise CorruptError(f"journal log area [{s_first}, {jsb.log_end}) is invalid")
    if s_start != 0 and not s_first <= s_start < jsb.log_end:
        raise CorruptError(f"journal s_start {s_start} lies outside the log")
    return jsb


def crc32_be(crc: int, data: bytes) -> int:
    """The kernel's crc32_be (MSB first, no inversion), used by journal csum v1.

    An MSB-first CRC is the reflected CRC of bit-reversed bytes read in a
    bit-reversed register, which lets zlib's C loop do the work.
    """
    reflected = ~zlib.crc32(data.translate(_BITREV8), ~_bitrev32(crc) & _M) & _M
    return _bitrev32(reflected)


def _bitrev32(x: int) -> int:
    return int(f"{x & _M:032b}"[::-1], 2)


_BITREV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _tid_gt(x: int, y: int) -> bool:
    """Transaction ids wrap around 2**32: compare by signed difference."""
    d = (x - y) & _M
    return d != 0 and d < 0x80000000


@dataclass
class _Tag:
    log_block: int
    fs_block: int
    flags: int
    checksum: int


@dataclass
class _Transaction:
    tid: int
    tags: list[_Tag] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)


class _Journal:
    """The journal's geometry and checksum helpers for one replay."""

    def __init__(
        self,
        read_block: Callable[[int], bytes],
        journal_blocks: Sequence[int],
        block_size: int,
        jsb: JournalSuperblock,
    ) -> None:
        self._read_block = read_block
        self._journal_blocks = journal_blocks
        self.block_size = block_size
        self.sb = jsb
        self.first = jsb.s_first
        self.last = jsb.log_end
        self.csum_v23 = jsb.has_csum_v2or3
        self.csum_v3 = bool(jsb.s_feature_incompat & JBD2_FEATURE_INCOMPAT_CSUM_V3)
        self.csum_v1 = bool(jsb.s_feature_compat & JBD2_FEATURE_COMPAT_CHECKSUM)
        self.csum_seed = crc32c(_M, jsb.s_uuid) if self.csum_v23 else 0
        self.tail_size = 4 if self.csum_v23 else 0

    def read(self, log_block: int) -> bytes:
        """Read journal logical block `log_block`; CorruptError if unreadable."""
        data = self._read_block(self._journal_blocks[log_block])
        if len(data) != self.block_size:
            raise CorruptError(f"journal block {log_block} is unreadable")
        return bytes(data)

    def wrap(self, log_block: int) -> int:
        if log_block >= self.last:
            return self.first + (log_block - self.first) % (self.last - self.first)
        return log_block

    def block_tail_ok(self, block: bytes) -> bool:
        """Descriptor and revoke blocks end in jbd2_journal_block_tail."""
        if not self.csum_v23:
            return True
        (provided,) = struct.unpack_from(">I", block, self.block_size - 4)
        return crc32c(self.csum_seed, block[:-4] + bytes(4)) == provided

    def commit_ok(self, block: bytes) -> bool:
        if not self.csum_v23:
            return True
        (provided,) = struct.unpack_from(">I", block, 16)
        return crc32c(self.csum_seed, block[:16] + bytes(4) + block[20:]) == provided

    def tag_ok(self, tag: _Tag, tid: int, data: bytes) -> bool:
        if not self.csum_v23:
            return True
        csum = crc32c(crc32c(self.csum_seed, struct.pack(">I", tid)), data)
        if self.csum_v3:
            return tag.checksum == csum
        return tag.checksum == csum & 0xFFFF

    def parse_tags(self, block: bytes) -> list[tuple[int, int, int]]:
        """(fs block, flags, checksum) of each tag, bounded by the block size."""
        tag_bytes = self.sb.tag_bytes
        end = self.block_size - self.tail_size
        tags = []
        off = _JOURNAL_HEADER.size
        while off + tag_bytes <= end:
            (fs_block,) = struct.unpack_from(">I", block, off)
            (flags,) = struct.unpack_from(">H", block, off + 6)
            if self.sb.is_64bit:
                (high,) = struct.unpack_from(">I", block, off + 8)
                fs_block |= high << 32
            if self.csum_v3:
                (checksum,) = struct.unpack_from(">I", block, off + 12)
            elif self.csum_v23:
                (checksum,) = struct.unpack_from(">H", block, off + 4)
            else:
                checksum = 0
            tags.append((fs_block, flags, checksum))
            off += tag_bytes
            if not flags & JBD2_FLAG_SAME_UUID:
                off += 16
            if flags & JBD2_FLAG_LAST_TAG:
                break
        return tags

    def parse_revoke(self, block: bytes) -> list[int] | None:
        """Block numbers of a revoke block; None if r_count is impossible."""
        (r_count,) = struct.unpack_from(">I", block, 12)
        if r_count > self.block_size - self.tail_size:
            return None
        rec = 8 if self.sb.is_64bit else 4
        fmt = ">Q" if rec == 8 else ">I"
        return [struct.unpack_from(fmt, block, off)[0] for off in range(16, r_count - rec + 1, rec)]


def _scan(j: _Journal, warnings: list[str]) -> tuple[list[_Transaction], int]:
    """Walk the log from s_start; return the committed transactions and the
    first transaction id that is not replayed (the kernel's end_transaction).
    """
    sb = j.sb
    ring_len = j.last - j.first
    next_id = sb.s_sequence
    pos = sb.s_start
    consumed = 0
    committed: list[_Transaction] = []
    current = _Transaction(next_id)
    need_check_commit_time = False
    last_commit_time = 0
    crc32_sum = _M
    while True:
        if consumed >= ring_len:
            warnings.append(
                f"journal: log of transaction {next_id} runs past the whole journal; "
                "replay stops before it"
            )
            break
        try:
            block = j.read(pos)
        except CorruptError as e:
            warnings.append(f"journal: {e}; replay stops at transaction {next_id}")
            break
        pos = j.wrap(pos + 1)
        consumed += 1
        magic, blocktype, sequence = _JOURNAL_HEADER.unpack_from(block, 0)
        if magic != JBD2_MAGIC_NUMBER or sequence != next_id:
            break
        if blocktype == JBD2_DESCRIPTOR_BLOCK:
            if not j.block_tail_ok(block):
                need_check_commit_time = True
            tags = j.parse_tags(block)
            if consumed + len(tags) > ring_len:
                warnings.append(
                    f"journal: descriptor of transaction {next_id} runs past the whole "
                    "journal; replay stops before it"
                )
                break
            use_v1 = j.csum_v1 and not need_check_commit_time
            if use_v1:
                crc32_sum = crc32_be(crc32_sum, block)
            unreadable = False
            for fs_block, flags, checksum in tags:
                if use_v1:
                    try:
                        crc32_sum = crc32_be(crc32_sum, j.read(pos))
                    except CorruptError:
                        unreadable = True
                current.tags.append(_Tag(pos, fs_block, flags, checksum))
                pos = j.wrap(pos + 1)
                consumed += 1
            if unreadable:
                warnings.append(
                    f"journal: unreadable block in transaction {next_id}; replay stops before it"
                )
                break
        elif blocktype == JBD2_COMMIT_BLOCK:
            (commit_time,) = struct.unpack_from(">Q", block, 48)
            if need_check_commit_time:
                # A bad descriptor or revoke block: stale blocks from an
                # older journal end the log quietly, newer ones are damage.
                if commit_time >= last_commit_time:
                    warnings.append(
                        f"journal: invalid checksum in transaction {next_id}; "
                        "replay stops before it"
                    )
                break
            good = True
            if j.csum_v1:
                chksum_type, chksum_size = struct.unpack_from(">BB", block, 12)
                (found,) = struct.unpack_from(">I", block, 16)
                good = (
                    found == crc32_sum
                    and chksum_type == JBD2_CRC32_CHKSUM
                    and chksum_size == JBD2_CRC32_CHKSUM_SIZE
                ) or (chksum_type == 0 and chksum_size == 0 and found == 0)
                crc32_sum = _M
            if good and not j.commit_ok(block):
                good = False
            if not good:
                if commit_time >= last_commit_time:
                    warnings.append(
                        f"journal: commit block of transaction {next_id} has a bad checksum; "
                        "replay stops before it"
                    )
                break
            committed.append(current)
            last_commit_time = commit_time
            next_id = (next_id + 1) & _M
            current = _Transaction(next_id)
        elif blocktype == JBD2_REVOKE_BLOCK:
            if not j.block_tail_ok(block):
                need_check_commit_time = True
            revoked = j.parse_revoke(block)
            if revoked is None:
                warnings.append(
                    f"journal: revoke block of transaction {next_id} is invalid; "
                    "replay stops before it"
                )
                break
            current.revoked.extend(revoked)
        else:
            break
    return committed, next_id


def _check_fast_commit(j: _Journal, end_tid: int, warnings: list[str]) -> None:
    """Warn when the fast-commit area holds commits the full replay lacks.

    Fast commits are logical ext4 records, not block images; replaying them
    means re-running inode operations, which a read-only block overlay
    cannot do, so the view shows the state of the last full commit.
    """
    if not j.sb.has_fast_commit:
        return
    for log_block in (j.last, j.last + 1):
        if log_block >= j.sb.s_maxlen:
            continue
        try:
            block = j.read(log_block)
        except CorruptError:
            continue
        tag, length = struct.unpack_from("<HH", block, 0)
        (fc_tid,) = struct.unpack_from("<I", block, 8)
        if tag == EXT4_FC_TAG_HEAD and length >= 8 and fc_tid == end_tid:
            warnings.append(
                f"journal: fast commits after transaction {end_tid - 1 & _M} are not "
                "replayed; the newest fsync'ed changes may be missing"
            )
            return


def replay(
    read_block: Callable[[int], bytes], journal_blocks: Sequence[int], block_size: int
) -> tuple[dict[int, bytes], list[str]]:
    """Replay the journal in memory; return ({fs block: content}, warnings).

    `journal_blocks[i]` is the fs block holding journal block i.  The fs
    block numbers in the overlay come from the journal unchecked: the
    caller knows the filesystem size and must check them.  Raises
    CorruptError only when the journal superblock itself is unusable.
    """
    if not journal_blocks:
        raise CorruptError("the journal has no blocks")
    sb_block = read_block(journal_blocks[0])
    jsb = parse_journal_superblock(sb_block, block_size, len(journal_blocks))
    warnings: list[str] = []
    if jsb.s_feature_ro_compat:
        warnings.append(f"journal: unknown ro_compat features {jsb.s_feature_ro_compat:#x}")
    if jsb.s_errno:
        warnings.append(f"journal: the journal recorded error {jsb.s_errno}")
    j = _Journal(read_block, journal_blocks, block_size, jsb)
    if jsb.s_start == 0:
        return {}, warnings
    committed, end_tid = _scan(j, warnings)
    _check_fast_commit(j, end_tid, warnings)

    revoked_at: dict[int, int] = {}
    for t in committed:
        for fs_block in t.revoked:
            prev = revoked_at.get(fs_block)
            if prev is None or _tid_gt(t.tid, prev):
                revoked_at[fs_block] = t.tid

    # Newest first: the first good copy of a block found is the one the
    # kernel would have written last; an older copy only matters when every
    # newer one fails its checksum.
    overlay: dict[int, bytes] = {}
    for t in reversed(committed):
        for tag in reversed(t.tags):
            if tag.fs_block in overlay:
                continue
            revoke_tid = revoked_at.get(tag.fs_block)
            if revoke_tid is not None and not _tid_gt(t.tid, revoke_tid):
                continue
            try:
                data = j.read(tag.log_block)
            except CorruptError as e:
                warnings.append(f"journal: {e}; block {tag.fs_block} not replayed")
                continue
            if not j.tag_ok(tag, t.tid, data):
                warnings.append(
                    f"journal: checksum mismatch on block {tag.fs_block} in transaction "
                    f"{t.tid}; that copy is not replayed"
                )
                continue
            if tag.flags & JBD2_FLAG_ESCAPE:
                data = struct.pack(">I", JBD2_MAGIC_NUMBER) + data[4:]
            overlay[tag.fs_block] = data
    return overlay, warnings
