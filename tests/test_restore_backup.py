"""Reading backups: GNU tar archives with binary xattr values, tree and tar alike."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ciphertextfs.restore.backup import Kind, TarBackup, TreeBackup, TreeProblem

VALUES = {
    "user.fscrypt.context": bytes(range(256))[:40],
    "user.bin": b"\x00\n=\xff\xfe%3D",
    "user.x=y%z": b"\xc3\x28",  # invalid UTF-8
}


def _entries(backup) -> dict[tuple[bytes, ...], object]:
    out = {}
    for e in backup.entries():
        assert not isinstance(e, TreeProblem), e.reason
        out[e.path] = e
    return out


def test_tree_and_gnu_tar_agree_on_binary_xattrs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    f = src / "d" / "f"
    f.write_bytes(b"content")
    for name, value in VALUES.items():
        os.setxattr(f, name, value)
    os.link(f, src / "hl")
    os.symlink("fscrypt:1:abc", src / "s")
    tar = tmp_path / "b.tar.xz"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-cJf", tar, "-C", src, "."], check=True
    )
    tb = TarBackup(tar)
    data: dict[tuple[bytes, ...], bytes] = {}
    from_tar = {}
    for e in tb.entries():
        assert not isinstance(e, TreeProblem), e.reason
        from_tar[e.path] = e
        if e.open is not None:  # a stream: readable only while it is the current entry
            with e.open() as f:
                data[e.path] = f.read()
    tb.close()
    from_tree = _entries(TreeBackup(src))
    assert set(from_tar) == set(from_tree) == {(), (b"d",), (b"d", b"f"), (b"hl",), (b"s",)}
    for path, e in from_tree.items():
        t = from_tar[path]
        assert (t.kind, t.mode, t.mtime_ns, t.target) == (e.kind, e.mode, e.mtime_ns, e.target)
        if not (t.kind is Kind.REG and t.open is None):
            assert t.xattrs == e.xattrs  # tar keeps a hard link's xattrs with its first name
    first = next(p for p in ((b"d", b"f"), (b"hl",)) if from_tar[p].open is not None)
    assert {k.decode(): v for k, v in from_tar[first].xattrs.items()} == VALUES
    # Both names of the hard link share a link key; the tree reads both, the
    # archive stores the data once, with the first name.
    for entries in (from_tar, from_tree):
        a, b = entries[(b"d", b"f")], entries[(b"hl",)]
        assert a.link_key is not None and a.link_key == b.link_key
    assert data == {first: b"content"}
    assert from_tar[(b"s",)].kind is Kind.SYMLINK


def test_crafted_archive_cannot_write_outside_dest(tmp_path: Path) -> None:
    """Member names that climb out, absolute names, and writes through a symlink."""
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            data = b"" if kind != tarfile.REGTYPE else b"payload"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./ok")
        add("../climb")
        add(os.fspath(outside / "absolute"))
        add("./d", tarfile.DIRTYPE)
        add("./d/../../climb2")
        add("./link", tarfile.SYMTYPE, os.fspath(outside))
        add("./link/through")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    dest = tmp_path / "dest"
    proc = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "decrypt", "--key", key, archive, dest],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "evil.tar", "key", "outside"]
    assert (dest / "ok").read_bytes() == b"payload"
    assert os.readlink(dest / "link") == os.fspath(outside)
    reported = [line for line in proc.stderr.splitlines() if "not restored" in line]
    for name in ("../climb", "absolute", "d/../../climb2", "link/through"):
        assert any(name in line for line in reported), (name, proc.stderr)


def test_directory_metadata_applied_however_reading_stops(tmp_path: Path) -> None:
    """A read that ends in an exception still gives every restored directory its metadata."""
    from ciphertextfs.restore.backup import Backup, Entry
    from ciphertextfs.restore.keys import KeyRing
    from ciphertextfs.restore.report import Report
    from ciphertextfs.restore.restorer import Restorer
    from ciphertextfs.restore.writer import DestWriter

    T = 1234 * 10**9

    class Interrupted(Backup):
        description = "a backup whose reading is interrupted"

        def entries(self):
            yield Entry(path=(), kind=Kind.DIR, mode=0o755, uid=0, gid=0, mtime_ns=10**18)
            yield Entry(
                path=(b"d",), kind=Kind.DIR, mode=0o750, uid=0, gid=0, mtime_ns=1234 * 10**9
            )
            raise KeyboardInterrupt

        def side_file(self, dir_path):
            return None

    dest = tmp_path / "dest"
    restorer = Restorer(
        Interrupted(), DestWriter(dest, dry=False), KeyRing(), Report(io.StringIO())
    )
    with pytest.raises(KeyboardInterrupt):
        restorer.run(verify=False)
    st = os.stat(dest / "d")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o750, T)


def test_stdin_source_refuses_a_terminal_and_junk(tmp_path: Path) -> None:
    import pty

    key = tmp_path / "key"
    key.write_bytes(bytes(64))
    argv = [sys.executable, "-m", "ciphertextfs", "decrypt", "--verify", "--key", key, "-"]
    primary, secondary = pty.openpty()
    try:
        r = subprocess.run(argv, stdin=secondary, capture_output=True, text=True, timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    assert r.returncode == 2 and "terminal" in r.stderr, r.stderr
    for junk in (b"", os.urandom(3000)):
        r = subprocess.run(argv, input=junk, capture_output=True, timeout=60)
        assert r.returncode == 2 and b"not a tar archive" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr
