"""Filesystem.open() replays the journal: the reader's walk equals the kernel's.

An image is copied while still mounted, after a `sync` and then more
writes committed by fsync only: their inodes, directory blocks and
bitmaps live in the journal and not yet at home, so the copy needs
recovery.  The reader's walk of that copy (journal replayed into its
overlay) must equal what the kernel shows after mounting a second copy,
which it replays itself; without the replay the reader must see less,
else the test proves nothing.  Two encrypted directories (v1 and v2) are
written after the sync too: their names, contexts and contents, read as
ciphertext through the overlay and decrypted with the test keys, must match
what was written and what the kernel shows with the keys.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from ciphertextfs.ext4.errors import Ext4Error
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.fscrypt import kernel
from ciphertextfs.fscrypt.crypto import decrypt_contents
from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.fname import decrypt_filename, decrypt_symlink, parse_symlink_body
from ciphertextfs.fscrypt.policy import (
    parse_context,
)
from tests import harness, trees

EXT4_XATTR_INDEX_USER = 1
BS = 4096


def _fsync(path: Path) -> None:
    """fsync a directory: one jbd2 commit, no write-back of its home blocks."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, written: dict[str, bytes], root: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    written[os.fspath(path.relative_to(root))] = data


def _baseline(mnt: Path) -> None:
    """What is checkpointed before the copy: at home on disk."""
    (mnt / "base").mkdir()
    for i in range(20):
        (mnt / "base" / f"file-{i}").write_bytes(os.urandom(i * 300))
    (mnt / "base" / "doomed").write_bytes(b"deleted after the sync")
    (mnt / "base" / "renamed").write_bytes(b"renamed after the sync")
    os.symlink("file-1", mnt / "base" / "link")
    os.mkfifo(mnt / "base" / "fifo")
    os.setxattr(mnt / "base" / "file-2", "user.before", b"old value")


def _after_sync(mnt: Path, keys: dict[int, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
    """Writes committed by fsync only, so that their metadata lives in the journal."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    after = mnt / "after"
    after.mkdir()
    (after / "sub").mkdir()
    for i, n in enumerate((0, 1, 100, BS - 1, BS, 3 * BS + 5)):
        _write(after / f"f{i}-{'n' * (i * 20)}", os.urandom(n), files, mnt)
    _write(after / "sub" / "deep", b"in a subdirectory\n", files, mnt)
    os.link(after / ("f2-" + "n" * 40), after / "hard")
    files["after/hard"] = files["after/f2-" + "n" * 40]
    os.symlink("sub/deep", after / "fast")
    os.symlink("../" + "y" * 150 + "/slow", after / "slow")
    links["after/fast"] = "sub/deep"
    links["after/slow"] = "../" + "y" * 150 + "/slow"
    os.setxattr(after / "sub" / "deep", "user.tag", b"journal only")
    os.setxattr(mnt / "base" / "file-2", "user.before", b"new value, journal only")
    os.setxattr(mnt / "base" / "file-3", "user.added", os.urandom(300))
    (mnt / "base" / "doomed").unlink()
    os.rename(mnt / "base" / "renamed", after / "renamed")
    files["after/renamed"] = b"renamed after the sync"

    for pname in ("v1", "v2"):
        secret = mnt / f"secret-{pname}"
        secret.mkdir()
        trees.POLICY[pname].apply(secret, keys)
        (secret / "dir").mkdir()
        for i, n in enumerate((0, 17, BS + 1, 2 * BS)):
            _write(secret / f"{'s' * (i * 60 + 1)}", os.urandom(n), files, mnt)
        _write(secret / "dir" / "inner", b"encrypted, journal only\n", files, mnt)
        os.setxattr(secret / "dir" / "inner", "user.plain", b"user xattrs are not encrypted")
        os.symlink("dir/inner", secret / "fast")
        os.symlink("z" * 200, secret / "slow")
        links[f"secret-{pname}/fast"] = "dir/inner"
        links[f"secret-{pname}/slow"] = "z" * 200
        for p in (secret / "dir", secret):
            _fsync(p)

    for p in (after / "sub", after, mnt / "base", mnt):
        _fsync(p)
    return files, links


def _reader_object(fs: Filesystem, inode: Inode) -> tuple:
    """What the kernel would show for one inode, from the reader alone."""
    size = inode.i_size
    body: bytes | None = None
    context: bytes | None = None
    if inode.is_reg:
        if inode.is_encrypted:
            ctx, key = trees.file_key(fs, inode, for_filenames=False)
            ct = fs.read(inode, 0, ctx.ciphertext_size(size, fs.block_size))
            data = decrypt_contents(key, ct)[:size]
            context = trees.on_disk_context(fs, inode)[0]
        else:
            data = fs.read(inode, 0, size)
        body = hashlib.sha256(data).digest()
    elif inode.is_symlink:
        raw = fs.symlink_body(inode)
        if inode.is_encrypted:
            _ctx, key = trees.file_key(fs, inode, for_filenames=True)
            raw = decrypt_symlink(key, parse_symlink_body(raw))
        body = raw
        size = len(raw)
    elif inode.is_dir and inode.is_encrypted:
        context = trees.on_disk_context(fs, inode)[0]
    xattrs = tuple(
        sorted(
            (b"user." + x.name, x.value)
            for x in fs.xattrs(inode)
            if x.name_index == EXT4_XATTR_INDEX_USER
        )
    )
    return (
        inode.ino,
        inode.i_mode,
        inode.i_links_count,
        inode.i_uid,
        inode.i_gid,
        size,
        inode.i_mtime_ns,
        body,
        xattrs,
        context,
    )


def reader_walk(fs: Filesystem) -> dict[str, tuple]:
    """Every object below the root, names decrypted in encrypted directories."""
    out: dict[str, tuple] = {}

    def walk(dinode: Inode, prefix: str) -> None:
        dirkey = trees.file_key(fs, dinode, for_filenames=True)[1] if dinode.is_encrypted else None
        for e in fs.read_dir(dinode):
            name = e.name if dirkey is None else decrypt_filename(dirkey, e.name)
            rel = prefix + os.fsdecode(name)
            try:
                inode = fs.inode(e.inode)
                out[rel] = _reader_object(fs, inode)
                if inode.is_dir:
                    walk(inode, rel + "/")
            except (Ext4Error, FscryptError) as err:
                # An unreplayed copy may be inconsistent: record, go on.
                out[rel] = ("error", type(err).__name__)

    walk(fs.inode(2), "")
    return out


def _kernel_context(p: Path) -> bytes | None:
    try:
        policy = kernel.get_policy(p)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise
    ctx = trees.kernel_context(policy, kernel.get_nonce(p))
    return ctx.to_bytes()


def kernel_walk(root: Path) -> dict[str, tuple]:
    """The same description of a kernel mount, through os.* calls and ioctls."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            body: bytes | None = None
            context: bytes | None = None
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).digest()
                context = _kernel_context(p)
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(os.fsencode(p))
            elif stat.S_ISDIR(st.st_mode):
                context = _kernel_context(p)
            xattrs = tuple(
                sorted(
                    (os.fsencode(n), os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                    if n.startswith("user.")
                )
            )
            out[os.fspath(p.relative_to(root))] = (
                st.st_ino,
                st.st_mode,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                body,
                xattrs,
                context,
            )
    return out


def _take_snapshot(tmp: Path) -> tuple[Path, dict[str, bytes], dict[str, str]]:
    image = harness.mkfs(
        tmp / "live.img",
        size_mb=32,
        block_size=BS,
        features=("encrypt",),
        extra=["-J", "size=4", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    )
    snap = tmp / "snap.img"
    with harness.mounted(image, tmp / "live.mnt", options="commit=600") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            _baseline(mnt)
            os.sync()
            files, links = _after_sync(mnt, keys)
            shutil.copyfile(image, snap)
    return snap, files, links


def _only_in_journal(snap: Path, files: dict[str, bytes]) -> bool:
    """Whether the copy's home blocks still lack everything written after the sync.

    Writeback of the loop device's dirty metadata (a sync by anyone on the
    host, memory pressure) may put the newest blocks at home before the
    copy is taken; such a copy would test nothing.
    """
    with Filesystem.open(snap, replay_journal=False) as fs:
        stale = reader_walk(fs)
    return "base/doomed" in stale and not any(rel.split("/")[0] in stale for rel in files)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory):
    """A copy taken mid-flight, the plaintext written after the sync, and a kernel walk."""
    harness.require_kernel()
    for _attempt in range(3):
        tmp = tmp_path_factory.mktemp("journal")
        snap, files, links = _take_snapshot(tmp)
        if _only_in_journal(snap, files):
            break
    else:
        pytest.fail("three copies in a row had their journal already written back")
    kcopy = tmp / "kernel.img"
    shutil.copyfile(snap, kcopy)
    with harness.mounted(kcopy, tmp / "k.mnt", options="ro") as (_dev, kmnt):
        with trees.keys_added(kmnt):
            kernel_tree = kernel_walk(kmnt)
    return snap, files, links, kernel_tree


def test_copy_needs_recovery(snapshot) -> None:
    snap, _files, _links, _kernel = snapshot
    fields = harness.dumpe2fs_header(snap)
    assert "needs_recovery" in fields["Filesystem features"]
    assert int(fields["Journal start"]) != 0, "empty journal: nothing to replay"


def test_replayed_walk_equals_kernel(snapshot) -> None:
    snap, files, links, kernel_tree = snapshot
    with Filesystem.open(snap) as fs:
        ours = reader_walk(fs)
        assert fs.warnings == []
    assert ours == kernel_tree
    for rel, data in files.items():
        assert ours[rel][7] == hashlib.sha256(data).digest(), rel
    for rel, target in links.items():
        assert ours[rel][7] == target.encode(), rel
    assert "base/doomed" not in ours and "base/renamed" not in ours
    assert ours["base/file-2"][8] == ((b"user.before", b"new value, journal only"),)
    for pname in ("v1", "v2"):
        assert ours[f"secret-{pname}"][9] is not None
        assert parse_context(ours[f"secret-{pname}"][9]).version == int(pname[1])


def test_unreplayed_walk_differs(snapshot) -> None:
    snap, files, _links, kernel_tree = snapshot
    with Filesystem.open(snap, replay_journal=False) as fs:
        stale = reader_walk(fs)
    assert stale != kernel_tree
    # The directories made after the sync are only in the journal.
    assert not any(rel.split("/")[0] in stale for rel in files)
    assert "base/doomed" in stale


def test_encrypted_names_are_ciphertext_on_disk(snapshot) -> None:
    """The replayed directory blocks hold ciphertext names, not the plaintext."""
    snap, files, _links, _kernel = snapshot
    with Filesystem.open(snap) as fs:
        root = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}
        for pname in ("v1", "v2"):
            dinode = fs.inode(root[f"secret-{pname}".encode()])
            assert dinode.is_encrypted
            names = [e.name for e in fs.read_dir(dinode)]
            plain = {
                os.fsencode(r.split("/", 1)[1]) for r in files if r.startswith(f"secret-{pname}/")
            }
            plain = {p.split(b"/")[0] for p in plain} | {b"fast", b"slow"}
            assert not set(names) & plain
            _ctx, key = trees.file_key(fs, dinode, for_filenames=True)
            assert {decrypt_filename(key, n) for n in names} == plain
