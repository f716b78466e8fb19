"""Incremental backups of the view with rsync: only what the owner changed moves.

An admin runs `rsync -aHAX` over a freshly mounted view every night.  For
that to be incremental, an unchanged entry must look the same in every
mount (name, inode number, size, times, xattrs, contents), and a file the
owner modifies in place must keep its no-key name and show up as the one
transfer.  The kernel writes and encrypts; rsync's own itemized output says
what it transferred.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import harness, trees
from tests.harness_restore import walk
from tests.harness_view import CLI, view_mount

BLOCK = 4096
CHANGED = "enc/sizes/f33"
#: An itemized change line of rsync -i: YXcstpoguax then the path.
ITEMIZED = re.compile(r"^([<>ch.*][fdLDS][.+cstpoguaxn? ]{9}) (.*)$")


@dataclass
class Source:
    image: Path
    v2_key: Path
    v1_key: Path
    changed_ino: int


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    harness.require_fuse()
    base = tmp_path_factory.mktemp("incr")
    image = harness.mkfs(base / "src.img", size_mb=32, block_size=BLOCK)
    v2_key, v1_key = base / "v2.key", base / "v1.key"
    v2_key.write_bytes(trees.TEST_KEY_V2)
    v1_key.write_bytes(trees.TEST_KEY_V1)
    with harness.mounted(image, base / "src.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            (mnt / "plain").mkdir()
            (mnt / "plain" / "readme").write_bytes(b"not encrypted\n")
            (mnt / "enc").mkdir()
            trees.POLICY["v2"].apply(mnt / "enc", keys)
            trees.write_tree(mnt / "enc", BLOCK, small=True)
            (mnt / "enc1").mkdir()
            trees.POLICY["v1"].apply(mnt / "enc1", keys)
            (mnt / "enc1" / "file").write_bytes(b"v1 file\n")
            changed_ino = os.stat(mnt / CHANGED).st_ino
            trees.stamp_mtimes(mnt)
            trees.lock(mnt, keys)
    return Source(image, v2_key, v1_key, changed_ino)


def rsync_itemized(view: Path, dest: Path) -> list[tuple[str, str]]:
    proc = subprocess.run(
        ["rsync", "-aHAX", "-i", f"{view}/", os.fspath(dest)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = []
    for line in proc.stdout.splitlines():
        m = ITEMIZED.match(line)
        assert m, f"unexpected rsync output: {line!r}"
        lines.append((m.group(1), m.group(2)))
    return lines


def path_of_ino(listing: dict[str, tuple], ino: int) -> str:
    found = [p for p, t in listing.items() if t[0] == ino]
    assert len(found) == 1, found
    return found[0]


def test_unchanged_entries_are_stable_across_remounts(source: Source, tmp_path: Path) -> None:
    with view_mount(source.image, tmp_path / "v1") as v:
        first = trees.listing(v.mountpoint)
    with view_mount(source.image, tmp_path / "v2") as v:
        second = trees.listing(v.mountpoint)
    assert len(first) > 50
    assert sorted(first) == sorted(second)
    assert first == second


def test_rsync_transfers_only_the_file_the_owner_changed(source: Source, tmp_path: Path) -> None:
    image = tmp_path / "img"
    harness.run("cp", "--sparse=always", source.image, image)
    backup = tmp_path / "backup"
    backup.mkdir()
    # rsync compares times to the second: a destination made within the
    # same second as the image's root would not be itemized as ".".
    os.utime(backup, (0, 0))

    with view_mount(image, tmp_path / "view") as v:
        before = trees.listing(v.mountpoint)
        first = rsync_itemized(v.mountpoint, backup)
    # Every entry once, and the root; "NAME => FIRST" for hard links, "NAME -> TARGET"
    # for symlinks (no-key names and view targets never hold spaces).
    names = [n.split(" ")[0].rstrip("/") for _, n in first]
    assert sorted(names) == sorted([".", *before])

    with view_mount(image, tmp_path / "view") as v:
        second = rsync_itemized(v.mountpoint, backup)
    assert second == []

    with harness.mounted(image, tmp_path / "ext4") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            with open(mnt / CHANGED, "r+b") as f:
                f.seek(3)
                f.write(b"CHANGED")
            assert os.stat(mnt / CHANGED).st_ino == source.changed_ino
            plaintext = walk(mnt)
            trees.lock(mnt, keys)

    with view_mount(image, tmp_path / "view") as v:
        after = trees.listing(v.mountpoint)
        third = rsync_itemized(v.mountpoint, backup)
    changed = path_of_ino(before, source.changed_ino)
    # Modified in place: same no-key name, same inode; nothing else moved.
    assert path_of_ino(after, source.changed_ino) == changed
    assert sorted(after) == sorted(before)
    assert {p for p in before if before[p] != after[p]} == {changed}
    assert len(third) == 1, third
    flags, name = third[0]
    assert flags.startswith(">f") and name == changed

    dest = tmp_path / "restored"
    proc = subprocess.run(
        [
            *CLI,
            "decrypt",
            "--key",
            source.v2_key,
            "--v1-key",
            f"{trees.TEST_KEY_V1_DESCRIPTOR.hex()}={source.v1_key}",
            backup,
            dest,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = walk(dest)
    assert sorted(got) == sorted(plaintext)
    for rel, node in plaintext.items():
        assert got[rel] == node, rel
    data = (dest / CHANGED).read_bytes()
    assert data[3:10] == b"CHANGED" and len(data) == 33
