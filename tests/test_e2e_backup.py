"""End to end: kernel-encrypted ext4 -> FUSE view -> tar / rsync / cp -> decrypt.

One image holds an unencrypted tree and one encrypted tree per policy the
kernel accepts.  The plaintext as the kernel shows it with the keys present
is the oracle for every restore; the kernel with the keys removed is the
oracle for the view's names and inode numbers; debugfs and the fscrypt
ioctls are the oracle for the view's ciphertext and xattrs.  Only real
tools touch the view.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciphertextfs.fscrypt import kernel
from tests import harness, trees
from tests.harness_restore import SIDE, debugfs, walk
from tests.harness_view import CLI, ViewMount, view_mount

BLOCK = 4096
FULL_TREES = ("v1", "v2")
#: Files whose view content is checked against the raw blocks on disk.
PROBES = ("sizes/f0", "sizes/f17", f"sizes/f{BLOCK + 1}", "xattrs/tagged")


def encdir(policy: trees.Policy) -> str:
    return f"enc-{policy.name}"


def kernel_context(path: Path) -> bytes:
    """The on-disk fscrypt context rebuilt from what the kernel's ioctls report."""
    pol = kernel.get_policy(path)
    nonce = kernel.get_nonce(path)
    if pol.version == 0:
        return bytes([1, pol.contents_mode, pol.filenames_mode, pol.flags]) + pol.key_spec + nonce
    head = bytes([2, pol.contents_mode, pol.filenames_mode, pol.flags, pol.log2_data_unit_size])
    return head + bytes(3) + pol.key_spec + nonce


def locked_walk(root: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """(st_ino, st_mode, uid, gid, mtime_ns) per path as the kernel shows it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[os.fspath(p.relative_to(root))] = (
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
            )
    return out


@dataclass
class World:
    base: Path
    image: Path
    sha256: str
    plain: dict  # walk() of the unlocked tree: the restore oracle
    locked: dict[str, tuple[int, int, int, int, int]]  # the kernel's no-key view
    plain_ino: dict[str, int]  # unlocked path -> inode number
    contexts: dict[str, bytes]  # unlocked path -> context from the ioctls
    sizes: dict[str, int]  # unlocked path -> real size
    v2_key: Path
    v1_key: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    harness.require_fuse()
    base = tmp_path_factory.mktemp("e2e")
    image = harness.mkfs(
        base / "src.img", size_mb=64, block_size=BLOCK, features=("encrypt", "stable_inodes")
    )
    v2_key = base / "v2.key"
    v2_key.write_bytes(trees.TEST_KEY_V2)
    v1_key = base / "v1.key"
    v1_key.write_bytes(trees.TEST_KEY_V1)
    with harness.mounted(image, base / "src.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            (mnt / "plain").mkdir()
            trees.write_tree(mnt / "plain", BLOCK, small=True)
            for policy in trees.POLICIES:
                d = mnt / encdir(policy)
                d.mkdir()
                policy.apply(d, keys)
                trees.write_tree(d, BLOCK, small=policy.name not in FULL_TREES)
            trees.stamp_mtimes(mnt)
            os.sync()
            plain = walk(mnt)
            plain_ino = {rel: os.lstat(mnt / rel).st_ino for rel in plain}
            contexts, sizes = {}, {}
            for policy in trees.POLICIES:
                for rel in [encdir(policy), *(f"{encdir(policy)}/{p}" for p in PROBES)]:
                    contexts[rel] = kernel_context(mnt / rel)
                    sizes[rel] = os.lstat(mnt / rel).st_size
            trees.lock(mnt, keys)
        locked = locked_walk(mnt)
    return World(
        base=base,
        image=image,
        sha256=trees.file_sha256(image),
        plain=plain,
        locked=locked,
        plain_ino=plain_ino,
        contexts=contexts,
        sizes=sizes,
        v2_key=v2_key,
        v1_key=v1_key,
    )


@pytest.fixture(scope="module")
def view(world: World):
    with view_mount(world.image, world.base / "view") as v:
        yield v


@dataclass
class Backups:
    runs: dict[str, subprocess.CompletedProcess]
    archive: Path
    extracted: Path
    rsynced: Path
    copied: Path


def run(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, check=False, timeout=120
    )


@pytest.fixture(scope="module")
def backups(world: World, view: ViewMount) -> Backups:
    b = world.base
    m = view.mountpoint
    xa = ("--xattrs", "--xattrs-include=*", "--acls")
    archive, extracted = b / "view.tar", b / "extracted"
    rsynced, copied = b / "rsynced", b / "copied"
    extracted.mkdir()
    runs = {
        "tar -c": run("tar", *xa, "-cf", archive, "-C", m, "."),
        "tar -x": run("tar", *xa, "-xpf", archive, "-C", extracted),
        "rsync": run("rsync", "-aHAX", f"{m}/", rsynced),
        "cp -a": run("cp", "-a", m, copied),
        "getfattr": run("getfattr", "-h", "-d", "-m", "-", "-R", m),
        "find": run("find", m),
        "stat": run("find", m, "-exec", "stat", "{}", "+"),
    }
    return Backups(runs, archive, extracted, rsynced, copied)


def decrypt(world: World, source: Path, dest: Path) -> subprocess.CompletedProcess:
    return run(
        *CLI,
        "decrypt",
        "--key",
        world.v2_key,
        "--v1-key",
        f"{trees.TEST_KEY_V1_DESCRIPTOR.hex()}={world.v1_key}",
        source,
        dest,
    )


def view_path(world: World, rel: str) -> str:
    """The path under which the view shows the plaintext path `rel` (via its inode)."""
    ino = world.plain_ino[rel]
    found = [p for p, t in world.locked.items() if t[0] == ino]
    assert len(found) == 1, (rel, found)
    return found[0]


def test_tools_succeed_on_the_view(backups: Backups) -> None:
    for what, proc in backups.runs.items():
        assert proc.returncode == 0, (what, proc.stderr.decode(errors="replace"))
    out = backups.runs["getfattr"].stdout
    # Every encrypted regular file carries its size; every policy shows up.
    assert out.count(b"user.fscrypt.size=") >= len(trees.POLICIES) * 30
    assert b"Read-only" not in backups.runs["find"].stderr


def test_view_names_are_the_kernels_nokey_names(world: World, view: ViewMount) -> None:
    got = locked_walk(view.mountpoint)
    sides = {p for p in got if os.path.basename(p) == SIDE}
    # Exactly the encrypted directories with a name longer than 149 ciphertext
    # bytes have a side file: in the full trees names/, links/, links/other,
    # special/ (in the small trees too: the long names are there as well).
    assert {os.path.dirname(p) for p in sides} == {
        view_path(world, f"{encdir(p)}/{d}")
        for p in trees.POLICIES
        for d in ("names", "links", "links/other", "special")
    }
    for p in sides:
        del got[p]
    assert sorted(got) == sorted(world.locked)
    assert got == world.locked
    for policy in trees.POLICIES:
        ls_view = run("ls", "-a", view.mountpoint / encdir(policy))
        names = sorted(ls_view.stdout.decode().split())
        locked_names = sorted(p for p in world.locked if os.path.dirname(p) == encdir(policy))
        assert names == sorted([".", "..", *(os.path.basename(p) for p in locked_names)])


def test_view_ciphertext_and_xattrs_match_disk(world: World, view: ViewMount) -> None:
    probes = [(p, f"{encdir(p)}/{rel}") for p in trees.POLICIES for rel in PROBES]
    cmds = []
    for _policy, rel in probes:
        cmds.append(f"blocks <{world.plain_ino[rel]}>")
    out = debugfs(world.image, cmds)
    blocks: dict[int, list[int]] = {}
    for chunk in out.split("debugfs: ")[1:]:
        head, _, body = chunk.partition("\n")
        ino = int(head.strip().split("<")[1].rstrip(">"))
        blocks[ino] = [int(x) for x in body.split()]
    with open(world.image, "rb") as img:
        for _policy, rel in probes:
            real = world.sizes[rel]
            vp = view.mountpoint / view_path(world, rel)
            data = vp.read_bytes()
            ct_size = -(-real // 16) * 16
            assert len(data) == ct_size == os.lstat(vp).st_size, rel
            disk = b""
            for pblk in blocks[world.plain_ino[rel]]:
                img.seek(pblk * BLOCK)
                disk += img.read(BLOCK)
            assert data == disk[:ct_size], rel
            assert os.getxattr(vp, "user.fscrypt.size") == str(real).encode(), rel
            assert os.getxattr(vp, "user.fscrypt.context") == world.contexts[rel], rel
            # Format 2: the block size is the directory's, not each file's.
            assert "user.fscrypt.block_size" not in os.listxattr(vp)
            assert os.getxattr(vp.parent, "user.fscrypt.block_size") == str(BLOCK).encode()
    for policy in trees.POLICIES:
        d = view.mountpoint / encdir(policy)
        assert os.getxattr(d, "user.fscrypt.context") == world.contexts[encdir(policy)]


def test_the_oracle_holds_every_shape(world: World) -> None:
    """The comparison below is only as good as the plaintext snapshot it uses."""
    nodes = world.plain.values()
    kinds = {n.kind for n in nodes}
    assert kinds == {oct(k) for k in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)} | {
        oct(stat.S_IFIFO),
        oct(stat.S_IFCHR),
        oct(stat.S_IFBLK),
    }
    xattr_names = {x for n in nodes for x, _ in n.xattrs}
    assert {"user.comment", "user.binary", "user.dir"} <= xattr_names
    assert {"system.posix_acl_access", "system.posix_acl_default"} <= xattr_names
    # The hard link in 3 places, in every tree (the plain one included).
    linked = [r for r, n in world.plain.items() if n.link_group]
    assert len(linked) == 3 * (len(trees.POLICIES) + 1)
    assert len(world.plain) > 2 * 1100
    assert any(n.uid == 1234 and n.gid == 4321 for n in nodes)


@pytest.mark.parametrize("source", ["archive", "extracted", "rsynced", "copied"])
def test_decrypt_restores_the_plaintext(
    world: World, backups: Backups, source: str, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    proc = decrypt(world, getattr(backups, source), dest)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    got = walk(dest)
    assert sorted(got) == sorted(world.plain)
    for rel, node in world.plain.items():
        assert got[rel] == node, rel


def test_writes_fail_with_erofs(world: World, view: ViewMount) -> None:
    m = view.mountpoint
    target = m / view_path(world, "enc-v2/sizes/f17")
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(target, flags)
        assert e.value.errno == errno.EROFS
    for act in (
        lambda: os.mkdir(m / "enc-v2" / "new"),
        lambda: os.setxattr(target, "user.fscrypt.size", b"1"),
        lambda: os.unlink(target),
    ):
        with pytest.raises(OSError) as e:
            act()
        assert e.value.errno == errno.EROFS


def test_view_of_live_directory_same_with_and_without_key(world: World, view: ViewMount) -> None:
    """SOURCE = the root of the mounted ext4: the key in the kernel changes nothing."""
    image_view = trees.listing(view.mountpoint)
    with harness.mounted(world.image, world.base / "live.mnt", read_only=True) as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            listed = sorted(os.listdir(mnt / "enc-v2" / "sizes"))
            assert "f17" in listed  # unlocked indeed
            with view_mount(mnt, world.base / "live-unlocked") as v:
                unlocked = trees.listing(v.mountpoint)
            trees.lock(mnt, keys)
        assert "f17" not in os.listdir(mnt / view_path(world, "enc-v2/sizes"))
        with view_mount(mnt, world.base / "live-locked") as v:
            locked = trees.listing(v.mountpoint)
    assert sorted(unlocked) == sorted(locked)
    assert unlocked == locked
    # The image and the live directory show the same view.
    assert locked == image_view


def test_source_image_unchanged(world: World, backups: Backups) -> None:
    assert trees.file_sha256(world.image) == world.sha256
