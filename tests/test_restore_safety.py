"""A restore running as root on data others control.

The attacker is a real unprivileged user (created for the test, removed
however it ends) who owns DEST's parent, or the tree backup, and swaps
directories and files for symlinks to root-owned places and for FIFOs
while the restore runs.  Nothing outside DEST may change, nothing only
root may read may reach DEST, the restore may not hang, and whatever it
could not restore is reported.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PY = [sys.executable, "-m", "ciphertextfs", "decrypt"]
ROUNDS = 3
# The attacker's interpreter: the test's own may live where it cannot read.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def attacker() -> Iterator[tuple[int, int]]:
    """A throwaway unprivileged user: (uid, gid)."""
    if os.geteuid() != 0:
        raise RuntimeError("these tests need root to create a test user")
    name = f"ctfs-rsafe-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        import pwd

        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", "-f", name], check=False, capture_output=True)


@pytest.fixture
def arena() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ctfs-rsafe-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid)
    return out


def key_file(where: Path) -> Path:
    k = where / "key"
    k.write_bytes(os.urandom(64))
    return k


def plain_tree(root: Path, dirs: int, files: int, data: bytes = b"public\n") -> int:
    """An unencrypted tree backup; returns its number of entries."""
    root.mkdir()
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir()
        for f in range(files):
            (sub / f"f{f:03d}").write_bytes(data)
    return 1 + dirs * (1 + files)


class Attacker:
    """A Python loop run as the attacker until told to stop; counts its swaps."""

    def __init__(self, uid_gid: tuple[int, int], code: str, *args: str | Path) -> None:
        self.stop = Path(tempfile.mktemp(prefix="ctfs-rsafe-stop-"))
        self.out = Path(tempfile.mktemp(prefix="ctfs-rsafe-out-"))
        uid, gid = uid_gid
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", code, self.stop, self.out, *map(os.fspath, args)],
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
        )

    def finish(self) -> int:
        self.stop.touch()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stop.unlink(missing_ok=True)
        swaps = int(self.out.read_text()) if self.out.exists() else 0
        self.out.unlink(missing_ok=True)
        return swaps


# The attacker owns DEST's parent (and, when it made DEST, DEST): it
# replaces each new directory of DEST by a symlink to the root-owned
# target, and DEST itself, again and again.
DEST_ATTACK = r"""
import os, sys, time
stop, out, parent, target = sys.argv[1:]
dest = parent + "/dest"
swaps = i = 0
seen = set()
# DEST itself is swapped once the restore has opened it (earlier, the
# restore refuses a DEST that is a symlink and restores nothing).
def opened():
    try:
        return bool(os.listdir(dest))  # an attacker-made DEST: entries appear
    except PermissionError:
        return True  # a DEST the restore made (mode 0700)
    except OSError:
        return False
while not opened() and not os.path.exists(stop):
    pass
time.sleep(0.05)
try:
    while not os.path.exists(stop):
        i += 1
        try:
            names = os.listdir(dest) if not os.path.islink(dest) else []
        except OSError:
            names = []
        for n in names:
            p = dest + "/" + n
            if n.startswith("moved") or n in seen or os.path.islink(p):
                continue
            try:
                os.rename(p, f"{dest}/moved{i}-{n}")
                os.symlink(target, p)
                seen.add(n)
                swaps += 1
            except OSError:
                pass
        if i % 3 == 0:
            try:
                os.rename(dest, f"{parent}/old")
                os.symlink(target, dest)
                swaps += 1
                time.sleep(0.002)
                os.unlink(dest)
                os.rename(f"{parent}/old", dest)
            except OSError:
                pass
finally:
    with open(out, "w") as f:
        f.write(str(swaps))
"""


def test_dest_swapped_for_symlinks(attacker, arena: Path) -> None:
    uid, gid = attacker
    target = arena / "target"
    (target / "sub").mkdir(parents=True)
    (target / "file").write_bytes(b"root's\n")
    target.chmod(0o755)
    before = snapshot(target)
    backup = arena / "backup"
    total = plain_tree(backup, 30, 100)
    key = key_file(arena)
    reported = 0
    for rnd in range(ROUNDS):
        parent = arena / f"p{rnd}"
        parent.mkdir()
        os.chown(parent, uid, gid)
        if rnd % 2 == 0:  # the attacker made DEST (empty): it may rename inside
            (parent / "dest").mkdir()
            os.chown(parent / "dest", uid, gid)
        att = Attacker(attacker, DEST_ATTACK, parent, target)
        try:
            time.sleep(0.2)
            proc = subprocess.run(
                [*PY, "--key", key, backup, parent / "dest"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            swaps = att.finish()
        assert snapshot(target) == before, proc.stderr[-2000:]
        assert swaps > 0, "the attacker never swapped anything: the test proves nothing"
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        lines = [x for x in proc.stderr.splitlines() if "not restored" in x]
        reported += len(lines)
        # Every file this restore created is below DEST (under whatever name
        # the attacker gave its directories), each entry once, or reported.
        dest = (parent / "dest").resolve()
        if dest.is_symlink() or not dest.is_dir():
            dest = parent / "old"
        files = [p for p in dest.rglob("*") if p.is_file() and not p.is_symlink()]
        restored = int(proc.stderr.rsplit(" entries restored", 1)[0].rsplit(" ", 1)[-1])
        assert len(files) <= restored <= total
        if proc.returncode == 0:
            assert restored == total
    assert reported > 0, "no round reported a swapped directory"


# The attacker owns the tree backup.  It watches the restore open its files
# (inotify) and at once swaps the file just opened for a symlink to a file
# only root reads, or for a FIFO, putting it back a moment later: the
# restore opens each file twice (attributes, then contents), so the second
# open meets the swap whenever the attacker is quick enough.
SOURCE_ATTACK = r"""
import ctypes, os, struct, sys, time
stop, out, src, secret_file = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
ifd = libc.inotify_init1(os.O_NONBLOCK)
wds = {}
for d in os.listdir(src):
    wd = libc.inotify_add_watch(ifd, os.fsencode(f"{src}/{d}"), 0x20)  # IN_OPEN
    wds[wd] = f"{src}/{d}"
swaps = 0
pending = []
try:
    while not os.path.exists(stop):
        try:
            buf = os.read(ifd, 65536)
        except BlockingIOError:
            buf = b""
            time.sleep(0.0005)
        now = time.monotonic()
        while pending and (now - pending[0][0] > 0.003 or not buf):
            _, f = pending.pop(0)
            try:
                os.unlink(f)
                os.rename(f + ".real", f)
            except OSError:
                pass
        pos = 0
        while pos + 16 <= len(buf):
            wd, mask, cookie, n = struct.unpack_from("iIII", buf, pos)
            name = buf[pos + 16 : pos + 16 + n].rstrip(b"\0").decode()
            pos += 16 + n
            f = f"{wds[wd]}/{name}"
            if not name.startswith("f") or name.endswith(".real"):
                continue
            try:
                os.rename(f, f + ".real")
                if swaps % 2:
                    os.symlink(secret_file, f)
                else:
                    os.mkfifo(f)
                swaps += 1
                pending.append((now, f))
            except OSError:
                pass
finally:
    with open(out, "w") as f:
        f.write(str(swaps))
"""


def test_source_swapped_for_symlinks_and_fifos(attacker, arena: Path) -> None:
    uid, gid = attacker
    secret_file = arena / "shadow"
    secret_file.write_bytes(b"SECRET\n")
    secret_file.chmod(0o600)
    src = arena / "src"
    plain_tree(src, 20, 100)
    for p in [src, *src.rglob("*")]:
        os.chown(p, uid, gid)
    key = key_file(arena)
    private = arena / "private"
    private.mkdir(mode=0o700)
    mismatches = 0
    # At least ROUNDS restores, more (up to a bound) until a swap was caught.
    for rnd in range(3 * ROUNDS):
        if rnd >= ROUNDS and mismatches:
            break
        dest = private / f"dest{rnd}"
        att = Attacker(attacker, SOURCE_ATTACK, src, secret_file)
        try:
            time.sleep(0.2)
            proc = subprocess.run(
                [*PY, "--key", key, src, dest], capture_output=True, text=True, timeout=120
            )
        finally:
            swaps = att.finish()
        assert swaps > 0, "the attacker never swapped anything: the test proves nothing"
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        for p in dest.rglob("*"):
            if p.is_file() and not p.is_symlink() and stat.S_ISREG(p.lstat().st_mode):
                assert p.read_bytes() == b"public\n", (p, proc.stderr[-2000:])
        mismatches += sum(
            1
            for x in proc.stderr.splitlines()
            if "changed since it was listed" in x or "symbolic links" in x
        )
    assert mismatches > 0, "no swap was caught between listing and reading"


def _cap_setuid() -> bytes:
    """security.capability granting cap_setuid (VFS_CAP_REVISION_2, effective)."""
    return struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)


def _privileged_tree(root: Path) -> None:
    root.mkdir()
    (root / "tool").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "tool", 1234, 1234)
    (root / "tool").chmod(0o4755)
    os.setxattr(root / "tool", "security.capability", _cap_setuid())
    os.setxattr(root / "tool", "trusted.t", b"1")
    os.setxattr(root / "tool", "user.u", b"2")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)


def _decrypt(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *map(os.fspath, args)], capture_output=True, text=True, timeout=60)


def test_privilege_is_a_choice(attacker, arena: Path) -> None:
    uid, gid = attacker
    src = arena / "src"
    _privileged_tree(src)
    key = key_file(arena)

    def state(dest: Path) -> dict[str, object]:
        t = dest / "tool"
        st = t.lstat()
        return {
            "owner": (st.st_uid, st.st_gid),
            "suid": bool(st.st_mode & stat.S_ISUID),
            "sticky": bool((dest / "tmp").lstat().st_mode & stat.S_ISVTX),
            "cap": "security.capability" in os.listxattr(t),
            "trusted": "trusted.t" in os.listxattr(t),
            "user": os.getxattr(t, "user.u"),
            "dev": (dest / "null").exists(),
        }

    full = {
        "owner": (1234, 1234),
        "suid": True,
        "sticky": True,
        "cap": True,
        "trusted": True,
        "user": b"2",
        "dev": True,
    }
    none = {**full, "owner": (0, 0), "suid": False, "sticky": False}
    none |= {"cap": False, "trusted": False, "dev": False}

    # Root into a root-owned DEST: everything, as GNU tar does as root.
    proc = _decrypt("--key", key, src, arena / "rootdest")
    assert proc.returncode == 0, proc.stderr
    assert state(arena / "rootdest") == full
    assert "left out" not in proc.stderr

    # Root into a DEST in a directory a user owns: nothing privileged,
    # each left-out thing counted.
    home = arena / "home"
    home.mkdir()
    os.chown(home, uid, gid)
    proc = _decrypt("--key", key, src, home / "restore")
    assert proc.returncode == 0, proc.stderr
    assert state(home / "restore") == none
    (line,) = [x for x in proc.stderr.splitlines() if "left out" in x]
    assert f"DEST is owned by uid {uid}" in line
    for what in ("1 device nodes", "1 owners", "2 set-id/sticky modes", "2 xattrs"):
        assert what in line, line

    # ... unless asked for, one attribute at a time.
    proc = _decrypt(
        "--key", key, "--same-owner", "--xattrs-include=security.*", "--xattrs-include=user.*",
        src, home / "asked",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert state(home / "asked") == {**none, "owner": (1234, 1234), "cap": True}

    # And root-owned DEST with everything turned off.
    proc = _decrypt(
        "--key", key, "--no-same-owner", "--no-setid", "--no-devices",
        "--no-privileged-xattrs", src, arena / "off",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert state(arena / "off") == none
    proc = _decrypt("--key", key, "--xattrs-exclude=trusted.*", src, arena / "ex")
    assert state(arena / "ex") == {**full, "trusted": False}


def test_dest_inside_source_is_refused(tmp_path: Path) -> None:
    arena = tmp_path
    src = arena / "src"
    plain_tree(src, 2, 2)
    key = key_file(arena)
    before = snapshot(src)
    for dest in (src / "restore", src / "d000" / "x", src, arena / "." / "src" / "r"):
        proc = _decrypt("--key", key, src, dest)
        assert proc.returncode == 2, proc.stderr
        assert "inside SOURCE" in proc.stderr
    os.symlink(src / "d001", arena / "alias")
    proc = _decrypt("--key", key, src, arena / "alias" / "r")
    assert proc.returncode == 2, proc.stderr
    assert snapshot(src) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    arena = tmp_path
    src = arena / "src"
    total = plain_tree(src, 60, 100)
    for d in src.iterdir():
        d.chmod(0o751)
    key = key_file(arena)
    dest = arena / "dest"
    proc = subprocess.Popen([*PY, "--key", key, src, dest], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (dest / "d002").exists():
                break
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err
    summary = err.strip().splitlines()[-1]
    assert "the rest not read (interrupted)" in summary, summary
    restored = int(summary.split(" entries restored")[0].rsplit(" ", 1)[-1])
    assert 0 < restored < total
    # What was restored got its directory metadata; no partial file is left.
    dirs = [p for p in dest.iterdir()]
    assert dirs and all(stat.S_IMODE(p.stat().st_mode) == 0o751 for p in dirs)
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert all(p.read_bytes() == b"public\n" for p in files)
    assert len(files) + len(dirs) + 1 == restored
