"""ext4fs_dirhash against e2fsprogs' debugfs and against htrees the kernel built.

debugfs's `dx_hash` runs e2fsprogs' own implementation of the same hashes;
the kernel oracle is stronger: it placed every name into the leaf whose hash
range contains the name's hash, so each name must hash into its leaf's range.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from ciphertextfs.ext4 import dirhash
from ciphertextfs.ext4.dirhash import (
    DX_HASH_HALF_MD4,
    DX_HASH_HALF_MD4_UNSIGNED,
    DX_HASH_LEGACY,
    DX_HASH_LEGACY_UNSIGNED,
    DX_HASH_TEA,
    DX_HASH_TEA_UNSIGNED,
    EXT2_FLAGS_SIGNED_HASH,
    EXT2_FLAGS_UNSIGNED_HASH,
    _finish,
    dx_hash_version,
    ext4fs_dirhash,
    python_dirhash,
)
from ciphertextfs.ext4.errors import CorruptError
from tests import harness

ALL_VERSIONS = [
    DX_HASH_LEGACY,
    DX_HASH_HALF_MD4,
    DX_HASH_TEA,
    DX_HASH_LEGACY_UNSIGNED,
    DX_HASH_HALF_MD4_UNSIGNED,
    DX_HASH_TEA_UNSIGNED,
]

# debugfs reads its commands through libss, which splits on blanks and
# interprets double quotes; every other byte reaches dx_hash unchanged.
_SS_UNSAFE = {0, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x22}
_NAME_BYTES = bytes(b for b in range(256) if b not in _SS_UNSAFE)

_HASH_LINE = re.compile(rb"^Hash of (.*) is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)$", re.DOTALL)


def _random_name(rng: random.Random, alphabet: bytes) -> bytes:
    length = rng.choice([1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 64, rng.randint(1, 255), 255])
    # Bias towards high bytes: their sign is what differs between variants.
    return bytes(
        rng.choice(alphabet) if rng.random() < 0.5 else rng.randint(0x80, 0xFF)
        for _ in range(length)
    )


def _debugfs_hashes(
    names: list[bytes], version: int, seed: bytes, tmp_path: Path
) -> list[tuple[int, int]]:
    seed_text = str(uuid.UUID(bytes=seed)).encode()
    cmds = b"".join(b"dx_hash -h %d -s %s -- %s\n" % (version, seed_text, n) for n in names)
    cmdfile = tmp_path / f"dx_hash_{version}.cmds"
    cmdfile.write_bytes(cmds)
    out = subprocess.run(
        ["debugfs", "-f", os.fspath(cmdfile)], capture_output=True, check=True
    ).stdout
    results = []
    for line in out.split(b"\n"):
        m = _HASH_LINE.match(line)
        if m:
            results.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16)))
    assert [r[0] for r in results] == names, "debugfs did not receive the names intact"
    return [(h, minor) for _, h, minor in results]


IMPLEMENTATIONS = [
    pytest.param(ext4fs_dirhash, id="libext2fs"),
    pytest.param(python_dirhash, id="python"),
]


def test_libext2fs_computes_the_hashes() -> None:
    # e2fsprogs is a dependency (.ci/install): without its library every
    # listing of an encrypted htree directory falls back to the Python hash.
    assert dirhash._ext2fs_dirhash is not None


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_matches_debugfs(impl, version: int, tmp_path: Path) -> None:
    rng = random.Random(1000 + version)
    names = [_random_name(rng, _NAME_BYTES) for _ in range(400)]
    seed = rng.randbytes(16)
    expected = _debugfs_hashes(names, version, seed, tmp_path)
    for name, want in zip(names, expected, strict=True):
        assert impl(name, version, seed) == want, (name, version)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_seed_is_default_seed(impl, tmp_path: Path) -> None:
    rng = random.Random(7)
    names = [_random_name(rng, _NAME_BYTES) for _ in range(50)]
    for version in (DX_HASH_HALF_MD4, DX_HASH_TEA_UNSIGNED):
        expected = _debugfs_hashes(names, version, bytes(16), tmp_path)
        for name, want in zip(names, expected, strict=True):
            assert impl(name, version, bytes(16)) == want
            assert impl(name, version, None) == want


def test_both_implementations_agree_on_every_byte() -> None:
    # What debugfs cannot be given: NUL bytes, blanks, quotes, the empty
    # name and names longer than a dirent holds.
    rng = random.Random(11)
    for i in range(3000):
        name = rng.randbytes(rng.choice((0, 1, 3, 4, 15, 16, 17, 31, 32, 33, 149, 255, 300)))
        version = ALL_VERSIONS[i % len(ALL_VERSIONS)]
        seed = (None, bytes(16), rng.randbytes(16))[i % 3]
        assert ext4fs_dirhash(name, version, seed) == python_dirhash(name, version, seed)


def test_signedness_matters_only_for_high_bytes() -> None:
    rng = random.Random(3)
    seed = rng.randbytes(16)
    for signed, unsigned in (
        (DX_HASH_LEGACY, DX_HASH_LEGACY_UNSIGNED),
        (DX_HASH_HALF_MD4, DX_HASH_HALF_MD4_UNSIGNED),
        (DX_HASH_TEA, DX_HASH_TEA_UNSIGNED),
    ):
        low = bytes(rng.randint(1, 0x7F) for _ in range(40))
        assert ext4fs_dirhash(low, signed, seed) == ext4fs_dirhash(low, unsigned, seed)
        high = low[:10] + b"\xe9" + low[10:]
        assert ext4fs_dirhash(high, signed, seed) != ext4fs_dirhash(high, unsigned, seed)


def test_final_step_keeps_eof_cookie_free() -> None:
    # No practical name reaches 0xfffffffe, so the last step is checked alone:
    # the kernel turns EXT4_HTREE_EOF_32BIT << 1 into (EOF - 1) << 1.
    assert _finish(0xFFFFFFFF) == 0xFFFFFFFC
    assert _finish(0xFFFFFFFE) == 0xFFFFFFFC
    assert _finish(0xFFFFFFFD) == 0xFFFFFFFC
    assert _finish(0x12345679) == 0x12345678


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unknown_version_is_corrupt(impl) -> None:
    with pytest.raises(CorruptError):
        impl(b"x", 6, None)
    with pytest.raises(CorruptError):
        impl(b"x", 200, None)


def test_dx_hash_version() -> None:
    for v in (DX_HASH_LEGACY, DX_HASH_HALF_MD4, DX_HASH_TEA):
        assert dx_hash_version(v, EXT2_FLAGS_UNSIGNED_HASH) == v + 3
        assert dx_hash_version(v, EXT2_FLAGS_SIGNED_HASH) == v
        assert dx_hash_version(v, 0) == v
    assert dx_hash_version(DX_HASH_TEA_UNSIGNED, EXT2_FLAGS_UNSIGNED_HASH) == DX_HASH_TEA_UNSIGNED


# --- the kernel as oracle -------------------------------------------------


def _dumpe2fs(image: Path) -> dict[str, str]:
    out = harness.run("dumpe2fs", "-h", image)
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _dx_entries(block: bytes, offset: int) -> list[tuple[int, int]]:
    """(hash, logical block) of a dx_root/dx_node entry array at `offset`."""
    _limit, count, first = struct.unpack_from("<HHI", block, offset)
    entries = [(0, first)]
    for i in range(1, count):
        entries.append(struct.unpack_from("<II", block, offset + 8 * i))
    return entries


def _leaf_names(block: bytes) -> list[bytes]:
    names, pos = [], 0
    while pos + 8 <= len(block):
        ino, rec_len, name_len, _ftype = struct.unpack_from("<IHBB", block, pos)
        if rec_len < 8:
            break
        if ino and name_len:
            names.append(block[pos + 8 : pos + 8 + name_len])
        pos += rec_len
    return names


def _check_htree(
    image: Path, dir_ino: int, base_version: int, version: int, seed: bytes, bs: int
) -> int:
    """Every name of every leaf hashes into that leaf's range; return names checked."""
    blocks = [int(b) for b in harness.run("debugfs", "-R", f"blocks <{dir_ino}>", image).split()]
    with open(image, "rb") as f:
        data = []
        for pblk in blocks:
            f.seek(pblk * bs)
            data.append(f.read(bs))
    root = data[0]
    hash_version, info_length, levels = struct.unpack_from("<BBB", root, 0x1C)
    assert info_length == 8
    # Ranges: (low, high, logical block); high exclusive, or inclusive of
    # high & ~1 when the next entry has the collision bit set.
    ranges: list[tuple[int, int, int]] = []

    def walk(entries: list[tuple[int, int]], lo: int, hi: int, depth: int) -> None:
        for i, (h, lblk) in enumerate(entries):
            start = lo if i == 0 else h
            end = entries[i + 1][0] if i + 1 < len(entries) else hi
            if depth < levels:
                walk(_dx_entries(data[lblk], 8), start, end, depth + 1)
            else:
                ranges.append((start, end, lblk))

    walk(_dx_entries(root, 0x20), 0, 1 << 32, 0)
    assert hash_version == base_version
    checked = 0
    for lo, hi, lblk in ranges:
        for name in _leaf_names(data[lblk]):
            h, _minor = ext4fs_dirhash(name, version, seed)
            if hi & 1:
                assert lo & ~1 <= h <= hi & ~1, (name, lo, hi)
            else:
                assert lo & ~1 <= h < hi, (name, lo, hi)
            checked += 1
    return checked


@pytest.mark.parametrize(
    "alg,flags",
    [
        ("legacy", EXT2_FLAGS_SIGNED_HASH),
        ("half_md4", EXT2_FLAGS_SIGNED_HASH),
        ("tea", EXT2_FLAGS_SIGNED_HASH),
        ("legacy", EXT2_FLAGS_UNSIGNED_HASH),
        ("half_md4", EXT2_FLAGS_UNSIGNED_HASH),
        ("tea", EXT2_FLAGS_UNSIGNED_HASH),
    ],
)
def test_kernel_htree_placement(kernel: None, tmp_path: Path, alg: str, flags: int) -> None:
    bs = 1024
    image = harness.mkfs(tmp_path / "h.img", size_mb=8, block_size=bs, features=("dir_index",))
    harness.run("debugfs", "-w", "-R", f"ssv def_hash_version {alg}", image)
    harness.run("debugfs", "-w", "-R", f"ssv flags {flags}", image)
    rng = random.Random(f"{alg}-{flags}")
    # Any byte but NUL and '/' can be a name; long names split leaves fast.
    alphabet = bytes(b for b in range(1, 256) if b != 0x2F)
    names: set[bytes] = set()
    while len(names) < 300:
        n = _random_name(rng, alphabet)
        if n not in (b".", b".."):
            names.add(n)
    with harness.mounted(image, tmp_path / "mnt") as (_dev, mnt):
        d = mnt / "d"
        d.mkdir()
        for n in names:
            fd = os.open(os.path.join(os.fsencode(d), n), os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
        dir_ino = d.stat().st_ino
    sb = _dumpe2fs(image)
    assert sb["Default directory hash"] == alg
    seed = uuid.UUID(sb["Directory Hash Seed"]).bytes
    base = {"legacy": DX_HASH_LEGACY, "half_md4": DX_HASH_HALF_MD4, "tea": DX_HASH_TEA}[alg]
    version = dx_hash_version(base, flags)
    assert _check_htree(image, dir_ino, base, version, seed, bs) == len(names)
