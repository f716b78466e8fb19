"""Attributes cheap, xattrs lazy, inode table blocks shared: the same answers as before.

A listing's readdirplus needs names, inode numbers and attributes: the view
builds those from the inode alone (an encrypted file's size needs only its
policy), in inode number order for a new listing, and leaves xattrs until
they are asked for.  These tests hold the shortcuts to what the long way
gives: batched inode reads against single ones (on sound and damaged
images), attributes read ahead against attributes built one by one,
xattrs built after attributes against xattrs built first, a per-policy
parse against each file's own context.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import pytest

from ciphertextfs.ext4.errors import CorruptError
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import parse_inode
from ciphertextfs.view import model
from ciphertextfs.view.model import View
from ciphertextfs.view.names import is_side_ino
from ciphertextfs.viewformat import XATTR_FSCRYPT_CONTEXT, XATTR_FSCRYPT_INO
from tests import harness, trees

CORPUS = Path("/work/shared/corpus/e2fsprogs")


def _plain_image(tmp_path: Path, files: int = 60) -> Path:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    for i in range(files):
        f = src / "dir" / f"file-{i:03d}"
        f.write_bytes(bytes([i]) * (100 + 37 * i))
        if i % 3 == 0:
            os.setxattr(f, "user.note", f"n{i}".encode())
        if i % 7 == 0:
            harness.run("setfacl", "-m", f"u:{1000 + i}:r", f)
    os.symlink("file-000", src / "dir" / "link")
    image = tmp_path / "plain.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    harness.run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "metadata_csum", "-d", src, image)
    return image


def _single(fs: Filesystem, inos: list[int]) -> list:
    out = []
    for ino in inos:
        try:
            out.append(fs.inode(ino))
        except CorruptError:
            out.append(None)
    return out


def _corpus_images(tmp_path: Path, limit: int) -> list[Path]:
    out = []
    for gz in sorted(CORPUS.glob("*.img.gz"))[:limit]:
        image = tmp_path / gz.name[: -len(".gz")]
        with gzip.open(gz) as src, open(image, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.append(image)
    return out


def test_batched_inodes_equal_single_ones(tmp_path: Path) -> None:
    """fs.inodes: the same inodes, None exactly where fs.inode raises, the same warnings."""
    images = [_plain_image(tmp_path)] + _corpus_images(tmp_path, 120)
    assert len(images) > 20, "the e2fsprogs corpus is missing"
    compared = unreadable = 0
    for image in images:
        try:
            one = Filesystem.open(image)
            many = Filesystem.open(image)
        except Exception:  # noqa: BLE001 - not ext4 at all: nothing to compare
            continue
        with one, many:
            inos = list(range(1, min(one.sb.s_inodes_count, 600) + 1))
            # Out of order and repeated too: batches must not assume sorted input.
            inos += inos[::-7]
            expected = _single(one, inos)
            got = many.inodes(inos)
            assert got == expected, image.name
            assert many.warnings == one.warnings, image.name
            compared += len(inos)
            unreadable += expected.count(None)
    assert compared > 20000
    assert unreadable > 0, "no damaged inode in the corpus images compared"


def test_bad_checksum_costs_only_that_inode(tmp_path: Path) -> None:
    """One flipped byte in a table block: one warning, for that inode; its neighbours are sound."""
    image = _plain_image(tmp_path)
    with Filesystem.open(image) as fs:
        dir_ino = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}[b"dir"]
        files = sorted(e.inode for e in fs.read_dir(fs.inode(dir_ino)))
        victim = files[len(files) // 2]
        before = {i: fs.inode(i) for i in files}
        bs = fs.block_size
    imap = harness.run("debugfs", "-R", f"imap <{victim}>", image)
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", imap)
    assert m, imap
    with open(image, "r+b") as f:
        f.seek(int(m[1]) * bs + int(m[2], 16) + 0x8)  # i_atime: still parses
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    with Filesystem.open(image) as fs:
        view = View(fs)
        entries = view.entries(dir_ino)
        attrs = {e.ino: view.attr(e.ino) for e in entries}
        assert fs.warnings == [f"inode {victim}: checksum mismatch"]
        for ino in files:
            if ino != victim:
                assert fs.inode(ino) == before[ino]
                assert attrs[ino].st_mtime_ns == before[ino].i_mtime_ns
        assert attrs[victim].st_atime_ns != before[victim].i_atime_ns


def _attrs_and_xattrs(view: View, dir_ino: int, *, xattrs_first: bool) -> dict:
    out = {}
    for e in view.entries(dir_ino):
        if xattrs_first:
            xs = {n: view.xattr(e.ino, n) for n in view.xattr_names(e.ino)}
            out[e.name] = (view.attr(e.ino), xs)
        else:
            a = view.attr(e.ino)
            out[e.name] = (a, {n: view.xattr(e.ino, n) for n in view.xattr_names(e.ino)})
    return out


def _counting(fs: Filesystem) -> list[int]:
    """Count every full xattr read of `fs` from now on."""
    calls: list[int] = []
    real = fs.xattrs

    def xattrs(inode):
        calls.append(inode.ino)
        return real(inode)

    fs.xattrs = xattrs  # type: ignore[method-assign]
    return calls


def test_listing_reads_no_xattrs_and_lazy_equals_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _plain_image(tmp_path)
    with Filesystem.open(image) as fs:
        view = View(fs)
        calls = _counting(fs)
        dir_ino = view.lookup(view.root_ino, b"dir")
        view.attrs_ahead(dir_ino, view.entries(dir_ino))
        attrs = {e.name: view.attr(e.ino) for e in view.entries(dir_ino)}
        assert len(attrs) == 61
        assert calls == [], "a listing and its attributes read xattrs"
        lazy = _attrs_and_xattrs(view, dir_ino, xattrs_first=False)
        assert len(calls) == 61
        assert any(x for _a, x in lazy.values())
    monkeypatch.setattr(model, "ATTRS_AHEAD_MAX", 0)
    with Filesystem.open(image) as fs:
        view = View(fs)
        dir_ino = view.lookup(view.root_ino, b"dir")
        eager = _attrs_and_xattrs(view, dir_ino, xattrs_first=True)
    assert eager == lazy
    acl = b"system.posix_acl_access"
    assert sum(acl in x for _a, x in lazy.values()) == 9


def test_attrs_read_ahead_skip_what_cannot_be_read(tmp_path: Path) -> None:
    """An entry whose inode does not parse is left out of the batch and fails on its own."""
    image = _plain_image(tmp_path)
    with Filesystem.open(image) as fs:
        dir_ino = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}[b"dir"]
        files = sorted(e.inode for e in fs.read_dir(fs.inode(dir_ino)))
        bs = fs.block_size
    victim = files[3]
    imap = harness.run("debugfs", "-R", f"imap <{victim}>", image)
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", imap)
    assert m, imap
    with open(image, "r+b") as f:
        f.seek(int(m[1]) * bs + int(m[2], 16) + 0x80)  # i_extra_isize: odd, unparsable
        f.write(b"\x03\x00")
    with Filesystem.open(image) as fs:
        view = View(fs)
        entries = view.entries(dir_ino)
        assert len(entries) == 61
        view.attrs_ahead(dir_ino, entries)
        for e in entries:
            if e.ino == victim:
                with pytest.raises(CorruptError):
                    view.attr(e.ino)
            else:
                assert stat.S_IFMT(view.attr(e.ino).st_mode) in (stat.S_IFREG, stat.S_IFLNK)


def test_encrypted_sizes_and_contexts_per_file(tmp_path: Path) -> None:
    """Policies parsed once: each file still shows its own context and its own size."""
    harness.require_kernel()
    image = harness.mkfs(tmp_path / "enc.img", size_mb=32, features=("encrypt", "stable_inodes"))
    sizes = [0, 1, 15, 16, 17, 4095, 4096, 4097, 10000]
    with harness.mounted(image, tmp_path / "build.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            for name in ("v2", "v2-ino64", "v2-pad4", "v1"):
                d = mnt / name
                d.mkdir()
                trees.POLICY[name].apply(d, keys)
                for i, n in enumerate(sizes):
                    (d / f"f{i}").write_bytes(b"x" * n)
                os.symlink("t" * 40, d / "short-link")
                os.symlink("t" * 3000, d / "long-link")
            trees.lock(mnt, keys)
    with Filesystem.open(image) as fs:
        view = View(fs)
        contexts = set()
        checked = 0
        for top in view.entries(view.root_ino):
            if not stat.S_ISDIR(view.attr(top.ino).st_mode) or top.name == b"lost+found":
                continue
            for e in view.entries(top.ino):
                if is_side_ino(e.ino):
                    continue
                inode = fs.inode(e.ino)
                raw, context = trees.on_disk_context(fs, inode)
                a = view.attr(e.ino)
                if inode.is_reg:
                    assert a.st_size == context.ciphertext_size(inode.i_size, fs.block_size)
                    assert view.xattr(e.ino, XATTR_FSCRYPT_CONTEXT) == raw
                    bound = XATTR_FSCRYPT_INO in view.xattr_names(e.ino)
                    assert bound == (top.name == b"v2-ino64"), (top.name, e.name)
                    contexts.add(raw)
                    checked += 1
                elif inode.is_symlink:
                    assert a.st_size == len(view.readlink(e.ino))
    assert checked == 4 * len(sizes)
    assert len(contexts) == checked, "a file showed another file's context"


def _time_ns(seconds: int, extra: int | None) -> int:
    """ext4's time encoding: signed 32-bit seconds, two epoch bits and nanoseconds in extra."""
    sec = seconds - (1 << 32) if seconds & 0x80000000 else seconds
    if extra is None:
        return sec * 10**9
    return (sec + ((extra & 3) << 32)) * 10**9 + (extra >> 2)


@pytest.mark.parametrize("extra_isize", [0, 4, 12, 16, 20, 24, 28, 32])
def test_inode_fields_past_i_extra_isize(tmp_path: Path, extra_isize: int) -> None:
    """Each field after the 128-byte base counts only when i_extra_isize covers it.

    The parse reads them all in one unpack when i_extra_isize covers them
    all, field by field otherwise: nanoseconds and epochs from 0x84, the
    creation time from 0x90, i_projid from 0x9c.
    """
    image = _plain_image(tmp_path, files=1)
    with Filesystem.open(image) as fs:
        sb = fs.sb
        dir_ino = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}[b"dir"]
        ino = next(e.inode for e in fs.read_dir(fs.inode(dir_ino)) if e.name == b"file-000")
        raw = bytearray(fs.inode(ino).raw)
    extras = {0x84: 4 * 7 + 1, 0x88: 4 * 8 + 2, 0x8C: 4 * 9 + 3, 0x90: 1_000_000, 0x94: 4 * 5}
    for off, value in extras.items():
        struct.pack_into("<I", raw, off, value)
    struct.pack_into("<I", raw, 0x9C, 77)
    struct.pack_into("<H", raw, 0x80, extra_isize)
    got = parse_inode(sb, ino, bytes(raw))

    def field(off: int) -> int | None:
        return extras.get(off) if 0x80 + extra_isize >= off + 4 else None

    base = dict(
        zip(("atime", "ctime", "mtime"), struct.unpack_from("<III", raw, 0x08), strict=True)
    )
    assert got.i_extra_isize == extra_isize
    assert got.i_ctime_ns == _time_ns(base["ctime"], field(0x84))
    assert got.i_mtime_ns == _time_ns(base["mtime"], field(0x88))
    assert got.i_atime_ns == _time_ns(base["atime"], field(0x8C))
    crtime = field(0x90)
    assert got.i_crtime_ns == (None if crtime is None else _time_ns(crtime, field(0x94)))
    assert got.i_projid == (77 if 0x80 + extra_isize >= 0xA0 else 0)
