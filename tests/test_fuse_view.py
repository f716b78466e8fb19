"""The mounted view of a plain ext4 image against the kernel's own mount of it.

The kernel is the oracle: everything the view shows of an unencrypted tree
(names, inode numbers, modes, owners, times, contents, link targets,
xattrs, ACLs, statfs) must match what the kernel shows of the same image.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import common
from tests import harness
from tests.harness_view import view_mount
from tests.trees import file_sha256, listing

BIG = 40 << 20  # crosses the adapter's page cache window (32 MiB)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    harness.require_fuse()
    base = tmp_path_factory.mktemp("fuseview")
    img = harness.mkfs(base / "src.img", size_mb=96, features=("encrypt", "^has_journal"))
    with harness.mounted(img, base / "src.mnt") as (_dev, m):
        d = m / "d"
        d.mkdir()
        (d / "f").write_bytes(b"hello\n")
        os.setxattr(d / "f", "user.note", b"\x00binary\xff")
        os.link(d / "f", d / "hard")
        os.symlink("f", d / "sym")
        os.mkfifo(d / "fifo")
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (d / "big").write_bytes(os.urandom(BIG))
        with open(d / "sparse", "wb") as f:
            f.seek(5 << 20)
            f.write(b"tail")
        secret = d / "secret"
        secret.write_bytes(b"owner only\n")
        os.chown(secret, 1234, 1234)
        os.chmod(secret, 0o600)
        acl = d / "acl"
        acl.write_bytes(b"acl\n")
        os.chmod(acl, 0o600)
        harness.run("setfacl", "-m", "u:nobody:r", acl)
        os.setxattr(acl, "trusted.note", b"for root's eyes")
        many = m / "many"
        many.mkdir()
        for i in range(1500):
            (many / f"{i:05d}-{'x' * 90}").touch()
        # Every file type, spread over several readdir replies.
        kinds = m / "kinds"
        kinds.mkdir()
        for i in range(700):
            p = kinds / f"{i:04d}-{'k' * 100}"
            _make_kind(p, i % 7)
        # Small files, read ahead in batches and stored in the page cache on
        # open, mixed with files just above the read-ahead limit and holes.
        smalls = m / "smalls"
        smalls.mkdir()
        for i in range(400):
            size = (i * 7919) % (80 << 10)
            with open(smalls / f"s{i:03d}", "wb") as f:
                if i % 9 == 0:
                    f.seek(size // 2)
                f.write(os.urandom(size - f.tell()))
        os.utime(d / "f", ns=(1_000_000_123, 2_000_000_456))
    return img


def _make_kind(path: Path, kind: int) -> None:
    if kind == 0:
        path.touch()
    elif kind == 1:
        path.mkdir()
    elif kind == 2:
        os.symlink("target", path)
    elif kind == 3:
        os.mkfifo(path)
    elif kind == 4:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == 5:
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    else:
        # A socket's path must fit in sun_path: bound from its directory.
        cwd = os.getcwd()
        os.chdir(path.parent)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(cwd)


def test_view_matches_kernel_and_source_unchanged(image: Path, tmp_path: Path) -> None:
    before = file_sha256(image)
    with harness.mounted(image, tmp_path / "k", read_only=True) as (_dev, kmnt):
        expected = listing(kmnt)
        kernel_ls = sorted(os.listdir(kmnt / "many"))
        kernel_acl = harness.run("getfacl", "-n", "-p", kmnt / "d" / "acl")
    with view_mount(image, tmp_path / "v") as v:
        got = listing(v.mountpoint)
        names = os.listdir(v.mountpoint / "many")
        view_acl = harness.run("getfacl", "-n", "-p", v.mountpoint / "d" / "acl")
        root_ls = sorted(os.listdir(v.mountpoint))
    # On a filesystem that can encrypt, every directory carries the block size
    # and the directory hash (dumpe2fs's names and seed).
    header = harness.dumpe2fs_header(image)
    dirhash = f"{header['Default directory hash']} {header['Directory Hash Seed']}"
    for rel, t in list(got.items()):
        if stat.S_ISDIR(t[1]):
            xattrs = dict(t[10])
            assert xattrs.pop("user.fscrypt.block_size") == b"4096", rel
            assert xattrs.pop("user.fscrypt.dirhash") == dirhash.replace("-", "").encode(), rel
            got[rel] = (*t[:10], tuple(sorted(xattrs.items())))
    assert got == expected
    assert len(names) == len(set(names)) == 1500
    assert sorted(names) == kernel_ls
    assert view_acl.replace(os.fspath(tmp_path / "v"), "") == kernel_acl.replace(
        os.fspath(tmp_path / "k"), ""
    )
    assert "lost+found" in root_ls
    assert file_sha256(image) == before


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
DT_DIR = 4
_DIRENT64 = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; the name follows


def _getdents(
    path: Path, between: Callable[[list[bytes]], None] | None = None
) -> list[tuple[bytes, int, int]]:
    """(name, d_ino, d_type) of each entry but . and .., as getdents64 gives them.

    `between` is called with the names of each batch before the next call.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(32 << 10)
    out = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while (n := libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf))) != 0:
            if n < 0:
                raise OSError(ctypes.get_errno(), f"getdents64 of {path}")
            raw, at, batch = buf.raw[:n], 0, []
            while at < n:
                d_ino, _off, reclen, d_type = _DIRENT64.unpack_from(raw, at)
                name = raw[at + _DIRENT64.size : at + reclen].split(b"\0", 1)[0]
                at += reclen
                if name not in (b".", b".."):
                    out.append((name, d_ino, d_type))
                    batch.append(name)
            if between is not None:
                between(batch)
    finally:
        os.close(fd)
    return out


def test_listings_carry_attributes_only_for_readers_that_stat(image: Path, tmp_path: Path) -> None:
    """getdents through the view gives the kernel's names, inode numbers and types.

    A reader that stats only after the whole listing (tar) got the names
    alone after the first reply, and looks each one up; one that stats
    between its getdents calls (rsync) gets the attributes along after its
    second reply, and sends no lookup for the rest.  After a walk that
    stats nothing (find) even first replies go without attributes, until
    a reader looks a file up.  The kernel's tracepoint counts the lookups.
    """
    dirs = ("d", "many", "smalls", "kinds")
    with harness.mounted(image, tmp_path / "k", read_only=True) as (_dev, kmnt):
        expected = {d: sorted(_getdents(kmnt / d)) for d in dirs}
    assert len({d_type for _n, _i, d_type in expected["kinds"]}) == 7
    many = len(expected["many"])
    with common.tracefs() as trace:
        assert trace is not None, "this kernel has no fuse_request_send tracepoint"
        with view_mount(image, tmp_path / "v1") as v:
            with common.fuse_requests(trace, v.mountpoint) as after:
                got = {d: sorted(_getdents(v.mountpoint / d)) for d in dirs}
                for name, _ino, _type in got["many"]:
                    os.lstat(v.mountpoint / "many" / os.fsdecode(name))
        with view_mount(image, tmp_path / "v2") as v:
            many_dir = v.mountpoint / "many"

            def stat_batch(names: list[bytes]) -> None:
                for name in names:
                    os.lstat(many_dir / os.fsdecode(name))

            with common.fuse_requests(trace, v.mountpoint) as between:
                got_between = sorted(_getdents(many_dir, stat_batch))
        with view_mount(image, tmp_path / "v3") as v:
            # find's walk stats nothing but the directories it enters ...
            for name, _ino, d_type in expected["kinds"]:
                if d_type == DT_DIR:
                    _getdents(v.mountpoint / "kinds" / os.fsdecode(name))
            # ... and then a reader that stats its listings comes along.
            with common.fuse_requests(trace, v.mountpoint) as after_walk:
                for name, _ino, _type in _getdents(v.mountpoint / "smalls"):
                    os.lstat(v.mountpoint / "smalls" / os.fsdecode(name))
    assert got == expected
    assert got_between == expected["many"]
    assert after["LOOKUP"] >= many * 2 // 3, after
    assert between["LOOKUP"] <= many // 3, between
    assert after_walk["LOOKUP"] >= len(expected["smalls"]), after_walk  # and smalls itself


def test_small_file_opened_twice_at_once(image: Path, tmp_path: Path) -> None:
    """A second open while the first is live reads the same bytes (no page cache store)."""
    with harness.mounted(image, tmp_path / "k", read_only=True) as (_dev, kmnt):
        expected = (kmnt / "smalls" / "s005").read_bytes()
    with view_mount(image, tmp_path / "v") as v:
        path = v.mountpoint / "smalls" / "s005"
        with open(path, "rb") as first, open(path, "rb") as second:
            assert second.read() == expected
            assert first.read() == expected
        assert path.read_bytes() == expected


_CONCURRENT_READERS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

files = sorted(Path(sys.argv[1]).iterdir())


def reader(k):
    got = {}
    for _round in range(5):
        for f in files[k::2] + files[: k + 1]:
            got[f.name] = f.read_bytes()
    return got


with ThreadPoolExecutor(6) as pool:
    results = list(pool.map(reader, range(6)))
merged = {}
for r in results:
    for name, data in r.items():
        assert merged.setdefault(name, data) == data, name
print(len(merged))
"""


def test_concurrent_readers_of_small_files(image: Path, tmp_path: Path) -> None:
    """Six readers opening the same small files at once neither hang nor see wrong bytes.

    open() stores a small file in the page cache only when nobody else has
    it open; this drives opens that overlap other readers' reads.
    """
    with harness.mounted(image, tmp_path / "k", read_only=True) as (_dev, kmnt):
        expected = {p.name: p.read_bytes() for p in (kmnt / "smalls").iterdir()}
    with view_mount(image, tmp_path / "v") as v:
        harness.drop_caches()
        done = subprocess.run(
            [sys.executable, "-c", _CONCURRENT_READERS, v.mountpoint / "smalls"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == len(expected)
        for name, data in expected.items():
            assert (v.mountpoint / "smalls" / name).read_bytes() == data, name


def test_a_stalled_large_read_does_not_stall_other_requests(image: Path, tmp_path: Path) -> None:
    """While one large read waits on the device, the view answers everyone else.

    The loop keeps its read turn until a handler is about to wait
    (ciphertextfs.fuseloop); a read that went to a worker thread without
    handing the turn over would leave every other request queued behind it.
    """
    gate, mnt = tmp_path / "gate", tmp_path / "v"
    gate.mkdir()
    mnt.mkdir()
    repo = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.gated_view", image, mnt, gate], cwd=repo
    )
    reader = None
    try:
        _wait_for(gate / "ready", server)
        big = mnt / "d" / "big"
        reader = subprocess.Popen(
            ["dd", f"if={big}", "of=/dev/null", "bs=1M", "count=1", "iflag=direct"],
            stderr=subprocess.PIPE,
        )
        _wait_for(gate / "reading", server)
        answers: dict[str, object] = {}

        def others() -> None:
            answers["listxattr"] = os.listxattr(mnt / "d" / "f")
            answers["getxattr"] = os.getxattr(mnt / "d" / "f", "user.note")
            answers["listdir"] = sorted(os.listdir(mnt / "d"))

        worker = threading.Thread(target=others, daemon=True)
        worker.start()
        worker.join(10)
        answered_while_stalled = not worker.is_alive()
        assert reader.poll() is None, "the large read did not wait at the gate"
        (gate / "go").touch()
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        worker.join(60)
        assert answered_while_stalled, "other requests waited for the stalled read"
        assert answers["getxattr"] == b"\x00binary\xff"
        assert "user.note" in answers["listxattr"]
        assert "big" in answers["listdir"] and "f" in answers["listdir"]
    finally:
        (gate / "go").touch()
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        harness.unmount(mnt)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert server.returncode == 0


def test_large_reads_move_into_the_loop_once_fast_and_back_after_a_slow_one(image: Path) -> None:
    """The adapter answers large reads where `ReadPlace` says, and tells it what each took.

    In process, over the real image: the handler is called as pyfuse3
    calls it, and the view notes in which thread each read ran.
    """
    import trio

    from ciphertextfs.ext4.fs import Filesystem
    from ciphertextfs.fuse import SMALL_READ, CiphertextOperations
    from ciphertextfs.readplace import FAST, PROOF
    from ciphertextfs.view.model import View

    class Noting(View):
        delay = 0.0
        threads: list[bool] = []

        def read(self, ino: int, offset: int, length: int) -> bytes:
            self.threads.append(threading.current_thread() is threading.main_thread())
            time.sleep(self.delay)
            return super().read(ino, offset, length)

    size = 2 * SMALL_READ
    with Filesystem.open(image) as fs:
        view = Noting(fs)
        big = view.lookup(view.lookup(view.root_ino, b"d"), b"big")
        ops = CiphertextOperations(view)

        async def reads(count: int, delay: float) -> list[bytes]:
            view.delay = delay
            return [await ops.read(big, i * size, size) for i in range(count)]

        data = trio.run(reads, PROOF + 1, 0.0)
        assert view.threads == [False] * PROOF + [True]
        assert b"".join(data) == fs.read(fs.inode(big), 0, (PROOF + 1) * size)
        view.threads.clear()
        trio.run(reads, 2, FAST * 2)
        assert view.threads == [True, False]


def _wait_for(path: Path, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert server.poll() is None, f"the view exited ({server.returncode})"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


def test_statfs_matches_kernel(image: Path, tmp_path: Path) -> None:
    with harness.mounted(image, tmp_path / "k", read_only=True) as (_dev, kmnt):
        k = os.statvfs(kmnt)
    dumpe2fs = harness.run("dumpe2fs", "-h", image)
    block_count = int(
        next(ln for ln in dumpe2fs.splitlines() if ln.startswith("Block count:")).split(":")[1]
    )
    with view_mount(image, tmp_path / "v") as v:
        s = os.statvfs(v.mountpoint)
    assert (s.f_bsize, s.f_bfree, s.f_bavail) == (k.f_bsize, k.f_bfree, k.f_bavail)
    assert (s.f_files, s.f_ffree, s.f_namemax) == (k.f_files, k.f_ffree, k.f_namemax)
    assert s.f_blocks == block_count


def test_writes_fail_with_erofs(image: Path, tmp_path: Path) -> None:
    before = file_sha256(image)
    with view_mount(image, tmp_path / "v") as v:
        m = v.mountpoint
        for argv in (
            ["touch", m / "new"],
            ["touch", m / "d" / "f"],
            ["mkdir", m / "newdir"],
            ["rm", "-f", m / "d" / "f"],
            ["rmdir", m / "many"],
            ["mv", m / "d" / "f", m / "d" / "g"],
            ["ln", m / "d" / "f", m / "d" / "link2"],
            ["setfattr", "-n", "user.x", "-v", "1", m / "d" / "f"],
            ["setfattr", "-x", "user.note", m / "d" / "f"],
            ["truncate", "-s", "0", m / "d" / "f"],
            ["chmod", "777", m / "d" / "f"],
            ["sh", "-c", f"echo x >> {m / 'd' / 'f'}"],
        ):
            proc = subprocess.run(argv, capture_output=True, text=True)
            assert proc.returncode != 0, argv
            assert "Read-only file system" in proc.stderr, (argv, proc.stderr)
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(m / "d" / "f", flags)
            assert e.value.errno == errno.EROFS
        assert (m / "d" / "f").read_bytes() == b"hello\n"
    assert file_sha256(image) == before


def test_permissions_enforced_for_other_users(image: Path, tmp_path: Path) -> None:
    """default_permissions: the daemon runs as root, the kernel checks modes and ACLs."""
    # pytest's temporary directories are private to root: mount where others can reach.
    top = Path(tempfile.mkdtemp(prefix="ctfs-perm-", dir="/tmp"))
    top.chmod(0o755)
    try:
        _check_permissions(image, top / "v")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _check_permissions(image: Path, mountpoint: Path) -> None:
    with view_mount(image, mountpoint, options=["allow_other"]) as v:
        secret = v.mountpoint / "d" / "secret"
        acl = v.mountpoint / "d" / "acl"
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        denied = subprocess.run([*as_nobody, "cat", secret], capture_output=True, text=True)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        granted = subprocess.run([*as_nobody, "cat", acl], capture_output=True)
        assert granted.returncode == 0 and granted.stdout == b"acl\n"
        listed = subprocess.run([*as_nobody, "ls", v.mountpoint / "d"], capture_output=True)
        assert listed.returncode == 0 and b"secret" in listed.stdout
        # trusted.* names are listed to root only, as ext4 does.
        assert "trusted.note" in os.listxattr(acl)
        names = subprocess.run(
            [*as_nobody, "/usr/bin/python3", "-c", f"import os; print(os.listxattr({str(acl)!r}))"],
            capture_output=True,
            text=True,
        )
        assert names.returncode == 0, names.stderr
        assert "system.posix_acl_access" in names.stdout
        assert "trusted.note" not in names.stdout
        mine = subprocess.run(
            ["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", "cat", secret],
            capture_output=True,
        )
        assert mine.stdout == b"owner only\n"


def test_damaged_inode_answers_eio_and_the_daemon_survives(image: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.img"
    harness.run("cp", "--sparse=always", image, damaged)
    # Zero the extent header magic of d/f: its data can no longer be mapped.
    harness.run("debugfs", "-w", "-R", "sif /d/f block[0] 0", damaged)
    with view_mount(damaged, tmp_path / "v") as v:
        with pytest.raises(OSError) as e:
            (v.mountpoint / "d" / "f").read_bytes()
        assert e.value.errno == errno.EIO
        assert (v.mountpoint / "d" / "secret").read_bytes() == b"owner only\n"
        assert len(os.listdir(v.mountpoint / "many")) == 1500
