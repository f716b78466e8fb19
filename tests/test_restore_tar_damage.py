"""Damaged, truncated, crafted and streamed tar backups of a kernel-made encrypted tree.

The kernel encrypts a tree; a view-format copy of it (tests/harness_restore)
is archived by GNU tar with --xattrs.  Each damaged variant is restored with
the key, and the result is held against three oracles: the plaintext the
kernel showed with the key (every restored file must equal it), GNU tar's
own listing of the damaged archive (whatever it still lists must not be
lost in a skipped region), and the offsets of the members in the intact
archive (whatever is lost must be named or inside a region reported lost).

Tar keeps no checksum of data and fscrypt no MAC: a flipped bit in a
member's data (its contents, or the pax records with its context) cannot
be detected.  Such a member, and for a directory what lies below it, may
come back different; everything else must come back exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciphertextfs import cli
from ciphertextfs.fscrypt import kernel
from ciphertextfs.restore.tarstream import BLOCK, Member, TarReader
from tests import harness, trees
from tests.harness_restore import make_view_copy, walk
from tests.tarcraft import b256, header, member, padded, pax

SEED = 20261201
PY = [sys.executable, "-m", "ciphertextfs"]


def populate(root: Path) -> None:
    """A varied tree: sizes, long names, depth, links, specials, xattrs."""
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, size in enumerate((0, 1, 17, 4095, 4096, 4097, 20000, 70000)):
        (root / f"f{i}").write_bytes(os.urandom(size))
    (root / ("L" * 200)).write_bytes(b"long name\n")
    (root / ("D" * 220)).mkdir()
    (root / ("D" * 220) / ("é" * 90)).write_bytes(b"inner\n" * 50)
    (root / "sub" / "a").write_bytes(b"a" * 5000)
    (root / "sub" / "deeper" / "b").write_bytes(os.urandom(9000))
    (root / "sub" / "deeper" / "16-byte-name-xx").write_bytes(b"sixteen")
    os.symlink("f1", root / "link")
    os.symlink("t" * 300, root / "sub" / "longlink")
    os.link(root / "f6", root / "sub" / "hard")
    os.mkfifo(root / "fifo", 0o640)
    os.setxattr(root / "f2", "user.color", b"\x00blue\xff")
    os.chmod(root / "sub", 0o750)
    os.utime(root / "sub", ns=(1_600_000_000_000_000_001, 1_400_000_000_000_000_002))
    os.utime(root / "sub" / "deeper", ns=(1_600_000_000_000_000_001, 1_300_000_000_000_000_002))


@dataclass
class World:
    base: Path
    key: Path
    archive: Path
    data: bytes
    plain: dict  # walk() of the unlocked tree
    plain_of: dict[str, set[str]]  # view path -> plaintext paths (one inode)
    members: list[Member]  # of the intact archive, with their offsets
    listing: set[str]  # tar -tvf of the intact archive


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    harness.require_kernel()
    base = tmp_path_factory.mktemp("tardamage")
    image = harness.mkfs(base / "src.img", size_mb=32, block_size=4096, features=("encrypt",))
    raw = os.urandom(64)
    key = base / "key"
    key.write_bytes(raw)
    with harness.mounted(image, base / "src.mnt") as (_dev, mnt):
        ident = kernel.add_key(mnt, raw)
        enc = mnt / "enc"
        enc.mkdir()
        kernel.set_policy_v2(enc, ident)
        populate(enc)
        (mnt / "plain").mkdir()
        populate(mnt / "plain")
        os.sync()
        plain = walk(mnt)
        ino_plain: dict[int, set[str]] = {}
        for rel in plain:
            ino_plain.setdefault(os.lstat(mnt / rel).st_ino, set()).add(rel)
        trees.lock(mnt, {2: ident})
        plain_of = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                plain_of[os.fspath(p.relative_to(mnt))] = ino_plain[os.lstat(p).st_ino]
        copy = make_view_copy(image, mnt, base / "copy")
    archive = base / "view.tar"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-cf", archive, "-C", copy, "."], check=True
    )
    data = archive.read_bytes()
    members = [r for r in TarReader(io.BytesIO(data)) if isinstance(r, Member)]
    ok, listing = gnu_listing(archive)
    assert ok and len(listing) == len(members)
    return World(base, key, archive, data, plain, plain_of, members, listing)


def gnu_listing(archive: Path) -> tuple[bool, set[str]]:
    r = subprocess.run(["tar", "-tvf", archive], capture_output=True, check=False)
    return r.returncode == 0, set(r.stdout.decode("utf-8", "surrogateescape").splitlines())


def listed_name(line: str) -> str:
    """The member name in a `tar -tv` line."""
    name = line.split(maxsplit=5)[5]
    for sep in (" link to ", " -> "):
        name = name.split(sep)[0]
    return name.removeprefix("./").rstrip("/")


def view_rel(m: Member) -> str:
    return os.fsdecode(m.path).removeprefix("./").rstrip("/")


def restore(world: World, source: str | Path, dest: Path, *extra: str) -> tuple[int, str]:
    """Run `ciphertextfs decrypt` in this process: a traceback fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(
            [
                "decrypt",
                "--key",
                os.fspath(world.key),
                *extra,
                os.fspath(source),
                *([os.fspath(dest)] if dest else []),
            ]
        )
    return rc, err.getvalue()


_NOT = re.compile(r"^ciphertextfs: not restored: (.+?): ", re.M)
_MISSING_KEY = re.compile(r"^ciphertextfs: missing key: .* \(e\.g\. (.+)\)$", re.M)
_REGION = re.compile(r"archive (?:bytes (\d+)-(\d+)|from byte (\d+) to the end) lost")


def reported(stderr: str) -> tuple[set[str], list[tuple[int, float]]]:
    named = set(_NOT.findall(stderr)) | set(_MISSING_KEY.findall(stderr))
    regions = []
    for a, b, c in _REGION.findall(stderr):
        regions.append((int(a), int(b)) if a else (int(c), float("inf")))
    return named, regions


def check(
    world: World,
    damaged: Path,
    dest: Path,
    *,
    hit: Member | None,
    expect_loss: bool,
) -> tuple[int, str]:
    """Restore `damaged` and hold the result against the oracles (see the module)."""
    rc, err = restore(world, damaged, dest)
    assert rc in (0, 1), err
    assert "Traceback" not in err
    got = walk(dest)
    hit_plain: set[str] = set()
    hit_dirs: set[str] = set()
    if hit is not None and view_rel(hit) in world.plain_of:
        hit_plain = world.plain_of[view_rel(hit)]
        if hit.typeflag == b"5":
            hit_dirs = hit_plain
    under_hit = lambda rel: any(rel.startswith(d + "/") for d in hit_dirs)  # noqa: E731
    # A flip in the pax path of an unencrypted member renames it: tar has no
    # checksum to tell.  At most that one entry (and what is below it) may
    # then stand under a name the original does not have.
    unknown = sorted(r for r in got if r not in world.plain and not under_hit(r))
    renamed = unknown[0] if hit is not None and unknown else None
    if renamed is not None:
        hit_dirs = hit_dirs | {renamed}
    for rel, node in got.items():
        if under_hit(rel) or rel == renamed:
            continue  # the hit member renamed, or below a directory that took the flip
        assert rel in world.plain, f"{rel} restored but not in the original:\n{err}"
        if rel not in hit_plain:
            want = world.plain[rel]
            if want.link_group and node.link_group != want.link_group:
                # One name of a hard link lost: the other stands alone.
                want = dataclasses.replace(want, link_group="")
            assert node == want, f"{rel} restored wrongly:\n{err}"
    named, regions = reported(err)
    ok, listing = gnu_listing(damaged)
    offset_of = {view_rel(m): m.offset for m in world.members}
    lost_in_region = []

    def accounted(vrel: str) -> bool:
        parts = vrel.split("/")
        if any("/".join(parts[:i]) in named for i in range(1, len(parts) + 1)):
            return True
        if any(a <= offset_of[vrel] < b for a, b in regions):
            lost_in_region.append(vrel)
            return True
        return False

    for rel in world.plain:
        if rel in got or under_hit(rel):
            continue
        if rel in hit_plain and (named or regions or renamed):
            # The flip was in its pax path: reported under the damaged name, or
            # restored under it (an encrypted name that decrypts to other bytes
            # without a NUL or '/', or any plain name): no checksum tells.
            continue
        # Every name of the inode is a candidate (hard links share one).
        candidates = [v for v, plains in world.plain_of.items() if rel in plains]
        assert any([accounted(v) for v in candidates]), f"{rel} lost unreported:\n{err}"
    # GNU tar's listing: a member it still lists as before is not lost in a region.
    intact = {listed_name(line) for line in listing & world.listing}
    if hit is not None:
        intact.discard(view_rel(hit))
    assert not set(lost_in_region) & intact, (set(lost_in_region) & intact, err)
    lost = any(r not in got and r not in hit_plain and not under_hit(r) for r in world.plain)
    if expect_loss or lost or named or regions:
        assert rc == 1, err
    if rc == 0:
        # Below a directory whose pax records took the flip (its context
        # xattr renamed, say) its entries may come back as ciphertext: the
        # restore's check for entries without a context in an encrypted
        # directory (view format 2) is what catches that, not the tar reader.
        assert {r for r in got if not under_hit(r) and r != renamed} == {
            r for r in world.plain if not under_hit(r) and not (renamed and r in hit_plain)
        }, err
        assert not named and not regions
    if hit is None and (not ok or listing != world.listing):
        # GNU tar saw damage outside any member's data: so must we.  (A data
        # flip in a pax record may change what GNU tar lists, an mtime say,
        # and still be a valid record: undetectable by either.)
        assert rc == 1, err
    return rc, err


def flips(world: World) -> list[tuple[str, int, int, Member | None]]:
    """60 flips: (kind, byte offset, bit, member hit), from a fixed seed."""
    rng = random.Random(SEED)
    ms = world.members
    spans = [(m, ms[i + 1].offset if i + 1 < len(ms) else None) for i, m in enumerate(ms)]
    out: list[tuple[str, int, int, Member | None]] = []
    while len(out) < 28:
        m, _ = rng.choice(spans)
        block = rng.choice(sorted({m.offset, m.data_offset - BLOCK}))
        out.append(("header", block + rng.randrange(BLOCK), rng.randrange(8), m))
    with_data = [(m, nxt) for m, nxt in spans if m.size or m.data_offset - m.offset > 2 * BLOCK]
    while len(out) < 56:
        m, _ = rng.choice(with_data)
        areas = []
        if m.data_offset - m.offset > 2 * BLOCK:  # the pax records (xattrs, times)
            areas.append((m.offset + BLOCK, m.data_offset - BLOCK))
        if m.size:
            areas.append((m.data_offset, m.data_offset + m.size))
        lo, hi = rng.choice(areas)
        out.append(("data", rng.randrange(lo, hi), rng.randrange(8), m))
    padding = [(m.data_offset + m.size, nxt) for m, nxt in spans if nxt and m.size % BLOCK]
    for lo, hi in rng.sample(padding, 2):
        out.append(("padding", rng.randrange(lo, hi), rng.randrange(8), None))
    end = ms[-1].data_offset + -(-ms[-1].size // BLOCK) * BLOCK + 2 * BLOCK
    for _ in range(2):
        out.append(("record padding", rng.randrange(end, len(world.data)), rng.randrange(8), None))
    return out


def test_sixty_bit_flips(world: World, tmp_path: Path) -> None:
    outcomes: dict[str, list[int]] = {}
    for i, (kind, off, bit, m) in enumerate(flips(world)):
        data = bytearray(world.data)
        data[off] ^= 1 << bit
        damaged = tmp_path / f"flip{i}.tar"
        damaged.write_bytes(data)
        ok, listing = gnu_listing(damaged)
        # A header flip is always lost unless GNU tar too sees nothing wrong
        # (a checksum digit '0' turned into a space reads the same).
        header_loss = kind == "header" and not (ok and listing == world.listing)
        try:
            rc, _ = check(
                world,
                damaged,
                tmp_path / f"d{i}",
                hit=m if kind == "data" else None,
                expect_loss=header_loss,
            )
        except AssertionError as e:
            raise AssertionError(f"flip {i}: {kind} byte {off} bit {bit}: {e}") from None
        if kind in ("padding", "record padding"):
            assert rc == 0, (i, kind, off)
        outcomes.setdefault(kind, []).append(rc)
        damaged.unlink()
    # Header flips cost their member; the test must have seen both outcomes of data flips.
    assert sum(outcomes["header"]) >= 25, outcomes


@pytest.mark.parametrize("where", ["mid-header", "mid-data", "boundary", "pax", "before-eof"])
def test_truncated(world: World, tmp_path: Path, where: str) -> None:
    ms = world.members
    big = max(ms, key=lambda m: m.size)
    with_pax = [m for m in ms if m.data_offset - m.offset > 2 * BLOCK]
    cut = {
        "mid-header": ms[len(ms) // 2].data_offset - BLOCK + 200,
        "mid-data": big.data_offset + big.size // 2,
        "boundary": ms[len(ms) // 3].offset,
        "pax": with_pax[len(with_pax) // 2].offset + BLOCK + 10,
        "before-eof": ms[-1].data_offset + -(-ms[-1].size // BLOCK) * BLOCK,
    }[where]
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(world.data[:cut])
    rc, err = check(world, damaged, tmp_path / "dest", hit=None, expect_loss=True)
    assert rc == 1
    assert "damaged archive" in err and "to the end lost" in err, err
    if where == "mid-data":
        assert re.search(r"archive ends \d+ bytes into this member", err), err


def crafted_cases() -> list[tuple[str, bytes, str]]:
    def bad(**kw) -> bytes:
        return header(b"./plain/crafted", size=3, **kw) + padded(b"bad")

    def pax_bad(records: dict[bytes, bytes]) -> bytes:
        return pax(records) + member(b"./plain/crafted", b"bad")

    return [
        ("mtime +1e20", pax_bad({b"mtime": b"100000000000000000000"}), "mtime"),
        ("mtime -1e20", pax_bad({b"mtime": b"-100000000000000000000"}), "mtime"),
        ("uid -5", bad(raw={108: b256(-5, 8)}), "uid -5"),
        ("pax uid -5", pax_bad({b"uid": b"-5"}), "uid"),
        ("devmajor 2^31", bad(typeflag=b"3", raw={329: b256(2**31, 8)}), "devmajor"),
        ("NUL in name", pax_bad({b"path": b"./plain/cra\0fted"}), "NUL"),
        ("bad base-256", bad(raw={136: b"\x81" + bytes(11)}), "base-256"),
        (
            "bad pax record",
            header(b"P", typeflag=b"x", size=9) + padded(b"99 path=x") + bad(),
            "pax",
        ),
        (
            "absurd long name",
            header(b"L", typeflag=b"L", size=10**6) + padded(b"x" * 10**6) + bad(),
            "limit",
        ),
        ("negative size", bad(raw={124: b256(-1, 12)}), "size"),
        ("bad base64 xattr", pax_bad({b"LIBARCHIVE.xattr.user.x": b"!!"}), "base64"),
        ("dotdot", pax_bad({b"path": b"./plain/../../etc/x"}), "leaves"),
    ]


CASES = crafted_cases()


@pytest.mark.parametrize("what,crafted,reason", CASES, ids=[c[0] for c in CASES])
def test_crafted_member_is_refused_alone(
    world: World, tmp_path: Path, what: str, crafted: bytes, reason: str
) -> None:
    at = world.members[1].offset  # right after the root directory
    damaged = tmp_path / "crafted.tar"
    damaged.write_bytes(world.data[:at] + crafted + world.data[at:])
    rc, err = restore(world, damaged, tmp_path / "dest")
    assert rc == 1, err
    assert reason in err, err
    assert walk(tmp_path / "dest") == world.plain, err
    assert not (tmp_path / "etc").exists()
    # pax size 2^50 at the end: the member swallows what is left, and says so.
    if what == "mtime +1e20":
        tail = world.data[: len(world.data) - 2 * BLOCK]
        huge = pax({b"size": str(2**50).encode()}) + member(b"./plain/huge", b"x")
        damaged.write_bytes(
            tail[: world.members[-1].offset] + huge + tail[world.members[-1].offset :]
        )
        rc, err = restore(world, damaged, tmp_path / "dest2")
        assert rc == 1 and "plain/huge" in err and "to the end lost" in err, err


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)


def side_files_first(root: Path) -> list[str]:
    """Every path under root, each directory's side file before its other entries."""
    out = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        names = sorted([*dirnames, *filenames], key=lambda n: (n != ".fscrypt-longnames", n))
        out += [os.fspath(rel / n) for n in names]
    return out


def test_zstd_through_a_pipe_and_as_a_file(world: World, tmp_path: Path) -> None:
    # A stream is read in one pass: each side file must come before the
    # entries that need it (format 2 lists it first; tar keeps that order).
    listed = tmp_path / "order"
    listed.write_bytes(b"\0".join(map(os.fsencode, side_files_first(world.base / "copy"))))
    zst = tmp_path / "home.tar.zst"
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--zstd",
            "-C",
            world.base / "copy",
            "--no-recursion",
            "--null",
            "-T",
            listed,
            "-cf",
            zst,
        ],
        check=True,
    )
    cli_ = " ".join(map(shlex.quote, PY))
    key = shlex.quote(os.fspath(world.key))
    dest = tmp_path / "restore"
    r = sh(f"zstd -dc {zst} | {cli_} decrypt --key {key} - {dest}")
    assert r.returncode == 0, r.stderr
    assert walk(dest) == world.plain
    r = sh(f"zstd -dc {zst} | {cli_} decrypt --verify --key {key} -")
    assert r.returncode == 0 and "0 not restorable" in r.stderr, r.stderr
    # Damage in a stream is reported too: a flipped header, through the pipe.
    data = bytearray(world.data)
    data[world.members[5].data_offset - BLOCK + 3] ^= 4
    (tmp_path / "bad.tar").write_bytes(data)
    r = sh(f"cat {tmp_path / 'bad.tar'} | {cli_} decrypt --verify --key {key} -")
    assert r.returncode == 1 and "damaged archive" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # Format 1 (side files after the entries) in a stream: reported, not silent.
    r = sh(f"cat {world.archive} | {cli_} decrypt --verify --key {key} -")
    assert r.returncode == 1, r.stderr
    assert "comes after entries of its directory" in r.stderr, r.stderr
    # ... and from the same archive as a file, read ahead: complete.
    rc, err = restore(world, world.archive, tmp_path / "from-file")
    assert rc == 0 and walk(tmp_path / "from-file") == world.plain, err


def test_tar_xattrs_zstd_archive_as_a_file(world: World, tmp_path: Path) -> None:
    archive = tmp_path / "backup.archive"  # no suffix: zstd is recognised by magic
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--zstd",
            "-cf",
            archive,
            "-C",
            world.base / "copy",
            ".",
        ],
        check=True,
    )
    rc, err = restore(world, archive, tmp_path / "dest")
    assert rc == 0, err
    assert walk(tmp_path / "dest") == world.plain
