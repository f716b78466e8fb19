"""jbd2 replay against journals the kernel wrote, with e2fsck and the kernel as oracles.

Each image is copied while mounted, after fsyncs that commit transactions
whose home blocks are not written back yet: the copy needs recovery.  The
oracles are e2fsprogs' replay (`e2fsck -E journal_only`) block by block,
and the kernel's own replay at a read-only mount compared with a mount of
the copy patched with our overlay (`noload`: no kernel replay).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from ciphertextfs.ext4 import journal
from ciphertextfs.ext4.crc import crc32c
from ciphertextfs.ext4.errors import CorruptError
from ciphertextfs.ext4.journal import (
    JBD2_COMMIT_BLOCK,
    JBD2_DESCRIPTOR_BLOCK,
    JBD2_FLAG_ESCAPE,
    JBD2_FLAG_LAST_TAG,
    JBD2_FLAG_SAME_UUID,
    JBD2_MAGIC_NUMBER,
    JBD2_SUPERBLOCK_V2,
    crc32_be,
    replay,
)
from tests import harness

MAGIC = struct.pack(">I", JBD2_MAGIC_NUMBER)


def _sb_and_gdt_blocks(image: Path) -> set[int]:
    """Superblock and group descriptor blocks (primary and backups): e2fsck rewrites them."""
    out = subprocess.run(["dumpe2fs", os.fspath(image)], capture_output=True, text=True).stdout
    blocks: set[int] = set()
    for m in re.finditer(r"superblock at (\d+), Group descriptors at (\d+)-(\d+)", out):
        blocks.add(int(m.group(1)))
        blocks.update(range(int(m.group(2)), int(m.group(3)) + 1))
    assert blocks
    return blocks


def _journal_map(image: Path) -> list[int]:
    """The journal inode's blocks in logical order; -c skips the (stale) bitmaps."""
    jmap = [int(b) for b in harness.run("debugfs", "-c", "-R", "blocks <8>", image).split()]
    assert jmap, "debugfs could not map the journal inode"
    return jmap


def _image_reader(image: Path, bs: int):
    data = image.read_bytes()

    def read_block(n: int) -> bytes:
        return data[n * bs : (n + 1) * bs]

    return read_block


def _workload(mnt: Path, rng: random.Random, rounds: int, escape: bool) -> None:
    """Metadata churn, one commit per fsync; deleted dirs leave revoke records."""
    for r in range(rounds):
        d = mnt / f"r{r}"
        d.mkdir()
        for i in range(rng.randint(3, 12)):
            body = rng.randbytes(rng.randint(0, 3000))
            if escape and i == 0:
                body = MAGIC + body
            p = d / f"file-{i}-{'x' * rng.randint(0, 120)}"
            with open(p, "wb") as f:
                f.write(body)
                if i == 0:
                    f.flush()
                    os.fsync(f.fileno())
        (d / "sub").mkdir()
        if r >= 2 and rng.random() < 0.6:
            victim = mnt / f"r{r - 2}"
            if victim.exists():
                shutil.rmtree(victim)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, root)
            if rel == "lost+found":
                continue
            try:
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            except OSError as e:
                # An unreplayed copy can be inconsistent (EUCLEAN): record it.
                out[rel] = ("error", e.errno)
                continue
            out[rel] = (st.st_mode, st.st_size, st.st_nlink, digest)
    return out


VARIANTS = {
    # name: (block size, size MB, features, journal size MB, mount options, escape data)
    "csum_v3": (1024, 32, ("metadata_csum", "64bit"), 1, "commit=600", False),
    "no_csum_32bit": (1024, 32, ("^metadata_csum", "^64bit"), 1, "commit=600", False),
    "csum_v1": (1024, 32, ("^metadata_csum",), 1, "commit=600,journal_checksum", False),
    "csum_v1_async": (
        1024,
        32,
        ("^metadata_csum",),
        1,
        "commit=600,journal_async_commit,data=writeback",
        False,
    ),
    "csum_v3_async": (
        1024,
        32,
        ("metadata_csum",),
        1,
        "commit=600,journal_async_commit,data=writeback",
        False,
    ),
    "data_journal_escape": (1024, 32, ("metadata_csum",), 1, "commit=600,data=journal", True),
    "bs4k": (4096, 64, ("metadata_csum", "64bit"), 4, "commit=600", False),
}


def _make_snapshot(tmp: Path, variant: str) -> tuple[Path, int, str]:
    """A mid-flight copy whose journal still holds blocks newer than their home copies.

    Writeback of the loop device's dirty metadata (a sync by anyone on the
    host, memory pressure) may put the journaled blocks at home before the
    copy is taken, which would leave the replay nothing to do: retry then.
    """
    for attempt in range(3):
        snap, bs, options = _try_snapshot(tmp / f"try{attempt}", variant)
        if harness.dumpe2fs_header(snap)["Journal start"] == "0":
            continue
        read_block = _image_reader(snap, bs)
        overlay, _warnings = replay(read_block, _journal_map(snap), bs)
        if any(content != read_block(b) for b, content in overlay.items()):
            return snap, bs, options
    pytest.fail(f"{variant}: three copies in a row had their journal already written back")


def _try_snapshot(tmp: Path, variant: str) -> tuple[Path, int, str]:
    tmp.mkdir()
    bs, size, features, jsize, options, escape = VARIANTS[variant]
    image = harness.mkfs(
        tmp / "live.img",
        size_mb=size,
        block_size=bs,
        features=features,
        extra=["-J", f"size={jsize}", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    )
    snap = tmp / "snap.img"
    rng = random.Random(variant)
    with harness.mounted(image, tmp / "live.mnt", options=options) as (_dev, mnt):
        _workload(mnt, rng, 60, escape)
        os.sync()
        later = mnt / "later"
        later.mkdir()
        _workload(later, rng, 40, escape)
        shutil.copyfile(image, snap)
    return snap, bs, options


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory):
    """Build each variant's mid-flight copy once per module."""
    harness.require_kernel()
    cache: dict[str, tuple[Path, int, str]] = {}

    def get(variant: str) -> tuple[Path, int, str]:
        if variant not in cache:
            cache[variant] = _make_snapshot(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_replay_matches_e2fsck_and_kernel(snapshots, tmp_path: Path, variant: str) -> None:
    snap, bs, options = snapshots(variant)
    fields = harness.dumpe2fs_header(snap)
    assert "needs_recovery" in fields["Filesystem features"]
    assert int(fields["Journal start"]) != 0, "nothing to replay: the test would be vacuous"
    jmap = _journal_map(snap)
    read_block = _image_reader(snap, bs)

    t0 = time.monotonic()
    overlay, warnings = replay(read_block, jmap, bs)
    assert time.monotonic() - t0 < 10
    assert warnings == []
    assert overlay

    # What the kernel's walk saw, to prove the features were exercised.
    jsb = journal.parse_journal_superblock(read_block(jmap[0]), bs, len(jmap))
    j = journal._Journal(read_block, jmap, bs, jsb)
    committed, _end = journal._scan(j, [])
    assert len(committed) >= 2
    if not VARIANTS[variant][5]:
        # data=journal fills the log with file data; its short window may hold none.
        assert any(t.revoked for t in committed), "no revoke records in the replayed log"
    if "journal_checksum" in options or "journal_async_commit" in options:
        if "metadata_csum" in VARIANTS[variant][2] and "^metadata_csum" not in VARIANTS[variant][2]:
            assert jsb.s_feature_incompat & journal.JBD2_FEATURE_INCOMPAT_CSUM_V3
        else:
            assert jsb.s_feature_compat & journal.JBD2_FEATURE_COMPAT_CHECKSUM
    if "async" in variant:
        assert jsb.s_feature_incompat & journal.JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT
    if variant == "csum_v3":
        assert jsb.s_feature_incompat & journal.JBD2_FEATURE_INCOMPAT_CSUM_V3
        assert jsb.is_64bit
    if variant == "no_csum_32bit":
        assert not jsb.has_csum_v2or3 and not jsb.is_64bit and not jsb.s_feature_compat
    if VARIANTS[variant][5]:
        assert any(tag.flags & JBD2_FLAG_ESCAPE for t in committed for tag in t.tags)
    if variant == "bs4k":
        # This workload's log crosses the end of the ring (the circular wrap).
        positions = [tag.log_block for t in committed for tag in t.tags]
        assert any(b < a for a, b in zip(positions, positions[1:], strict=False))

    # e2fsprogs' replay, block by block.
    fixed = tmp_path / "e2fsck.img"
    shutil.copyfile(snap, fixed)
    rc = subprocess.run(
        ["e2fsck", "-fy", "-E", "journal_only", os.fspath(fixed)], capture_output=True
    ).returncode
    assert rc in (0, 1), rc
    excluded = _sb_and_gdt_blocks(fixed) | set(jmap)
    before = snap.read_bytes()
    after = fixed.read_bytes()
    nblocks = len(after) // bs
    for b, content in overlay.items():
        assert b < nblocks
        if b not in excluded:
            assert content == after[b * bs : (b + 1) * bs], f"block {b}"
    changed = 0
    for b in range(nblocks):
        if b in excluded:
            continue
        old = before[b * bs : (b + 1) * bs]
        new = after[b * bs : (b + 1) * bs]
        if old != new:
            changed += 1
            assert overlay.get(b) == new, f"block {b} replayed by e2fsck, not by us"
    assert changed > 0, "the replay changes nothing: the test would be vacuous"

    # The kernel's replay (ro mount of a copy that needs recovery) against
    # the copy patched with our overlay and mounted without replay.
    kcopy = tmp_path / "kernel.img"
    shutil.copyfile(snap, kcopy)
    ours = tmp_path / "ours.img"
    shutil.copyfile(snap, ours)
    with open(ours, "r+b") as f:
        for b, content in overlay.items():
            f.seek(b * bs)
            f.write(content)
    raw = tmp_path / "raw.img"
    shutil.copyfile(snap, raw)
    with harness.mounted(kcopy, tmp_path / "k.mnt", options="ro") as (_d, kmnt):
        kernel_tree = _tree(kmnt)
    with harness.mounted(ours, tmp_path / "o.mnt", options="noload", read_only=True) as (_d, omnt):
        our_tree = _tree(omnt)
    with harness.mounted(raw, tmp_path / "r.mnt", options="noload", read_only=True) as (_d, rmnt):
        raw_tree = _tree(rmnt)
    assert our_tree == kernel_tree
    assert raw_tree != kernel_tree, "the unreplayed copy already shows everything"


def test_clean_journal_replays_nothing(kernel: None, tmp_path: Path) -> None:
    image = harness.mkfs(tmp_path / "c.img", size_mb=16, block_size=1024, extra=["-J", "size=1"])
    with harness.mounted(image, tmp_path / "mnt") as (_dev, mnt):
        _workload(mnt, random.Random(1), 5, False)
    assert harness.dumpe2fs_header(image)["Journal start"] == "0"
    assert replay(_image_reader(image, 1024), _journal_map(image), 1024) == ({}, [])


# --- hostile journals -----------------------------------------------------


class _Blocks:
    """A mutable in-memory copy of a snapshot's journal blocks."""

    def __init__(self, snap: Path, bs: int) -> None:
        self.bs = bs
        self.jmap = _journal_map(snap)
        base = _image_reader(snap, bs)
        self.blocks = {b: bytearray(base(b)) for b in self.jmap}
        self.base = base

    def read(self, n: int) -> bytes:
        if n in self.blocks:
            return bytes(self.blocks[n])
        return self.base(n)

    def log(self, i: int) -> bytearray:
        return self.blocks[self.jmap[i]]


def _log_blocks_of_type(blocks: _Blocks, blocktype: int) -> list[int]:
    found = []
    for i in range(1, len(blocks.jmap)):
        magic, btype, _seq = struct.unpack_from(">III", blocks.log(i), 0)
        if magic == JBD2_MAGIC_NUMBER and btype == blocktype:
            found.append(i)
    return found


def _timed_replay(blocks: _Blocks) -> tuple[dict[int, bytes], list[str]]:
    t0 = time.monotonic()
    result = replay(blocks.read, blocks.jmap, blocks.bs)
    assert time.monotonic() - t0 < 10
    return result


def test_bad_superblock_raises(snapshots) -> None:
    snap, bs, _ = snapshots("csum_v3")
    blocks = _Blocks(snap, bs)
    blocks.log(0)[0:4] = b"\0\0\0\0"
    with pytest.raises(CorruptError):
        replay(blocks.read, blocks.jmap, bs)
    blocks = _Blocks(snap, bs)
    blocks.log(0)[0x20] ^= 1  # s_errno: the superblock checksum no longer matches
    with pytest.raises(CorruptError):
        replay(blocks.read, blocks.jmap, bs)
    with pytest.raises(CorruptError):
        replay(blocks.read, blocks.jmap[:10], bs)
    with pytest.raises(CorruptError):
        replay(blocks.read, [], bs)


def test_damaged_commit_stops_replay(snapshots) -> None:
    snap, bs, _ = snapshots("csum_v3")
    full, _ = replay(_image_reader(snap, bs), _journal_map(snap), bs)
    blocks = _Blocks(snap, bs)
    jsb = journal.parse_journal_superblock(blocks.log(0), bs, len(blocks.jmap))
    j = journal._Journal(blocks.read, blocks.jmap, bs, jsb)
    committed, _ = journal._scan(j, [])
    # Random bytes over the first data block of the second-to-last transaction
    # break its tag checksum; over its commit block, the commit checksum.
    victim = committed[-2]
    rng = random.Random(5)
    commit_pos = j.wrap(victim.tags[-1].log_block + 1)
    while struct.unpack_from(">I", blocks.log(commit_pos), 4)[0] != JBD2_COMMIT_BLOCK:
        commit_pos = j.wrap(commit_pos + 1)
    blocks.log(commit_pos)[16:] = rng.randbytes(bs - 16)
    overlay, warnings = _timed_replay(blocks)
    assert any("bad checksum" in w for w in warnings)
    assert overlay != full


def test_damaged_data_block_is_skipped(snapshots) -> None:
    snap, bs, _ = snapshots("csum_v3")
    blocks = _Blocks(snap, bs)
    jsb = journal.parse_journal_superblock(blocks.log(0), bs, len(blocks.jmap))
    j = journal._Journal(blocks.read, blocks.jmap, bs, jsb)
    committed, _ = journal._scan(j, [])
    tag = committed[-1].tags[0]
    data = blocks.log(tag.log_block)
    data[100:200] = bytes(b ^ 0xFF for b in data[100:200])
    overlay, warnings = _timed_replay(blocks)
    assert any("checksum mismatch" in w and str(tag.fs_block) in w for w in warnings)
    # The damaged copy is not replayed: the block keeps the newest older
    # copy the journal holds, or, with none, its home location.
    older = [
        other
        for t in committed
        for other in t.tags
        if other.fs_block == tag.fs_block and other is not tag
    ]
    assert overlay.get(tag.fs_block) != bytes(data)
    if older:
        want = bytearray(blocks.log(older[-1].log_block))
        if older[-1].flags & JBD2_FLAG_ESCAPE:
            want[0:4] = struct.pack(">I", JBD2_MAGIC_NUMBER)
        assert overlay.get(tag.fs_block) == bytes(want)
    else:
        assert tag.fs_block not in overlay


def test_absurd_descriptor_terminates(snapshots) -> None:
    snap, bs, _ = snapshots("no_csum_32bit")
    blocks = _Blocks(snap, bs)
    jsb = journal.parse_journal_superblock(blocks.log(0), bs, len(blocks.jmap))
    j = journal._Journal(blocks.read, blocks.jmap, bs, jsb)
    first_data = journal._scan(j, [])[0][0].tags[0].log_block
    # The descriptor precedes its first data block, across the ring's wrap.
    first_desc = first_data - 1 if first_data > j.first else j.last - 1
    assert struct.unpack_from(">I", blocks.log(first_desc), 4)[0] == JBD2_DESCRIPTOR_BLOCK
    desc = blocks.log(first_desc)
    # As many tags as fit, none the last, all SAME_UUID: a descriptor of
    # (bs - 12) / 8 blocks that ends in whatever follows.
    for off in range(12, bs - 8 + 1, 8):
        struct.pack_into(">IHH", desc, off, 0xFFFFFFFF, 0, JBD2_FLAG_SAME_UUID)
    overlay, _warnings = _timed_replay(blocks)
    assert overlay == {}


def _synthetic_journal(bs: int, maxlen: int) -> _Blocks:
    """A v2 journal without features, every block fillable by the test."""
    blocks = _Blocks.__new__(_Blocks)
    blocks.bs = bs
    blocks.jmap = list(range(1000, 1000 + maxlen))
    blocks.blocks = {b: bytearray(bs) for b in blocks.jmap}
    blocks.base = lambda n: bytes(bs)
    sb = blocks.log(0)
    struct.pack_into(">III", sb, 0, JBD2_MAGIC_NUMBER, JBD2_SUPERBLOCK_V2, 0)
    struct.pack_into(">IIIII", sb, 0x0C, bs, maxlen, 1, 7, 1)  # sequence 7 from block 1
    return blocks


def _descriptor(seq: int, tags: list[tuple[int, int]], bs: int) -> bytearray:
    block = bytearray(bs)
    struct.pack_into(">III", block, 0, JBD2_MAGIC_NUMBER, JBD2_DESCRIPTOR_BLOCK, seq)
    off = 12
    for i, (fs_block, flags) in enumerate(tags):
        if i == len(tags) - 1:
            flags |= JBD2_FLAG_LAST_TAG
        struct.pack_into(">IHH", block, off, fs_block, 0, flags | JBD2_FLAG_SAME_UUID)
        off += 8
    return block


def _commit(seq: int, bs: int) -> bytearray:
    block = bytearray(bs)
    struct.pack_into(">III", block, 0, JBD2_MAGIC_NUMBER, JBD2_COMMIT_BLOCK, seq)
    return block


def test_cyclic_log_terminates() -> None:
    bs, maxlen = 1024, 64
    blocks = _synthetic_journal(bs, maxlen)
    # Every log block a one-tag descriptor of transaction 7, never committed:
    # the kernel's walk would circle forever.
    for i in range(1, maxlen):
        blocks.blocks[blocks.jmap[i]][:] = _descriptor(7, [(5, 0)], bs)
    overlay, warnings = _timed_replay(blocks)
    assert overlay == {}
    assert any("whole journal" in w for w in warnings)


def test_synthetic_wrap_escape_and_revoke() -> None:
    """A log crossing the end of the ring, an escaped block and a revoke.

    The kernel-made journals above cover these too; this pins each rule on
    a log small enough to reason about.
    """
    bs, maxlen = 1024, 16
    blocks = _synthetic_journal(bs, maxlen)
    struct.pack_into(">I", blocks.log(0), 0x1C, 13)  # s_start near the end of the ring
    content = {n: bytes([n]) * bs for n in range(1, 10)}
    escaped = MAGIC + content[3][4:]

    def put(i: int, block: bytes) -> None:
        blocks.blocks[blocks.jmap[i]][:] = block

    # Transaction 7: blocks 13..15 then 1..: descriptor, 2 data, commit after wrap.
    put(13, _descriptor(7, [(100, 0), (101, JBD2_FLAG_ESCAPE)], bs))
    put(14, content[1])
    put(15, b"\0\0\0\0" + escaped[4:])
    put(1, _commit(7, bs))
    # Transaction 8: revoke 100, rewrite 102.
    revoke = bytearray(bs)
    struct.pack_into(">IIII", revoke, 0, JBD2_MAGIC_NUMBER, 5, 8, 20)
    struct.pack_into(">I", revoke, 16, 100)
    put(2, revoke)
    put(3, _descriptor(8, [(102, 0)], bs))
    put(4, content[2])
    put(5, _commit(8, bs))
    # Transaction 9 is torn: no commit block.
    put(6, _descriptor(9, [(103, 0)], bs))
    put(7, content[4])
    overlay, warnings = _timed_replay(blocks)
    assert warnings == []
    assert overlay == {101: escaped, 102: content[2]}


def test_random_damage_never_crashes(snapshots) -> None:
    snap, bs, _ = snapshots("csum_v1")
    rng = random.Random(11)
    base = _Blocks(snap, bs)
    jsb = journal.parse_journal_superblock(base.log(0), bs, len(base.jmap))
    for _ in range(40):
        blocks = _Blocks.__new__(_Blocks)
        blocks.bs, blocks.jmap, blocks.base = bs, base.jmap, base.base
        blocks.blocks = {b: bytearray(v) for b, v in base.blocks.items()}
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(jsb.s_first, jsb.log_end)
            off = rng.randrange(bs)
            blocks.log(i)[off : off + 8] = rng.randbytes(8)
        if rng.random() < 0.2:
            blocks.log(0)[rng.randrange(0x60)] ^= 0xFF
        try:
            _timed_replay(blocks)
        except CorruptError:
            pass


def test_crc32_be_matches_bitwise_definition() -> None:
    def slow(crc: int, data: bytes) -> int:
        for byte in data:
            crc ^= byte << 24
            for _ in range(8):
                crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
        return crc

    rng = random.Random(2)
    for n in (0, 1, 7, 100, 1024):
        data = rng.randbytes(n)
        seed = rng.getrandbits(32)
        assert crc32_be(seed, data) == slow(seed, data)
    assert crc32c(0xFFFFFFFF, b"") == 0xFFFFFFFF
