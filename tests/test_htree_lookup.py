"""Lookups through the htree answer exactly what the directory's listing answers;
listings are charged what they hold.

The directories are made by the kernel (big enough for an htree, with
1 KiB blocks deep enough for dx nodes), plain and encrypted under v1 and v2
policies, with short names and names whose ciphertext is longer than 149
bytes (no-key names with a SHA-256 tail).  The listing, which reads every
block, is the oracle for each lookup; then copies of the image get a
damaged dx node or leaf and no lookup may give an inode the listing would
not, nor anything but that inode, ENOENT/EIO.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import tracemalloc
import uuid
from pathlib import Path

import pytest

from ciphertextfs.ext4 import dirent
from ciphertextfs.ext4.directory import IndexInconclusive
from ciphertextfs.ext4.dirhash import DX_HASH_HALF_MD4, ext4fs_dirhash
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import EXT4_INDEX_FL
from ciphertextfs.fscrypt.nokey import base64url_decode, base64url_encode
from ciphertextfs.view import model
from ciphertextfs.view.model import DirectoryDamaged, View, ViewNotFound
from ciphertextfs.view.names import (
    SIDE_FILE_NAME,
    list_directory,
    listing_bytes,
    lookup_in_index,
)
from ciphertextfs.view.symlinks import SymlinkTargets
from tests import harness
from tests.trees import POLICY, keys_added, lock

VARIANTS = {
    "4k": (4096, ("encrypt",)),
    "1k": (1024, ("encrypt",)),
    "1k-no-csum": (1024, ("encrypt", "^metadata_csum")),
}
COUNT = 2500


def _name(i: int) -> str:
    """Mostly short names, every seventh one long enough for a lossy no-key name."""
    base = f"{i:05d}-{'n' * (i % 23)}"
    return (base + "L" * 200)[:230] if i % 7 == 0 else base


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def image(request, tmp_path_factory):
    """Yields (image, {dir: inode number}, uses_csum)."""
    harness.require_kernel()
    block_size, features = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(f"lookup-{request.param}")
    img = harness.mkfs(tmp / "fs.img", size_mb=64, block_size=block_size, features=features)
    dirs = {}
    with harness.mounted(img, tmp / "mnt") as (_, mnt):
        with keys_added(mnt) as keys:
            for name in ("plain", "v1", "v2"):
                d = mnt / name
                d.mkdir()
                if name != "plain":
                    POLICY[name].apply(d, keys)
                for i in range(COUNT):
                    (d / _name(i)).touch()
                dirs[name] = os.stat(d).st_ino
            lock(mnt, keys)
    yield img, dirs, "^metadata_csum" not in features


def _listing_answers(img: Path, ino: int) -> dict[bytes, int]:
    with Filesystem.open(str(img)) as fs:
        listing = View(fs).listing(ino)
        assert not listing.damage
        return dict(listing.by_name)


def _absent(names: list[bytes], encrypted: bool) -> list[bytes]:
    """Names that are not in the directory, the encrypted ones close to real ones."""
    out = [b"absent", b"x" * 255]
    for name in names[:40]:
        if not encrypted:
            out.append(name + b"~")
            continue
        raw = bytearray(base64url_decode(name))
        raw[0] ^= 0x04  # another hash
        out.append(base64url_encode(bytes(raw)).encode())
        raw[0] ^= 0x04
        raw[-1] ^= 0x01  # another ciphertext byte (or SHA-256 byte)
        out.append(base64url_encode(bytes(raw)).encode())
    return out


def test_every_name_through_the_index_equals_the_listing(image) -> None:
    img, dirs, _csum = image
    for rel, ino in dirs.items():
        expected = _listing_answers(img, ino)
        names = [n for n in expected if n != SIDE_FILE_NAME]
        assert len(names) == COUNT, rel
        with Filesystem.open(str(img)) as fs:
            inode = fs.inode(ino)
            assert inode.i_flags & EXT4_INDEX_FL, rel
            for name in names:
                # Through the index itself, not a fallback to the listing.
                assert lookup_in_index(fs, inode, name) == expected[name], (rel, name)
            view = View(fs)
            for name in names[::50]:
                assert view.lookup(ino, name) == expected[name], (rel, name)
            assert view._listings.get(ino) is None, "a lookup built the listing"
            if SIDE_FILE_NAME in expected:
                assert View(fs).lookup(ino, SIDE_FILE_NAME) == expected[SIDE_FILE_NAME]
            view = View(fs)
            for name in _absent(names, rel != "plain"):
                assert name not in expected
                assert lookup_in_index(fs, inode, name) is None, (rel, name)
                with pytest.raises(ViewNotFound):
                    view.lookup(ino, name)  # the first builds the listing, which says so


def test_the_tree_is_deep_where_blocks_are_small(image) -> None:
    """The 1 KiB variants must exercise dx nodes, or the node checks go untested."""
    img, dirs, _csum = image
    with Filesystem.open(str(img)) as fs:
        for ino in dirs.values():
            inode = fs.inode(ino)
            root = fs.read_block(fs.files.block_at(inode, 0))
            levels = dirent.parse_dx_root(root, 3).indirect_levels
            assert levels == (1 if fs.block_size == 1024 else 0)


def _dx_blocks(fs: Filesystem, ino: int) -> tuple[list[int], list[int]]:
    """Physical blocks of the dx nodes and of the leaves of a directory."""
    inode = fs.inode(ino)
    nodes, leaves = [], []
    for lblk in range(1, inode.i_size // fs.block_size):
        pblk = fs.files.block_at(inode, lblk)
        block = fs.read_block(pblk, cache=False)
        (nodes if dirent.is_dx_node_block(block, fs.block_size) else leaves).append(pblk)
    return nodes, leaves


def _damage(block: bytes, kind: str, rng: random.Random, off: int) -> bytes:
    """`off`: where dx_countlimit starts (a root or a node)."""
    b = bytearray(block)
    if kind == "garbage":
        b[16:-16] = rng.randbytes(len(b) - 32)
    elif kind == "dx-block-numbers":
        # Swap the leaves two dx entries point to (hashes intact).
        count = struct.unpack_from("<H", b, off + 2)[0]
        i, j = off + 8 + 4, off + 8 * (count - 1) + 4
        bi, bj = struct.unpack_from("<I", b, i)[0], struct.unpack_from("<I", b, j)[0]
        struct.pack_into("<I", b, i, bj)
        struct.pack_into("<I", b, j, bi)
    elif kind == "dx-count":
        struct.pack_into("<H", b, off + 2, 0xFFFF)
    elif kind == "dx-loop":
        count = struct.unpack_from("<H", b, off + 2)[0]
        for i in range(count):
            struct.pack_into("<I", b, off + 4 + 8 * i, 0)
    elif kind == "leaf-rec-len":
        struct.pack_into("<H", b, 4, 5)
    return bytes(b)


@pytest.mark.parametrize(
    "target,kind",
    [
        ("root", "dx-count"),
        ("root", "dx-loop"),
        ("root", "dx-block-numbers"),
        ("node", "dx-block-numbers"),
        ("node", "dx-count"),
        ("node", "garbage"),
        ("leaf", "leaf-rec-len"),
        ("leaf", "garbage"),
    ],
)
def test_damaged_index_gives_the_listing_answer_or_eio(image, tmp_path, target, kind) -> None:
    img, dirs, _csum = image
    rng = random.Random(f"{target}{kind}")
    for rel, ino in dirs.items():
        expected = _listing_answers(img, ino)
        bad = tmp_path / f"{rel}.img"
        shutil.copyfile(img, bad)
        with Filesystem.open(str(img)) as fs:
            nodes, leaves = _dx_blocks(fs, ino)
            bs = fs.block_size
            if target == "root":
                pblk = fs.files.block_at(fs.inode(ino), 0)
            elif target == "node":
                if not nodes:
                    continue  # one-level tree (4 KiB blocks)
                pblk = nodes[len(nodes) // 2]
            else:
                pblk = leaves[len(leaves) // 2]
            block = fs.read_block(pblk, cache=False)
        off = dirent.DX_ROOT_COUNT_OFFSET if target == "root" else dirent.DX_NODE_COUNT_OFFSET
        new = _damage(block, kind, rng, off)
        with open(bad, "r+b") as f:
            f.seek(pblk * bs)
            f.write(new)
        with Filesystem.open(str(bad)) as fs:
            damaged = View(fs).listing(ino)
        names = list(expected)
        probes = names[::5] + _absent(names[1:], rel != "plain")[:20]
        with Filesystem.open(str(bad)) as fs:
            inode = fs.inode(ino)
            for name in probes:
                want = damaged.by_name.get(name)
                try:
                    got = lookup_in_index(fs, inode, name)
                except IndexInconclusive:
                    continue  # the view asks the listing: `want` by construction
                if got is not None:  # a miss too asks the listing
                    assert got == want == expected[name], (rel, name)
            # Through the view, the listing's answer or EIO, never ENOENT for a name it has.
            for name in probes[:: max(1, len(probes) // 12)]:
                want = damaged.by_name.get(name)
                try:
                    got = View(fs).lookup(ino, name)
                except DirectoryDamaged as e:
                    assert e.errno == errno.EIO and want is None, (rel, name)
                    continue
                except ViewNotFound:
                    assert want is None, (rel, name, "ENOENT where the listing has it")
                    continue
                assert got == want == expected[name], (rel, name)


def test_not_indexed_directories_are_inconclusive(tmp_path) -> None:
    harness.require_kernel()
    img = harness.mkfs(tmp_path / "fs.img", features=("encrypt", "^dir_index"))
    with harness.mounted(img, tmp_path / "mnt") as (_, mnt):
        d = mnt / "d"
        d.mkdir()
        for i in range(300):
            (d / _name(i)).touch()
        ino = os.stat(d).st_ino
    expected = _listing_answers(img, ino)
    with Filesystem.open(str(img)) as fs:
        with pytest.raises(IndexInconclusive):
            lookup_in_index(fs, fs.inode(ino), b"00001-n")
        view = View(fs)
        for name, want in list(expected.items())[::13]:
            assert View(fs).lookup(ino, name) == want
        with pytest.raises(ViewNotFound):
            view.lookup(ino, b"absent")


def test_listing_charges_are_honest_and_the_cache_stays_within_its_bytes(image, monkeypatch):
    img, dirs, _csum = image
    with Filesystem.open(str(img)) as fs:
        charges = {}
        for rel, ino in dirs.items():
            fs.drop_caches()
            tracemalloc.start()
            listing = list_directory(fs, fs.inode(ino), ino, SymlinkTargets(fs))
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            charges[rel] = listing_bytes(listing)
            assert 0.7 * held <= charges[rel] <= 1.3 * held, (rel, held, charges[rel])
        bound = int(max(charges.values()) * 1.5)
        monkeypatch.setattr(model, "LISTING_CACHE_BYTES", bound)
        view = View(fs)
        for ino in dirs.values():
            view.listing(ino)
            assert view._listings.bytes <= bound
            assert view._listings.get(ino) is not None, "the newest listing is kept"
        assert len(view._listings) == 1, "two listings never fit in 1.5 of the biggest"
        monkeypatch.setattr(model, "LISTING_CACHE_BYTES", min(charges.values()) // 2)
        view = View(fs)
        first, second = list(dirs.values())[:2]
        assert view.listing(first).entries
        assert view._listings.get(first) is not None, "held alone, though bigger than the bound"
        assert view.listing(second).entries
        assert view._listings.get(first) is None and len(view._listings) == 1


COLLISION_SEED = "6c6f6f6b-7570-4000-8000-636f6c6c6973"
"""A fixed s_hash_seed, so that the names found to collide below collide on disk."""


def _colliding_pairs(seed: bytes) -> list[tuple[bytes, bytes]]:
    """Pairs of names with the same half_md4 hash (a birthday search)."""
    seen: dict[int, bytes] = {}
    pairs = []
    for i in range(1 << 18):
        name = b"c%07d-" % i + b"p" * 40
        h = ext4fs_dirhash(name, DX_HASH_HALF_MD4, seed)[0]
        if h in seen:
            pairs.append((seen[h], name))
        else:
            seen[h] = name
    return pairs


def _collision_bits(fs: Filesystem, inode) -> int:
    """How many dx entries carry the collision bit: a hash continued into the next leaf."""
    bits = 0
    for lblk in range(inode.i_size // fs.block_size):
        block = fs.read_block(fs.files.block_at(inode, lblk), cache=False)
        if lblk == 0:
            off = dirent.DX_ROOT_COUNT_OFFSET
        elif dirent.is_dx_node_block(block, fs.block_size):
            off = dirent.DX_NODE_COUNT_OFFSET
        else:
            continue
        count = struct.unpack_from("<H", block, off + 2)[0]
        bits += sum(struct.unpack_from("<I", block, off + 8 * i)[0] & 1 for i in range(1, count))
    return bits


def test_names_whose_hash_continues_into_the_next_leaf(tmp_path) -> None:
    harness.require_kernel()
    pairs = _colliding_pairs(uuid.UUID(COLLISION_SEED).bytes)
    assert len(pairs) > 10
    img = harness.mkfs(
        tmp_path / "fs.img",
        block_size=1024,
        features=("encrypt",),
        extra=("-E", f"hash_seed={COLLISION_SEED}"),
    )
    colliding = [n for p in pairs for n in p]
    fill = 3000
    with harness.mounted(img, tmp_path / "mnt") as (_, mnt):
        d = mnt / "d"
        d.mkdir()
        pending = list(colliding)
        for i in range(fill):
            (d / f"f{i:06d}-{'q' * 40}").touch()
            if i % (fill // len(pending)) == 0 and pending:
                (d / pending.pop().decode()).touch()
        for name in pending:
            (d / name.decode()).touch()
        ino = os.stat(d).st_ino
    expected = _listing_answers(img, ino)
    with Filesystem.open(str(img)) as fs:
        inode = fs.inode(ino)
        assert _collision_bits(fs, inode) > 0, "the kernel split no colliding pair"
        for name in colliding:
            assert lookup_in_index(fs, inode, name) == expected[name], name


def test_xattr_sets_are_charged_what_they_hold(image) -> None:
    img, dirs, _csum = image
    with Filesystem.open(str(img)) as fs:
        view = View(fs)
        inos = [e.ino for e in view.entries(dirs["v2"]) if e.name != SIDE_FILE_NAME]
        for ino in inos:
            view._xattrs(ino)  # the reader's inode and block caches warm, out of the measure
        view = View(fs)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        sets = [view._xattrs(ino) for ino in inos]
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        charged = sum(model.xattr_set_bytes(x) for x in sets)
        assert view._xattr_sets.bytes == charged
        assert 0.6 * held <= charged <= 1.4 * held, (held, charged)
