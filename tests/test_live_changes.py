"""A watched live source: every change the owner makes shows in the view within a second.

The view of a mounted filesystem caches like a static one and forgets
exactly what fanotify reports changed (ciphertextfs.live).  Each test first
walks the view as a backup does, so that the kernel and the view hold every
entry, attribute and page with their long timeouts; then the owner changes
the filesystem through the kernel, and the view must show each change within
a second, in a plain directory and in an encrypted one whose key the owner
has (the kernel then reports plaintext names, the view shows no-key names).
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ciphertextfs.commands.mount import NO_WATCH_ENV
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.live import ChangeWatcher
from ciphertextfs.source import sync_directory
from ciphertextfs.view.model import View
from tests import harness, harness_view
from tests.harness_view import view_mount
from tests.trees import POLICY, keys_added

#: Within this many seconds of the change, the view must show it.
WATCHED = 1.0

#: The fallback (caches of the kernel and of the view expire every second).
FALLBACK = 2.5

NOT_WATCHED = "changes cannot be watched"

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode: os.posix_fallocate has none."""
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def within(limit: float, check: Callable[[], bool], what: str) -> None:
    start = time.monotonic()
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() - start > limit:
            pytest.fail(f"{what}: not visible through the view within {limit} s")
        time.sleep(0.01)


def view_names(d: Path) -> dict[int, str]:
    """inode -> name in the view's directory `d`."""
    return {os.lstat(d / n).st_ino: n for n in os.listdir(d)}


def backup_walk(view: Path) -> None:
    """What tar --xattrs does to every entry: stat, xattrs, contents."""
    for top, dirs, files in os.walk(view):
        for name in dirs + files:
            p = os.path.join(top, name)
            os.lstat(p)
            for x in os.listxattr(p, follow_symlinks=False):
                os.getxattr(p, x, follow_symlinks=False)
            if name in files:
                with open(p, "rb") as f:
                    f.read()


def make_files(d: Path) -> dict[str, int]:
    for name in "abdefgh":
        (d / name).write_bytes(name.encode() * 1000)
    return {name: os.stat(d / name).st_ino for name in "abdefgh"}


def exercise(src: Path, view: Path, limit: float) -> None:
    """Change, create, rename, delete, chmod, xattr, rename over: each seen within `limit`."""
    inos = {name: os.stat(src / name).st_ino for name in "abdefgh"}
    backup_walk(view)
    names = view_names(view)
    vname = {n: names[i] for n, i in inos.items()}
    encrypted = vname["a"] != "a"

    def contents(name: str) -> bytes:
        return (view / vname[name]).read_bytes()

    # Contents, with a new size, then again with the same size.
    before = contents("a")
    new = os.urandom(3000)
    (src / "a").write_bytes(new)
    if encrypted:
        within(
            limit,
            lambda: (
                os.getxattr(view / vname["a"], "user.fscrypt.size") == b"3000"
                and contents("a") != before
            ),
            "new contents",
        )
    else:
        within(limit, lambda: contents("a") == new, "new contents")
    before = contents("a")
    again = os.urandom(3000)
    with open(src / "a", "r+b") as f:
        f.write(again)
    if encrypted:
        within(limit, lambda: contents("a") not in (before, b"\0" * len(before)), "rewrite")
    else:
        within(limit, lambda: contents("a") == again, "same-size rewrite")

    # Create.
    (src / "n").write_bytes(b"new file")
    n_ino = os.stat(src / "n").st_ino
    within(limit, lambda: n_ino in view_names(view), "created file")
    if not encrypted:
        within(limit, lambda: (view / "n").read_bytes() == b"new file", "created contents")

    # Rename: the old name is gone, also for the kernel's cached dentry.
    os.rename(src / "b", src / "c")
    within(limit, lambda: not (view / vname["b"]).exists(), "renamed-away name")
    within(limit, lambda: inos["b"] in view_names(view), "renamed file under its new name")
    if not encrypted:
        assert os.stat(view / "c").st_ino == inos["b"]

    # Delete.
    os.unlink(src / "d")
    within(
        limit,
        lambda: not (view / vname["d"]).exists() and inos["d"] not in view_names(view),
        "deleted file",
    )

    # chmod, and a new xattr.
    os.chmod(src / "e", 0o640)
    within(limit, lambda: os.stat(view / vname["e"]).st_mode & 0o777 == 0o640, "chmod")
    os.setxattr(src / "f", "user.backup", b"please")
    within(limit, lambda: os.getxattr(view / vname["f"], "user.backup") == b"please", "new xattr")

    # An atomic save: g renamed over h.  The name h (the same no-key name
    # in an encrypted directory) must lead to g's inode.
    os.rename(src / "g", src / "h")
    within(limit, lambda: os.stat(view / vname["h"]).st_ino == inos["g"], "rename over")


def log_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("where", ["plain", "vault"])
def test_changes_seen_within_a_second(ext4, tmp_path, where):
    harness.require_fuse()
    with ext4(size_mb=32) as (_image, _dev, mnt), keys_added(mnt) as keys:
        src = mnt / where
        src.mkdir()
        if where == "vault":
            POLICY["v2"].apply(src, keys)
        make_files(src)
        log = tmp_path / "view.log"
        with view_mount(mnt, tmp_path / "view", extra=["--log", log]) as vm:
            view = vm.mountpoint / where
            exercise(src, view, WATCHED)
        assert NOT_WATCHED not in log_text(log)


def test_fallback_without_watcher(ext4, tmp_path, monkeypatch):
    """Where changes cannot be watched, the one-second expiry still shows them."""
    harness.require_fuse()
    monkeypatch.setenv(NO_WATCH_ENV, "1")
    with ext4(size_mb=32) as (_image, _dev, mnt):
        src = mnt / "plain"
        src.mkdir()
        make_files(src)
        log = tmp_path / "view.log"
        with view_mount(mnt, tmp_path / "view", extra=["--log", log]) as vm:
            exercise(src, vm.mountpoint / "plain", FALLBACK)
        assert NOT_WATCHED in log_text(log)


@pytest.mark.parametrize("where", ["plain", "vault"])
def test_tar_reports_file_changed_while_read(ext4, tmp_path, where):
    """GNU tar compares the file's ctime and size after reading it with those before."""
    harness.require_fuse()
    with ext4(size_mb=64) as (_image, _dev, mnt), keys_added(mnt) as keys:
        src = mnt / where
        src.mkdir()
        if where == "vault":
            POLICY["v2"].apply(src, keys)
        # Less than the page cache window (fuse.CACHE_WINDOW), whose drop would
        # refresh the attributes whether or not the change was reported.
        (src / "big").write_bytes(os.urandom(16 << 20))
        os.sync()
        with view_mount(mnt, tmp_path / "view") as vm:
            view = vm.mountpoint / where
            (name,) = os.listdir(view)
            tar = subprocess.Popen(
                # ./: a no-key name may begin with "-".
                ["tar", "--xattrs", "-cf", "-", "-C", view, f"./{name}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert tar.stdout is not None
            got = tar.stdout.read(1 << 20)  # tar is now blocked inside the file
            os.utime(src / "big", (1, 1))  # changes ctime, as any write would
            time.sleep(WATCHED)
            while chunk := tar.stdout.read(1 << 20):
                got += chunk
            err = tar.stderr.read().decode() if tar.stderr else ""
            assert tar.wait() == 1, err
            assert "file changed as we read it" in err
            assert len(got) > 16 << 20


def test_punched_extent_tree_is_read_again(ext4):
    """A change inside an extent tree leaf, with size and i_block unchanged, is seen.

    The file's mappings and the tree blocks they came from must be forgotten
    along with its inode; nothing else about it that the cache keys on moves.
    """
    with ext4(size_mb=32) as (_image, dev, mnt):
        path = mnt / "fragmented"
        other = mnt / "filler"
        block = 4096
        with open(path, "wb") as f, open(other, "wb") as g:
            for i in range(64):  # interleaved: every block its own extent
                f.write(bytes([i + 1]) * block)
                f.flush()
                os.fsync(f.fileno())
                g.write(b"x" * block)
                g.flush()
                os.fsync(g.fileno())
        os.sync()
        ino = os.stat(path).st_ino
        watcher = ChangeWatcher.open(os.fspath(mnt))
        fs = Filesystem.open(dev, replay_journal=False)
        try:
            view = View(
                fs,
                2,
                live=True,
                sync=functools.partial(sync_directory, os.fspath(mnt)),
                watched=True,
            )
            assert view.cache_timeout > 60
            assert fs.inode(ino).i_block[6:8] != b"\0\0"  # eh_depth > 0: a tree with leaves
            assert view.read(ino, 10 * block, block) == bytes([11]) * block
            fd = os.open(path, os.O_WRONLY)
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10 * block, block)
            finally:
                os.close(fd)
            inodes: set[int] = set()
            deadline = time.monotonic() + 5
            while ino not in inodes and time.monotonic() < deadline:
                changes = watcher.read()
                assert not changes.everything
                inodes |= changes.inodes
                time.sleep(0.01)
            assert ino in inodes
            view.apply_changes(inodes, {})
            assert view.read(ino, 10 * block, block) == bytes(block)
            assert view.read(ino, 11 * block, block) == bytes([12]) * block

            # Unreported changes stay unseen (the cache holds) until events
            # are lost and everything is forgotten, synced and read again.
            mode = view.attr(ino).st_mode
            os.chmod(path, 0o604)
            assert view.attr(ino).st_mode == mode
            inv = view.apply_changes(set(), {}, everything=True)
            assert ino in inv.inodes
            assert view.attr(ino).st_mode & 0o777 == 0o604
        finally:
            fs.close()
            watcher.close()


@pytest.mark.parametrize("where", ["plain", "vault"])
def test_churn_during_backup_then_view_matches(ext4, tmp_path, where):
    """Files created, rewritten, renamed and deleted while tar reads the view.

    The daemon survives, tar finishes, and a second after the churn stops
    the view shows exactly the source: names (by inode in the encrypted
    directory), modes, sizes and, in the plain one, contents.
    """
    import random
    import threading

    harness.require_fuse()
    with ext4(size_mb=64) as (_image, _dev, mnt), keys_added(mnt) as keys:
        src = mnt / "churn"
        src.mkdir()
        if where == "vault":
            POLICY["v2"].apply(src, keys)
        for i in range(300):
            (src / f"f{i}").write_bytes(os.urandom(random.randint(0, 9000)))
        with view_mount(mnt, tmp_path / "view") as vm:
            view = vm.mountpoint / "churn"
            stop = threading.Event()

            def churn() -> None:
                rnd = random.Random(5)
                n = 300
                while not stop.is_set():
                    i = rnd.randrange(n + 50)
                    p = src / f"f{i}"
                    op = rnd.random()
                    try:
                        if op < 0.4:
                            p.write_bytes(os.urandom(rnd.randint(0, 9000)))
                        elif op < 0.6:
                            os.rename(p, src / f"f{rnd.randrange(n + 50)}")
                        elif op < 0.8:
                            p.unlink()
                        else:
                            os.chmod(p, rnd.choice((0o600, 0o644, 0o640)))
                    except FileNotFoundError:
                        pass

            t = threading.Thread(target=churn)
            t.start()
            try:
                for _ in range(3):
                    subprocess.run(
                        ["tar", "--xattrs", "-cf", "-", "-C", view, "."],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=120,
                        check=False,
                    )
            finally:
                stop.set()
                t.join()

            diff: list[str] = []

            def same_by_inode() -> bool:
                diff.clear()
                want = {}
                for n in os.listdir(src):
                    st = os.stat(src / n)
                    want[st.st_ino] = (st.st_mode, st.st_size)
                got = {}
                for n in os.listdir(view):
                    st = os.stat(view / n)
                    size = int(os.getxattr(view / n, "user.fscrypt.size"))
                    got[st.st_ino] = (st.st_mode, size)
                if got != want:
                    diff.append(f"{sorted(set(got.items()) ^ set(want.items()))}")
                return got == want

            def same() -> bool:
                if where == "vault":
                    return same_by_inode()
                diff.clear()
                want = {n: (src / n).read_bytes() for n in os.listdir(src)}
                got = sorted(os.listdir(view))
                if got != sorted(want):
                    diff.append(f"names: {sorted(set(got) ^ set(want))}")
                    return False
                for n in got:
                    st, vst = os.stat(src / n), os.stat(view / n)
                    a = (st.st_ino, st.st_mode, st.st_size)
                    b = (vst.st_ino, vst.st_mode, vst.st_size)
                    if a != b:
                        diff.append(f"{n}: {a} in the source, {b} in the view")
                        return False
                    if (view / n).read_bytes() != want[n]:
                        diff.append(f"{n}: contents")
                        return False
                return True

            time.sleep(WATCHED)
            assert same(), f"the view a second after the churn: {diff}"
            assert harness_view.daemon_pids(vm.mountpoint) == [vm.pid]
