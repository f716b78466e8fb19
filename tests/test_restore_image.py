"""Keyless restore: kernel-encrypted ext4 -> view -> tar / rsync -> restore-image.

The kernel writes the original trees under every policy shape; the backup
is made with real tar and rsync from the FUSE view; `restore-image` writes
a new image without any key.  The oracles: e2fsck -fn on the new image, the
kernel's locked listing of the original (no-key names), and the plaintext
the kernel shows on the original with the keys present, which the new
image must show once the same master keys are added.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.nokey import parse_nokey_name
from ciphertextfs.fscrypt.policy import build_context
from ciphertextfs.viewformat import SYMLINK_REF_PREFIX, decode_side_file, decode_symlink_ref
from tests import harness, trees
from tests.harness_restore import SIDE, walk
from tests.harness_view import CLI, view_mount

POLICIES = tuple(p.name for p in trees.POLICIES)
POLICIES_1K = ("v1", "v2", "v2-ino32")
FULL = ("v2",)


FRAGMENTED = "fragmented"
FRAGMENTS = 2000
"""One-block runs between holes: more extents than a depth-1 tree holds
(4 x 340 with 4 KiB blocks, 4 x 84 with 1 KiB)."""


def write_fragmented(path: Path, block: int, runs: int) -> None:
    """A sparse file of `runs` one-block extents, written through the kernel."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i in range(runs):
            os.pwrite(fd, os.urandom(block), 2 * i * block)
        os.fsync(fd)
    finally:
        os.close(fd)


def extent_levels(image: Path, ino: int) -> tuple[int, int]:
    """(tree depth, leaf extents) of an inode, as debugfs lists them."""
    out = run("debugfs", "-R", f"ex <{ino}>", image).stdout
    rows = [re.match(r"\s*(\d+)/\s*(\d+)", ln) for ln in out.splitlines()[1:]]
    levels = [(int(m[1]), int(m[2])) for m in rows if m]
    assert levels, out
    depth = levels[0][1]
    return depth, sum(1 for lvl, _ in levels if lvl == depth)


def encdir(name: str) -> str:
    return f"enc-{name}"


def run(*argv: str | os.PathLike[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout
    )


def locked_names(root: Path) -> dict[str, list[str]]:
    """Every directory's entry names as the kernel lists them, keys absent."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel] = sorted([*dirnames, *filenames])
    return out


def ciphertext_part(name: str) -> bytes:
    """A no-key name without its dirhash (zeros in a directory read linearly)."""
    try:
        nk = parse_nokey_name(name.encode())
    except FscryptError:
        return name.encode()
    return nk.prefix + (nk.sha256 or b"")


def without_hashes(listing: dict[str, list[str]]) -> dict[tuple, list]:
    """A locked listing with every no-key name's dirhash left out."""
    return {
        tuple(map(ciphertext_part, d.split("/"))): sorted(map(ciphertext_part, names))
        for d, names in listing.items()
    }


@dataclass
class World:
    base: Path
    image: Path
    plain: dict
    locked: dict[str, list[str]]
    archive: Path
    rsynced: Path
    piped: Path
    piped_stderr: str
    view: dict


@pytest.fixture(scope="module", params=[4096, 1024], ids=["4k", "1k"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    """The original image: 4 KiB blocks (every policy), 1 KiB blocks (two-level htree)."""
    harness.require_fuse()
    block = request.param
    base = tmp_path_factory.mktemp(f"rimage{block}")
    image = harness.mkfs(
        base / "src.img", size_mb=96, block_size=block, features=("encrypt", "stable_inodes")
    )
    with harness.mounted(image, base / "src.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            (mnt / "plain").mkdir()
            trees.write_tree(mnt / "plain", block, small=True)
            for name in POLICIES if block == 4096 else POLICIES_1K:
                d = mnt / encdir(name)
                d.mkdir()
                trees.POLICY[name].apply(d, keys)
                trees.write_tree(d, block, small=name not in FULL)
                if name in FULL:
                    write_fragmented(d / FRAGMENTED, block, FRAGMENTS)
            trees.stamp_mtimes(mnt)
            os.sync()
            plain = walk(mnt)
            trees.lock(mnt, keys)
        locked = locked_names(mnt)
    archive, rsynced = base / "view.tar", base / "rsynced"
    piped, spool = base / "piped.img", base / "spool"
    spool.mkdir()
    with view_mount(image, base / "view") as v:
        xa = ("--xattrs", "--xattrs-include=*", "--acls")
        r = run("tar", *xa, "-cf", archive, "-C", v.mountpoint, ".")
        assert r.returncode == 0, r.stderr
        r = run("rsync", "-aHAX", f"{v.mountpoint}/", rsynced)
        assert r.returncode == 0, r.stderr
        piped_stderr = tar_pipe_to_restore_image(v.mountpoint, piped, spool)
        view = view_tree(v.mountpoint)
    return World(base, image, plain, locked, archive, rsynced, piped, piped_stderr, view)


def tar_pipe_to_restore_image(tree: Path, target: Path, spool: Path) -> str:
    """`tar --xattrs -cf - TREE | restore-image - TARGET`, spooled under `spool`."""
    tar = subprocess.Popen(
        ["tar", "--xattrs", "--xattrs-include=*", "--acls", "-cf", "-", "-C", tree, "."],
        stdout=subprocess.PIPE,
    )
    assert tar.stdout is not None
    try:
        r = subprocess.run(
            [*CLI, "restore-image", "-", target],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, TMPDIR=os.fspath(spool)),
        )
    finally:
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0
    assert r.returncode == 0, r.stderr
    assert os.listdir(spool) == []
    return r.stderr


def view_tree(mnt: Path) -> dict:
    """What the view shows, with the inode numbers it shows left out.

    Everything a backup keeps (names, kinds, modes, owners, mtimes, contents,
    sizes, xattrs, hard-link groups) must be the same over the original and
    the restored image.  Inode numbers differ wherever no policy binds them,
    and the view names them in two places: `fscrypt:2:<ino>` targets of long
    encrypted symlinks and the `l <ino>` lines of side files.  Those targets
    are replaced by the side-file line they refer to, and side files are
    compared by their names and symlink targets.  Directory sizes are
    already left out by `walk`.
    """
    tree = walk(mnt)
    sides = {}
    for rel, node in tree.items():
        if os.path.basename(rel) == SIDE:
            side = decode_side_file((mnt / rel).read_bytes())
            assert side.damaged == 0
            sides[os.path.dirname(rel)] = side
            tree[rel] = replace(
                node,
                content=(side.version, sorted(side.names.items()), sorted(side.symlinks.values())),
            )
    for rel, node in tree.items():
        if isinstance(node.content, bytes) and node.content.startswith(SYMLINK_REF_PREFIX):
            side = sides[os.path.dirname(rel)]
            target = side.symlinks[decode_symlink_ref(node.content)]
            tree[rel] = replace(node, content=b"ref:" + target)
    return tree


def restore_image(source: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(*CLI, "restore-image", *extra, source, target)


def view_tar_restored(image: Path, tmp_path: Path) -> tuple[Path, Path]:
    """`tar --xattrs` of the view of `image`, and restore-image of that archive."""
    archive = tmp_path / "view.tar"
    with view_mount(image, tmp_path / "view") as v:
        r = run("tar", "--xattrs", "--xattrs-include=*", "-cf", archive, "-C", v.mountpoint, ".")
        assert r.returncode == 0, r.stderr
    out = tmp_path / "new.img"
    r = restore_image(archive, out, "-q")
    assert r.returncode == 0, r.stderr
    return archive, out


def e2fsck(image: Path) -> subprocess.CompletedProcess:
    return run("e2fsck", "-fn", image)


@pytest.fixture(scope="module")
def from_tar(world: World) -> Path:
    out = world.base / "from-tar.img"
    r = restore_image(world.archive, out, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return out


@pytest.fixture(scope="module")
def from_rsync(world: World) -> Path:
    out = world.base / "from-rsync.img"
    r = restore_image(world.rsynced, out)
    assert r.returncode == 0, r.stderr
    assert "0 entries not restored" in r.stderr
    return out


def check_image(world: World, image: Path, *, same_hashes: bool) -> None:
    r = e2fsck(image)
    assert r.returncode == 0, r.stdout + r.stderr
    with harness.mounted(image, image.with_suffix(".mnt")) as (_dev, mnt):
        got = locked_names(mnt)
        if same_hashes:
            assert got == world.locked
        else:
            assert without_hashes(got) == without_hashes(world.locked)
        with trees.keys_added(mnt) as keys:
            restored = walk(mnt)
            trees.lock(mnt, keys)
    assert restored.keys() == world.plain.keys()
    for rel, node in world.plain.items():
        assert restored[rel] == node, rel


def test_tar_backup_round_trip(world: World, from_tar: Path) -> None:
    check_image(world, from_tar, same_hashes=True)


def test_rsync_backup_round_trip(world: World, from_rsync: Path) -> None:
    check_image(world, from_rsync, same_hashes=True)


def test_tar_on_standard_input_round_trip(world: World) -> None:
    assert "copying standard input" in world.piped_stderr
    assert "0 entries not restored" in world.piped_stderr
    check_image(world, world.piped, same_hashes=True)


def test_the_directory_hash_comes_back(world: World, from_rsync: Path) -> None:
    """Seed, default algorithm and char signedness, without any -E option."""
    old, new = harness.dumpe2fs_header(world.image), harness.dumpe2fs_header(from_rsync)
    for field in ("Directory Hash Seed", "Default directory hash", "Filesystem flags"):
        assert new[field] == old[field], field
    seed = old["Directory Hash Seed"].replace("-", "")
    want = ("user.fscrypt.dirhash", f"{old['Default directory hash']} {seed}".encode())
    dirs = [n for n in world.view.values() if n.kind == oct(stat.S_IFDIR)]
    assert dirs and all(want in n.xattrs for n in dirs)


def test_the_view_of_the_new_image_is_the_view_of_the_original(
    world: World, from_tar: Path
) -> None:
    with view_mount(from_tar, world.base / "view-new") as v:
        got = view_tree(v.mountpoint)
    assert got.keys() == world.view.keys()
    for rel, node in world.view.items():
        assert got[rel] == node, rel


def test_policies_keep_inode_numbers_and_uuid(world: World, from_rsync: Path) -> None:
    header = harness.dumpe2fs_header(from_rsync)
    assert header["Filesystem UUID"] == harness.dumpe2fs_header(world.image)["Filesystem UUID"]
    assert "stable_inodes" in header["Filesystem features"]
    assert "encrypt" in header["Filesystem features"]


def test_damaged_backups_are_reported_and_the_image_is_clean(world: World) -> None:
    damaged = world.base / "damaged"
    r = run("cp", "-a", world.rsynced, damaged)
    assert r.returncode == 0, r.stderr
    # A missing side file costs the long names of that directory.
    names = (
        damaged
        / encdir("v2")
        / [
            d
            for d in os.listdir(world.rsynced / encdir("v2"))
            if (world.rsynced / encdir("v2") / d / SIDE).exists()
            and len(os.listdir(world.rsynced / encdir("v2") / d)) > 20
        ][0]
    )
    (names / SIDE).unlink()
    # A tampered context costs that file.
    victim = next(
        p
        for p in sorted((damaged / encdir("v1")).rglob("*"))
        if stat.S_ISREG(p.lstat().st_mode) and p.name != SIDE
    )
    os.setxattr(victim, "user.fscrypt.context", b"\x01\x01")
    out = world.base / "damaged.img"
    r = restore_image(damaged, out)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "not restored:" in ln]
    assert any("long name missing" in ln and names.name in ln for ln in lines), r.stderr
    assert any(victim.name in ln and "context" in ln for ln in lines), r.stderr
    assert e2fsck(out).returncode == 0, e2fsck(out).stdout
    with harness.mounted(out, world.base / "damaged.mnt") as (_dev, mnt):
        got = locked_names(mnt)
    rel_victim = os.path.relpath(victim, damaged)
    assert os.path.basename(rel_victim) not in got[os.path.dirname(rel_victim)]
    want = world.locked[os.path.relpath(names, damaged)]
    short = [n for n in want if parse_nokey_name(n.encode()).sha256 is None]
    assert short == got[os.path.relpath(names, damaged)]
    assert len(want) > len(got[os.path.relpath(names, damaged)])


def test_truncated_archive_is_reported_and_the_image_is_clean(world: World) -> None:
    cut = world.base / "cut.tar"
    data = world.archive.read_bytes()
    with tarfile.open(world.archive) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
    cut.write_bytes(data[: biggest.offset_data + biggest.size // 2])
    out = world.base / "cut.img"
    r = restore_image(cut, out)
    assert r.returncode == 1, r.stderr
    assert "not restored:" in r.stderr
    assert e2fsck(out).returncode == 0, e2fsck(out).stdout


def test_target_is_never_overwritten_without_force(world: World, tmp_path: Path) -> None:
    target = tmp_path / "exists.img"
    target.write_bytes(b"precious")
    r = restore_image(world.rsynced, target)
    assert r.returncode == 2
    assert "--force" in r.stderr
    assert target.read_bytes() == b"precious"


def test_a_loop_mounted_image_is_refused_even_with_force(world: World, tmp_path: Path) -> None:
    image = harness.mkfs(tmp_path / "busy.img", size_mb=8)
    with harness.mounted(image, tmp_path / "busy.mnt") as (dev, _mnt):
        r = restore_image(world.rsynced, Path(image), "--force")
        assert r.returncode == 2
        assert "in use" in r.stderr
        r = restore_image(world.rsynced, Path(dev), "--force")
        assert r.returncode == 2
        assert "mounted" in r.stderr or "in use" in r.stderr


def test_fscrypt_tool_unlocks_after_the_round_trip(tmp_path: Path) -> None:
    """google/fscrypt's passphrase protector and its .fscrypt metadata come back."""
    harness.require_fuse()
    env = dict(os.environ, FSCRYPT_CONF=os.fspath(tmp_path / "fscrypt.conf"))

    def fscrypt(*args: str | os.PathLike[str], root: Path, stdin: str = "") -> None:
        r = subprocess.run(
            ["fscrypt", *map(os.fspath, args)],
            input=stdin,
            capture_output=True,
            text=True,
            env=env | {"FSCRYPT_ROOT_MNT": os.fspath(root)},
            timeout=120,
        )
        assert r.returncode == 0, (args, r.stdout, r.stderr)

    image = harness.mkfs(tmp_path / "src.img", size_mb=32, features=("encrypt",))
    with harness.mounted(image, tmp_path / "src.mnt") as (_dev, mnt):
        fscrypt("setup", "--time=1ms", "--quiet", "--force", root=mnt)
        secret = mnt / "secret"
        secret.mkdir()
        fscrypt(
            "encrypt",
            "--source=custom_passphrase",
            "--name=admin-test",
            "--quiet",
            secret,
            root=mnt,
            stdin="correct horse\n",
        )
        (secret / "diary").write_bytes(b"dear diary\n" * 1000)
        (secret / "sub").mkdir()
        os.symlink("../diary", secret / "sub" / "link")
        fscrypt("lock", secret, root=mnt)
        assert "diary" not in os.listdir(secret)
    archive, out = view_tar_restored(image, tmp_path)
    assert e2fsck(out).returncode == 0
    with harness.mounted(out, tmp_path / "new.mnt") as (_dev, mnt):
        secret = mnt / "secret"
        assert "diary" not in os.listdir(secret)
        fscrypt("unlock", "--quiet", secret, root=mnt, stdin="correct horse\n")
        try:
            assert (secret / "diary").read_bytes() == b"dear diary\n" * 1000
            assert os.readlink(secret / "sub" / "link") == "../diary"
        finally:
            fscrypt("lock", secret, root=mnt)


def test_force_overwrites_an_image_with_options_passed_to_mke2fs(world: World) -> None:
    """An old filesystem is replaced; -O reaches mke2fs and the writer follows it."""
    target = harness.mkfs(world.base / "old.img", size_mb=300, features=("^metadata_csum",))
    r = restore_image(world.rsynced, target, "--force", "-q", "-O", "^metadata_csum,^dir_index")
    assert r.returncode == 0, r.stderr
    features = harness.dumpe2fs_header(target)["Filesystem features"].split()
    assert "metadata_csum" not in features and "dir_index" not in features
    assert os.path.getsize(target) == 300 << 20
    check_image(world, target, same_hashes=False)


def test_a_target_too_small_costs_files_never_the_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d1" / "d2").mkdir(parents=True)
    for i in range(2):
        (src / "d1" / f"f{i}").write_bytes(os.urandom(1 << 20))
    names = [f"small-file-with-a-long-name-{i}" for i in range(2000)]
    for n in names:
        (src / "d1" / "d2" / n).write_bytes(os.urandom(4096))
    out = tmp_path / "small.img"
    r = restore_image(src, out, "--size", "6M", "-O", "^has_journal")
    assert r.returncode == 1, r.stderr
    lost = {ln.split(": ")[2] for ln in r.stderr.splitlines() if "not restored:" in ln}
    assert lost and not lost & {"d1", "d1/d2"}, r.stderr
    assert e2fsck(out).returncode == 0, e2fsck(out).stdout
    listing = set(run("debugfs", "-R", "ls /d1/d2", out).stdout.split())
    assert {f"d1/d2/{n}" for n in names if n not in listing} == lost - {"d1/f0", "d1/f1"}


def restored_dirhash(tmp_path: Path, value: bytes | None, *extra: str) -> tuple[dict, str, int]:
    """restore-image of a tree whose root carries `value`; e2fsck checks the
    hashes of its htree directory, whose names have bytes >= 0x80 (where
    signed and unsigned hashes differ)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    tail = "\u00e9t\u00e9-" + "\u00fc" * 40
    for i in range(300):
        (src / "d" / f"{i:03d}-{tail}").touch()
    if value is not None:
        os.setxattr(src, "user.fscrypt.dirhash", value)
    out = tmp_path / "out.img"
    r = restore_image(src, out, *extra)
    assert e2fsck(out).returncode == 0, e2fsck(out).stdout
    assert "d" in run("debugfs", "-R", "ls -l /", out).stdout
    return harness.dumpe2fs_header(out), r.stderr, r.returncode


SEED = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("value", "algorithm", "flag"),
    [
        (b"tea_unsigned " + SEED.encode(), "tea", "unsigned_directory_hash"),
        (b"legacy " + SEED.encode(), "legacy", "signed_directory_hash"),
        (b"half_md4 " + bytes(32).hex()[:32].encode(), "half_md4", "signed_directory_hash"),
    ],
    ids=["tea-unsigned", "legacy-signed", "zero-seed"],
)
def test_the_backup_s_directory_hash_is_given_to_the_new_filesystem(
    tmp_path: Path, value: bytes, algorithm: str, flag: str
) -> None:
    header, err, rc = restored_dirhash(tmp_path, value)
    assert rc == 0, err
    seed = value.split()[1].decode()
    # dumpe2fs leaves out an all-zero seed (which the kernel reads as "no seed").
    assert header.get("Directory Hash Seed", "").replace("-", "") == (seed if int(seed, 16) else "")
    assert header["Default directory hash"] == algorithm
    assert header["Filesystem flags"].split() == [flag]


def test_hash_seed_given_by_the_admin_wins(tmp_path: Path) -> None:
    mine = "fedcba98-7654-3210-fedc-ba9876543210"
    header, err, rc = restored_dirhash(
        tmp_path, b"tea_unsigned " + SEED.encode(), "-E", f"hash_seed={mine}"
    )
    assert rc == 0, err
    assert header["Directory Hash Seed"] == mine
    assert header["Default directory hash"] == "tea"


@pytest.mark.parametrize(
    "value",
    [b"half_md4 0123", b"siphash " + SEED.encode(), b"half_md4  " + SEED.encode(), b""],
    ids=["short-seed", "unknown-algorithm", "two-spaces", "empty"],
)
def test_a_bad_directory_hash_is_reported_and_ignored(tmp_path: Path, value: bytes) -> None:
    header, err, rc = restored_dirhash(tmp_path, value)
    assert rc == 1, err
    assert "user.fscrypt.dirhash" in err and "ignored" in err
    assert header["Directory Hash Seed"].replace("-", "") != SEED


def test_inspect_shows_the_directory_hash(world: World, tmp_path: Path) -> None:
    header = harness.dumpe2fs_header(world.image)
    r = run(*CLI, "inspect", "--json", world.rsynced / encdir("v2"), world.rsynced / "plain")
    assert r.returncode == 0, r.stderr
    for info in json.loads(r.stdout):
        assert info["dirhash"] == {
            "algorithm": header["Default directory hash"],
            "seed": header["Directory Hash Seed"],
        }
    bad = tmp_path / "bad"
    bad.mkdir()
    os.setxattr(bad, "user.fscrypt.dirhash", b"half_md4 nothex")
    r = run(*CLI, "inspect", bad)
    assert r.returncode == 1
    assert "problem: user.fscrypt.dirhash seed is not 32 lowercase hex digits" in r.stdout


def test_tar_redirected_from_a_file_is_read_in_place(world: World) -> None:
    out = world.base / "redirected.img"
    with open(world.archive, "rb") as f:
        r = subprocess.run(
            [*CLI, "restore-image", "-", out], stdin=f, capture_output=True, text=True, timeout=300
        )
    assert r.returncode == 0, r.stderr
    assert "copying" not in r.stderr
    assert e2fsck(out).returncode == 0


def test_standard_input_without_room_for_its_copy_is_a_clear_fatal_error(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "never.img"
    with open(world.archive, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        assert cat.stdout is not None
        r = subprocess.run(
            [*CLI, "restore-image", "-q", "-", out],
            stdin=cat.stdout,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, TMPDIR=os.fspath(tmp_path / "missing")),
        )
        cat.stdout.close()
        cat.wait()
    assert r.returncode == 2
    assert "cannot copy standard input to" in r.stderr and "TMPDIR" in r.stderr
    assert not out.exists()


def test_a_fragmented_file_gets_a_deep_extent_tree(world: World, from_tar: Path) -> None:
    """2000 extents: depth 2 (the contents are compared with the keys by
    test_tar_backup_round_trip)."""
    block = harness.dumpe2fs_header(world.image)["Block size"]
    with harness.mounted(from_tar, world.base / "frag.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            ino = os.stat(mnt / encdir("v2") / FRAGMENTED).st_ino
            trees.lock(mnt, keys)
    assert extent_levels(from_tar, ino) == (2, FRAGMENTS), block


def test_a_plain_file_of_thirty_thousand_extents_gets_depth_three(tmp_path: Path) -> None:
    """1 KiB blocks: 84 extents a block, so 4 x 84 x 84 fit in depth 2."""
    src = tmp_path / "src"
    src.mkdir()
    os.setxattr(src, "user.fscrypt.block_size", b"1024")
    runs = 4 * 84 * 84 + 100
    fd = os.open(src / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(runs):
            os.pwrite(fd, b"%d" % (i % 9 + 1), 2048 * i)
    finally:
        os.close(fd)
    out = tmp_path / "deep.img"
    r = restore_image(src, out, "-q")
    assert r.returncode == 0, r.stderr
    assert harness.dumpe2fs_header(out)["Block size"] == "1024"
    check = e2fsck(out)
    assert check.returncode == 0, check.stdout
    with harness.mounted(out, tmp_path / "deep.mnt") as (_dev, mnt):
        assert (mnt / "sparse").read_bytes() == (src / "sparse").read_bytes()
        ino = os.stat(mnt / "sparse").st_ino
    assert extent_levels(out, ino) == (3, runs)


@pytest.fixture(scope="module")
def huge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory of 47,000 names of 255 bytes (hard links of one file), for
    1 KiB blocks: three entries a leaf, and a root of 123 entries over nodes
    of 126 (metadata_csum) hold 15,498 leaves in two levels."""
    src = tmp_path_factory.mktemp("hugedir") / "src"
    (src / "big").mkdir(parents=True)
    os.setxattr(src, "user.fscrypt.block_size", b"1024")
    (src / "file").write_bytes(b"one inode\n")
    for i in range(47_000):
        os.link(src / "file", src / "big" / (f"{i:06d}-" + "n" * 248))
    return src


def htree_levels_of(image: Path, path: str) -> int:
    out = run("debugfs", "-R", f"htree {path}", image).stdout
    m = re.search(r"Indirect levels: (\d+)", out)
    assert m, out[:2000]
    return int(m[1]) + 1


def test_a_directory_needing_three_htree_levels_gets_large_dir(
    huge_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "huge.img"
    r = restore_image(huge_dir, out, "-q")
    assert r.returncode == 0, r.stderr
    assert "large_dir" in harness.dumpe2fs_header(out)["Filesystem features"].split()
    check = e2fsck(out)
    assert check.returncode == 0, check.stdout
    assert htree_levels_of(out, "/big") == 3
    names = sorted(os.listdir(huge_dir / "big"))
    with harness.mounted(out, tmp_path / "huge.mnt") as (_dev, mnt):
        assert sorted(os.listdir(mnt / "big")) == names
        # Lookups go through the three levels: every 97th name, and the last.
        for name in [*names[::97], names[-1]]:
            assert (mnt / "big" / name).read_bytes() == b"one inode\n"
        assert os.stat(mnt / "file").st_nlink == 47_001


def test_without_large_dir_a_huge_directory_is_written_linear(
    huge_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "linear.img"
    r = restore_image(huge_dir, out, "-O", "^large_dir")
    assert r.returncode == 1, r.stderr
    assert "big: 47000 entries need 3 htree levels" in r.stderr
    assert "0 entries not restored" in r.stderr
    check = e2fsck(out)
    assert check.returncode == 0, check.stdout
    with harness.mounted(out, tmp_path / "linear.mnt") as (_dev, mnt):
        assert len(os.listdir(mnt / "big")) == 47_000
        assert os.stat(mnt / "file").st_nlink == 47_001


def test_xattrs_larger_than_a_block_come_back_in_ea_inodes(tmp_path: Path) -> None:
    """The kernel keeps them in EA inodes on the original (ea_inode); the view
    passes them through tar; the new image gets ea_inode and EA inodes."""
    harness.require_fuse()
    image = harness.mkfs(tmp_path / "src.img", size_mb=32, features=("encrypt", "ea_inode"))
    big = {
        "file": {"user.big": os.urandom(20_000), "user.small": b"x"},
        "dir": {"user.big": os.urandom(6_000)},
        "enc/file": {
            "user.a": os.urandom(2_000),
            "user.b": os.urandom(2_000),
            "user.c": os.urandom(2_000),
        },
        "enc/sub": {"user.big": os.urandom(65_000)},
    }
    with harness.mounted(image, tmp_path / "src.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            (mnt / "dir").mkdir()
            (mnt / "dir" / "inside").write_bytes(b"below a directory with a big xattr\n")
            (mnt / "enc").mkdir()
            trees.POLICY["v2"].apply(mnt / "enc", keys)
            (mnt / "enc" / "sub").mkdir()
            (mnt / "enc" / "sub" / "inside").write_bytes(b"secret\n")
            for rel in ("file", "enc/file"):
                (mnt / rel).write_bytes(rel.encode() * 1000)
            for rel, xs in big.items():
                for name, value in xs.items():
                    os.setxattr(mnt / rel, name, value)
            trees.stamp_mtimes(mnt)
            os.sync()
            plain = walk(mnt)
            trees.lock(mnt, keys)
    archive, out = view_tar_restored(image, tmp_path)
    assert "ea_inode" in harness.dumpe2fs_header(out)["Filesystem features"].split()
    check = e2fsck(out)
    assert check.returncode == 0, check.stdout
    with harness.mounted(out, tmp_path / "new.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            restored = walk(mnt)
            for rel, xs in big.items():
                for name, value in xs.items():
                    assert os.getxattr(mnt / rel, name) == value, (rel, name)
            trees.lock(mnt, keys)
    assert restored == plain
    # Without ea_inode: the files lose their entry, the directories (whose
    # entries are written first) only the xattr, and the image stays clean.
    out = tmp_path / "no-ea.img"
    r = restore_image(archive, out, "-O", "^ea_inode")
    assert r.returncode == 1, r.stderr
    lost = sorted(ln.split(": ")[2] for ln in r.stderr.splitlines() if "not restored:" in ln)
    assert len(lost) == 2 and lost[1] == "file" and lost[0].startswith("enc/"), r.stderr
    assert sum("xattr user.big left out" in ln for ln in r.stderr.splitlines()) == 2, r.stderr
    check = e2fsck(out)
    assert check.returncode == 0, check.stdout
    with harness.mounted(out, tmp_path / "no-ea.mnt") as (_dev, mnt):
        assert os.listxattr(mnt / "dir") == []
        assert (mnt / "dir" / "inside").read_bytes() == b"below a directory with a big xattr\n"
        with trees.keys_added(mnt) as keys:
            assert (mnt / "enc" / "sub" / "inside").read_bytes() == b"secret\n"
            assert not (mnt / "enc" / "file").exists()
            trees.lock(mnt, keys)


def test_what_the_backup_lacks_or_mixes_of_the_directory_hash_is_said(tmp_path: Path) -> None:
    """An older backup with encrypted entries but no user.fscrypt.dirhash, and a
    backup whose directories come from two filesystems: each said once, exit 0."""
    ctx = build_context(2, bytes(16), os.urandom(16)).to_bytes()
    older = tmp_path / "older"
    (older / "enc").mkdir(parents=True)
    os.setxattr(older / "enc", "user.fscrypt.context", ctx)
    r = restore_image(older, tmp_path / "older.img")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("does not record the directory hash seed") == 1, r.stderr
    mixed = tmp_path / "mixed"
    for d, seed in (("a", SEED), ("b", "f" * 32), ("c", "e" * 32)):
        (mixed / d).mkdir(parents=True)
        os.setxattr(mixed / d, "user.fscrypt.dirhash", b"half_md4 " + seed.encode())
    r = restore_image(mixed, tmp_path / "mixed.img")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("another directory hash seed") == 1, r.stderr
    first = harness.dumpe2fs_header(tmp_path / "mixed.img")["Directory Hash Seed"]
    assert first.replace("-", "") in (SEED, "f" * 32, "e" * 32)
