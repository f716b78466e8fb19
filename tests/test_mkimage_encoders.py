"""The image writer's encoders against the reader's parsers and checksum checks.

Each layout is defined once in ciphertextfs.ext4; what the writer encodes
must parse back to the same values and verify with the reader's checks.
(e2fsck and the kernel judge the whole images in test_restore_image.py.)
"""

from __future__ import annotations

import os
import struct

import pytest

from ciphertextfs.ext4.acl import ext4_acl_to_posix, posix_acl_to_ext4
from ciphertextfs.ext4.dirent import (
    DX_ROOT_COUNT_OFFSET,
    EXT4_FT_DIR,
    EXT4_FT_REG_FILE,
    dx_checksum_ok,
    encode_dx_root,
    encode_leaf_block,
    leaf_checksum_ok,
    pack_leaf_blocks,
    parse_entries,
)
from ciphertextfs.ext4.extents import Mapping, encode_header, encode_leaf
from ciphertextfs.ext4.inode import (
    EXT4_EXTENTS_FL,
    encode_inode,
    encode_rdev,
    ibody_xattr_space,
    inode_checksum_ok,
    parse_inode,
)
from ciphertextfs.ext4.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, parse_superblock
from ciphertextfs.ext4.xattr import (
    Xattr,
    block_checksum_ok,
    block_entries,
    ea_inode_entry_hash,
    encode_block,
    encode_ibody,
    entry_hash,
    ibody_entries,
)
from tests import harness


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory):
    image = harness.mkfs(tmp_path_factory.mktemp("enc") / "sb.img", size_mb=8)
    with open(image, "rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        return parse_superblock(f.read(SUPERBLOCK_SIZE))


def test_inode_round_trip(sb) -> None:
    times = (-7, (1 << 33) * 10**9 + 123456789, -(1 << 31) * 10**9)
    ibody = encode_ibody([Xattr(9, b"c", bytes(range(40)))], ibody_xattr_space(sb.inode_size))
    raw = encode_inode(
        sb.inode_size,
        mode=0o100640,
        uid=70000,
        gid=80000,
        size=(5 << 32) + 17,
        links=3,
        flags=EXT4_EXTENTS_FL,
        atime_ns=times[0],
        mtime_ns=times[1],
        ctime_ns=times[2],
        crtime_ns=times[2],
        i_block=(encode_header(1, 4, 0) + encode_leaf([Mapping(0, 1 << 33, 9, False)])).ljust(
            60, b"\0"
        ),
        i_blocks=72,
        file_acl=(1 << 40) + 5,
        ibody_xattrs=ibody,
    )
    ino = parse_inode(sb, 12, raw)
    assert (ino.i_mode, ino.i_uid, ino.i_gid, ino.i_links_count) == (0o100640, 70000, 80000, 3)
    assert ino.i_size == (5 << 32) + 17
    assert (ino.i_atime_ns, ino.i_mtime_ns, ino.i_ctime_ns) == times
    assert ino.i_file_acl == (1 << 40) + 5
    assert ino.i_blocks == 72
    (x,) = ibody_entries(raw, ino.i_extra_isize, "t", False)
    assert (x.name_index, x.name, x.value) == (9, b"c", bytes(range(40)))
    # The checksum is libext2fs' job; a zero checksum must not verify.
    assert not inode_checksum_ok(ino, sb.csum_seed)


@pytest.mark.parametrize("dev", [(1, 3), (7, 200), (259, 70000)])
def test_rdev_round_trip(sb, dev: tuple[int, int]) -> None:
    raw = encode_inode(
        sb.inode_size, mode=0o20600, uid=0, gid=0, size=0, links=1, flags=0, atime_ns=0,
        mtime_ns=0, ctime_ns=0, crtime_ns=0, i_block=encode_rdev(*dev), i_blocks=0,
    )  # fmt: skip
    assert parse_inode(sb, 13, raw).rdev == dev


def test_xattr_block_round_trip_sorted_hashed_and_checksummed() -> None:
    xs = [Xattr(1, b"zeta", b"1"), Xattr(6, b"selinux", b"ctx\0"), Xattr(1, b"ab", bytes(300))]
    seed = 0x12345678
    block = encode_block(xs, 4096, 777, seed)
    got = block_entries(block, "t", False)
    assert [(e.name_index, e.name, e.value) for e in got] == [
        (1, b"ab", bytes(300)),
        (1, b"zeta", b"1"),
        (6, b"selinux", b"ctx\0"),
    ]
    assert block_checksum_ok(block, 777, seed)
    assert not block_checksum_ok(block, 778, seed)
    (h,) = struct.unpack_from("<I", block, 32 + 12)
    assert h == entry_hash(b"ab", bytes(300)) != 0


def test_ea_inode_references_parse_back_in_block_and_inode() -> None:
    """An entry naming an EA inode carries no value here, its size, and the
    hash fed with the value's crc32c; the reader follows the inode number."""
    xs = [Xattr(1, b"big", os.urandom(9000)), Xattr(1, b"small", b"1")]
    refs = {(1, b"big"): (4242, 0xDEADBEEF)}
    block = encode_block(xs, 4096, 5, None, refs)
    ibody = bytes(128 + 32) + encode_ibody(xs, 96, refs)
    for entries, big_at in (
        (block_entries(block, "t", True), (block, 32)),
        (ibody_entries(ibody, 32, "t", True), (ibody, 128 + 32 + 4)),
    ):
        by_name = {e.name: e for e in entries}
        big = by_name[b"big"]
        assert (big.value_inum, big.value_size, big.value) == (4242, 9000, b"")
        assert by_name[b"small"].value == b"1"
        (h,) = struct.unpack_from("<I", big_at[0], big_at[1] + 12)
        assert h == ea_inode_entry_hash(b"big", 0xDEADBEEF) != entry_hash(b"big", b"")
    with pytest.raises(ValueError):
        encode_block(xs, 4096, 5, None)


def test_directory_blocks_parse_and_verify() -> None:
    names = [(100 + i, os.urandom(1 + i % 255), EXT4_FT_REG_FILE) for i in range(300)]
    entries = [(2, b".", EXT4_FT_DIR), (2, b"..", EXT4_FT_DIR), *names]
    blocks = pack_leaf_blocks(entries, 1024, True)
    assert len(blocks) > 10
    seen = []
    for blk in blocks:
        raw = encode_leaf_block(blk, 1024, 99)
        assert len(raw) == 1024
        assert leaf_checksum_ok(raw, 99)
        warnings: list[str] = []
        got = parse_entries(
            raw[:-12], block_size=1024, inodes_count=1 << 20, filetype=True, hashed=False,
            what="t", warn=warnings.append,
        )  # fmt: skip
        assert not warnings
        seen += [(e.inode, e.name, e.file_type) for e in got]
    assert seen == names


def test_dx_root_verifies() -> None:
    root = encode_dx_root(2, 2, 1, 0, [(0, 1), (0x1000, 2), (0x8000, 3)], 4096, 5)
    assert dx_checksum_ok(root, DX_ROOT_COUNT_OFFSET, 5)
    assert not dx_checksum_ok(root, DX_ROOT_COUNT_OFFSET, 6)


def test_acl_round_trip() -> None:
    posix = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, i)
        for tag, perm, i in (
            (0x01, 6, 0xFFFFFFFF),
            (0x02, 4, 1234),
            (0x04, 4, 0xFFFFFFFF),
            (0x08, 6, 4321),
            (0x10, 6, 0xFFFFFFFF),
            (0x20, 0, 0xFFFFFFFF),
        )
    )
    disk = posix_acl_to_ext4(posix)
    assert len(disk) == 4 + 4 * 4 + 2 * 8
    assert ext4_acl_to_posix(disk) == posix
