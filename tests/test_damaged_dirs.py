"""Damaged directory blocks are reported, never a silently shorter listing.

The kernel makes the directories; single blocks of them are then damaged
where debugfs says they are.  Through the view, `tar` and `rsync` must
either see every entry or fail naming the directory; the kernel's own
read-only mount of the same image is the oracle for what must fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciphertextfs.ext4 import dirent
from tests import harness
from tests.harness_view import daemon_pids, run_cli, stop_view

DIRS = 20
FILES = 120
FEATURES = ("encrypt", "metadata_csum", "dir_index")


def fname(i: int) -> str:
    return f"file-{i:03d}-" + "x" * 30


def blocks_of(image: Path, path: str) -> list[int]:
    out = harness.run("debugfs", "-R", f"blocks {path}", image)
    return [int(x) for x in out.split()]


def poke(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


@contextlib.contextmanager
def view(image: Path, mnt: Path, log: Path) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    proc = run_cli("mount", "--log", log, image, mnt)
    pid = None
    try:
        assert proc.returncode == 0, proc.stderr
        (pid,) = daemon_pids(mnt)
        yield mnt
    finally:
        stop_view(mnt, pid)


def make_image(ext4, tmp_path: Path) -> Path:
    with ext4(features=FEATURES, size_mb=32) as (image, _dev, mnt):
        for d in range(DIRS):
            sub = mnt / f"d{d:02d}"
            sub.mkdir()
            for i in range(FILES):
                (sub / fname(i)).write_bytes(b"")
        (mnt / "intact").mkdir()
        for i in range(FILES):
            (mnt / "intact" / fname(i)).write_bytes(b"")
    return image


# Where in a leaf block the 4 bytes go, and what they become: entry
# headers (inode, rec_len, name_len), names, the middle, the checksum tail.
TARGETS = [0, 4, 6, 8, 12, 48, 52, 54, 100, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]
TARGETS += [4080, 4084, 4092]


def test_damaged_directory_blocks_are_reported(ext4, tmp_path: Path) -> None:
    image = make_image(ext4, tmp_path)
    rng = random.Random(8)
    for d in range(DIRS):
        blocks = blocks_of(image, f"/d{d:02d}")
        assert len(blocks) >= 2, blocks  # an htree: a dx root and leaves
        leaf = blocks[1 + d % (len(blocks) - 1)]
        poke(image, leaf * 4096 + TARGETS[d], rng.randbytes(4))

    expected = {fname(i) for i in range(FILES)}
    log = tmp_path / "view.log"
    with view(image, tmp_path / "view", log) as mnt:
        tar = subprocess.run(
            ["tar", "-cf", tmp_path / "out.tar", "-C", mnt, "."],
            capture_output=True,
            text=True,
            timeout=120,
        )
        rsync = subprocess.run(
            ["rsync", "-a", f"{mnt}/", tmp_path / "rsync"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Sound entries first, then EIO; lookups of absent names: EIO.
        partial = 0
        for d in range(DIRS):
            names: list[str] = []
            p = mnt / f"d{d:02d}"
            try:
                with os.scandir(p) as it:
                    for e in it:
                        names.append(e.name)
            except OSError as err:
                assert err.errno == errno.EIO
                partial += 0 < len(names) < FILES
                try:
                    os.stat(p / "no-such-name")
                except OSError as err2:
                    assert err2.errno == errno.EIO
            else:
                assert set(names) == expected
        try:
            os.stat(mnt / "intact" / "no-such-name")
        except FileNotFoundError:
            pass
    with tarfile.open(tmp_path / "out.tar") as t:
        members = t.getnames()
    reported = set()
    for d in range(DIRS):
        name = f"d{d:02d}"
        in_tar = {m.split("/")[-1] for m in members if m.startswith(f"./{name}/")}
        in_rsync = {p.name for p in (tmp_path / "rsync" / name).iterdir()}
        if in_tar != expected:
            assert tar.returncode != 0 and f"./{name}" in tar.stderr, (name, tar.stderr)
            reported.add(name)
        if in_rsync != expected:
            assert rsync.returncode != 0 and f"/{name}" in rsync.stderr, (name, rsync.stderr)
    intact = {m.split("/")[-1] for m in members if m.startswith("./intact/")}
    assert intact == expected
    # metadata_csum: every one of these damages is detectable, and is found.
    assert len(reported) == DIRS, sorted(set(f"d{d:02d}" for d in range(DIRS)) - reported)
    assert partial > 0, "no damaged directory listed its sound entries first"
    text = log.read_text()
    assert "bad directory: directory inode" in text and " block " in text, text[-2000:]

    # The kernel, on the same image: whatever it fails, the view reported.
    kernel_failed = set()
    with harness.mounted(image, tmp_path / "kmnt", options="noload", read_only=True) as (_, km):
        for d in range(DIRS):
            ls = subprocess.run(["ls", "-f", km / f"d{d:02d}"], capture_output=True, text=True)
            if ls.returncode != 0:
                assert "Bad message" in ls.stderr or "Structure needs cleaning" in ls.stderr
                kernel_failed.add(f"d{d:02d}")
    assert kernel_failed <= reported
    assert kernel_failed, "the kernel found no damage: the corruptions missed"


def test_six_bytes_in_the_root_block(ext4, tmp_path: Path) -> None:
    """The issue's case: an empty view and tar exit 0 before."""
    with ext4(features=FEATURES, size_mb=16) as (image, _dev, mnt):
        for i in range(20):
            (mnt / fname(i)).write_bytes(b"x")
    (root_block,) = blocks_of(image, "/")
    poke(image, root_block * 4096 + 24, bytes(6))  # the entry after "." and ".."
    with view(image, tmp_path / "view", tmp_path / "log") as mnt:
        tar = subprocess.run(
            ["tar", "-cf", "/dev/null", "-C", mnt, "."], capture_output=True, text=True
        )
        rsync = subprocess.run(
            ["rsync", "-a", f"{mnt}/", tmp_path / "r"], capture_output=True, text=True
        )
    assert tar.returncode != 0 and "Input/output error" in tar.stderr, tar.stderr
    assert rsync.returncode != 0 and "Input/output error" in rsync.stderr, rsync.stderr
    with harness.mounted(image, tmp_path / "kmnt", options="noload", read_only=True) as (_, km):
        ls = subprocess.run(["ls", "-f", km], capture_output=True, text=True)
    assert ls.returncode != 0, ls.stdout


def test_htree_root_checksum_is_checked_where_the_kernel_puts_it(ext4, tmp_path: Path) -> None:
    """The dx_root's checksum covers its dx entries, found past dx_root_info's info_length.

    A kernel-made htree reads without a checksum warning; one changed hash in
    the root's dx entries is the one warning, where e2fsck -fn (the oracle)
    also finds the directory damaged.  The listing itself stays whole: leaves
    are read without the index.
    """
    from ciphertextfs.ext4.dirent import DX_ROOT_COUNT_OFFSET
    from ciphertextfs.ext4.fs import Filesystem

    with ext4(features=FEATURES, size_mb=16) as (image, _dev, mnt):
        (mnt / "big").mkdir()
        for i in range(FILES):
            (mnt / "big" / fname(i)).write_bytes(b"")

    def read_big() -> tuple[set[str], list[str]]:
        with Filesystem.open(image) as fs:
            root = fs.inode(2)
            (big,) = [e for e in fs.read_dir(root) if e.name == b"big"]
            entries, damage = fs.read_dir_checked(fs.inode(big.inode))
            return {e.name.decode() for e in entries}, [*damage, *fs.warnings]

    names, warnings = read_big()
    assert names == {fname(i) for i in range(FILES)}
    assert warnings == []
    assert subprocess.run(["e2fsck", "-fn", image], capture_output=True).returncode == 0

    root_block = blocks_of(image, "/big")[0]
    count = int.from_bytes(
        Path(image).read_bytes()[
            root_block * 4096 + DX_ROOT_COUNT_OFFSET + 2 : root_block * 4096
            + DX_ROOT_COUNT_OFFSET
            + 4
        ],
        "little",
    )
    assert count >= 2  # a second dx entry, whose hash is poked
    poke(image, root_block * 4096 + DX_ROOT_COUNT_OFFSET + 8, b"\x01\x02\x03\x04")
    names, warnings = read_big()
    assert names == {fname(i) for i in range(FILES)}
    assert len(warnings) == 1 and "htree block checksum mismatch" in warnings[0], warnings
    assert subprocess.run(["e2fsck", "-fn", image], capture_output=True).returncode != 0


def test_an_unreadable_block_costs_that_block_only(ext4, tmp_path: Path) -> None:
    """A directory's extent is read in one request; when that fails (here the
    image ends inside it), every block before the bad one is still listed
    and the bad one is named."""
    from ciphertextfs.ext4.fs import Filesystem

    names = {f"entry-{i:04d}-" + "y" * 80 for i in range(300)}
    with ext4(features=("^dir_index",), size_mb=32) as (image, _dev, mnt):
        (mnt / "wide").mkdir()
        for n in sorted(names):
            (mnt / "wide" / n).write_bytes(b"")
    blocks = blocks_of(image, "/wide")
    assert len(blocks) >= 4 and blocks == list(range(blocks[0], blocks[0] + len(blocks)))

    with Filesystem.open(image) as fs:
        wide = next(e.inode for e in fs.read_dir(fs.inode(2)) if e.name == b"wide")
        last = fs.read_block(blocks[-1], cache=False)
        common = {"block_size": 4096, "inodes_count": fs.sb.s_inodes_count, "filetype": True}
        lost = dirent.parse_entries(last, hashed=False, what="", warn=print, **common)
        assert lost, "the last directory block holds no entries"
    with open(image, "r+b") as f:
        f.truncate(blocks[-1] * 4096 + 2048)

    with Filesystem.open(image) as fs:
        entries, damage = fs.read_dir_checked(fs.inode(wide))
    listed = {e.name.decode() for e in entries}
    assert listed == names - {e.name.decode() for e in lost}
    assert len(damage) == 1 and f"block {len(blocks) - 1}: cannot be read" in damage[0], damage


@pytest.mark.parametrize(
    "bad, why",
    [
        (struct.pack("<IHBB", 0, 8, 0, 0), "rec_len 8 too small"),
        (struct.pack("<IHBB", 13, 14, 1, 1) + b"x" * 6, "rec_len 14 not a multiple of 4"),
        (struct.pack("<IHBB", 13, 12, 9, 1) + b"x" * 4, "too small for name_len 9"),
        (struct.pack("<IHBB", 13, 4096, 1, 1) + b"x" * 4, "runs past the block"),
        (struct.pack("<IHBB", 1001, 12, 1, 1) + b"x" * 4, "inode 1001 out of range"),
    ],
)
def test_a_bad_entry_ends_its_block_with_the_reason(bad: bytes, why: str) -> None:
    """Each of the kernel's checks (ext4_check_dir_entry), and the entries before it kept."""
    good = dirent.encode_entry(12, b"kept", dirent.EXT4_FT_REG_FILE, 12)
    after = dirent.encode_entry(14, b"lost", dirent.EXT4_FT_REG_FILE, 12)
    block = (good + bad + after).ljust(1024, b"\0")
    warnings: list[str] = []
    got = dirent.parse_entries(
        block,
        block_size=1024,
        inodes_count=1000,
        filetype=True,
        hashed=False,
        what="dir",
        warn=warnings.append,
    )
    assert [(e.inode, e.name) for e in got] == [(12, b"kept")]
    assert len(warnings) == 1 and why in warnings[0], warnings
