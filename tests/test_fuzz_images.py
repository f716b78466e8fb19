"""Crafted images: random damage to a kernel-made encrypted filesystem.

The e2fsprogs corpus holds the damage someone thought of; this test adds
damage nobody chose.  A small image written by the kernel (encrypted and
plain trees, htree directories, xattrs, symlinks) gets a few random bytes
changed in its used blocks -- superblock, descriptors, inode tables,
directories, extent and xattr blocks alike -- and is walked through the
reader and the view model in a subprocess with memory and time limits.
The base image differs from run to run (random file data, fscrypt nonces,
UUID), so a seed alone does not replay a failure: a failure names the
damaged image, which stays in pytest's temporary directory (the last three
runs are kept) to be walked again with `python -m tests.test_corpus IMAGE`.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import harness
from tests.test_corpus import WORKERS, run_walker
from tests.trees import POLICY, keys_added, lock, write_tree

SEEDS = range(60)
BLOCK = 1024


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    """The image's bytes and the indexes of its blocks that are not all zero."""
    harness.require_kernel()
    tmp = tmp_path_factory.mktemp("fuzz")
    image = harness.mkfs(tmp / "fs.img", size_mb=8, block_size=BLOCK, extra=["-N", "512"])
    with harness.mounted(image, tmp / "mnt") as (_, mnt):
        with keys_added(mnt) as keys:
            (mnt / "v2").mkdir()
            POLICY["v2"].apply(mnt / "v2", keys)
            write_tree(mnt / "v2", BLOCK, small=True)
            (mnt / "plain").mkdir()
            write_tree(mnt / "plain", BLOCK, small=True)
            lock(mnt, keys)
    data = image.read_bytes()
    used = [i for i in range(len(data) // BLOCK) if any(data[i * BLOCK : (i + 1) * BLOCK])]
    return data, used


def _mutate(data: bytes, used: list[int], seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for block in rng.sample(used, rng.randint(1, 3)):
        for _ in range(rng.randint(1, 8)):
            pos = block * BLOCK + rng.randrange(BLOCK)
            out[pos] = rng.choice(
                (0x00, 0xFF, rng.randrange(256), out[pos] ^ (1 << rng.randrange(8)))
            )
    return bytes(out)


def test_random_damage_costs_objects_not_the_walk(pristine, tmp_path: Path) -> None:
    data, used = pristine
    assert len(used) > 100
    images = []
    for seed in SEEDS:
        path = tmp_path / f"seed{seed}.img"
        path.write_bytes(_mutate(data, used, seed))
        images.append(path)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(SEEDS, pool.map(run_walker, images), strict=True))
    bad = {
        str(images[s]): r for s, r in results.items() if r["outcome"] not in ("walked", "not-ext4")
    }
    assert not bad, json.dumps(bad, indent=1)
    # The damage must reach objects the walk meets, or the test proves nothing.
    assert sum(int(r.get("corrupt", 0)) + int(r.get("view_eio", 0)) for r in results.values()) > 0
    assert sum(int(r.get("warnings", 0)) for r in results.values()) > 0
