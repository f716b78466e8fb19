"""The one-pass tar reader on crafted bytes and on what GNU tar and bsdtar write.

Crafted archives are built block by block here (a ustar writer of a few
lines); real ones by GNU tar and bsdtar, whose own listing is the oracle.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import pytest

from ciphertextfs.restore.backup import ArchiveDamage, Kind, TarBackup, TreeProblem
from ciphertextfs.restore.tarstream import (
    BLOCK,
    MAX_NAME,
    Damage,
    HeaderError,
    Member,
    Rejected,
    TarReader,
    decompressed,
    parse_number,
    parse_pax,
)
from tests.tarcraft import EOF, b256, header, member, octal, padded, pax, pax_record


def read(data: bytes) -> list[Member | Rejected | Damage]:
    reader = TarReader(io.BytesIO(data))
    out = []
    for r in reader:
        out.append(r)
        if isinstance(r, Member) and r.size:
            with reader.open(r) as f:
                r.xattrs[b"(data)"] = f.read()
    return out


def names(records) -> list[bytes]:
    return [r.path for r in records if isinstance(r, Member)]


# -- numbers and records ----------------------------------------------------


def test_numbers_octal_and_base256() -> None:
    assert parse_number(b"0000644\0", "mode") == 0o644
    assert parse_number(b"  644 \0\0", "mode") == 0o644
    assert parse_number(b"\0" * 8, "uid") == 0
    assert parse_number(b256(2**40, 12), "size") == 2**40
    assert parse_number(b256(-5, 8), "uid") == -5
    for bad in (b"\x81" + bytes(7), b"12a4\0\0\0\0", b"\0 1\0\0"):
        with pytest.raises(HeaderError):
            parse_number(bad, "x")


def test_pax_records_raw_binary_and_bad_ones() -> None:
    value = b"\0\n=\xff binary"
    data = pax_record(b"SCHILY.xattr.user.b", value) + pax_record(b"path", b"a/b")
    assert parse_pax(data) == {b"SCHILY.xattr.user.b": value, b"path": b"a/b"}
    good = pax_record(b"path", b"x")
    for bad in (
        b"99 path=x\n",  # length past the end
        b"9 path=xy",  # not newline-terminated
        b"x path=x\n",  # no length
        b"7 pathx\n",  # no '='
        b"3 p\n",  # shorter than possible
    ):
        with pytest.raises(HeaderError):
            parse_pax(good + bad)


# -- members ----------------------------------------------------------------


def test_ustar_prefix_gnu_long_names_and_pax_override() -> None:
    long = b"d/" + b"n" * 300
    data = (
        member(b"name", b"abc", raw={345: b"pre/fix"})
        + header(b"././@LongLink", typeflag=b"L", size=len(long) + 1, magic=b"ustar  \0")
        + padded(long + b"\0")
        + member(b"short", b"xyz", magic=b"ustar  \0", raw={345: b"not-a-prefix"})
        + pax({b"path": b"from/pax", b"mtime": b"-12.5", b"uid": b"4000000000"})
        + member(b"ignored")
        + EOF
    )
    recs = read(data)
    assert names(recs) == [b"pre/fix/name", long, b"from/pax"]
    assert recs[0].xattrs[b"(data)"] == b"abc"
    assert recs[1].xattrs[b"(data)"] == b"xyz"
    assert (recs[2].mtime_ns, recs[2].uid) == (-12_500_000_000, 4_000_000_000)
    assert recs[2].offset == 6 * BLOCK  # where its pax header starts


def test_global_pax_headers_apply_to_later_members() -> None:
    data = (
        member(b"a")
        + pax({b"SCHILY.xattr.user.g": b"1"}, typeflag=b"g")
        + member(b"b")
        + pax({b"SCHILY.xattr.user.g": b"2"})
        + member(b"c")
        + EOF
    )
    recs = read(data)
    assert [r.xattrs for r in recs] == [{}, {b"user.g": b"1"}, {b"user.g": b"2"}]


def _bad(**kw) -> bytes:
    """A member with 3 bytes of data whose header carries a crafted field."""
    return header(b"f", size=3, **kw) + padded(b"bad")


def _pax_bad(records: dict[bytes, bytes]) -> bytes:
    return pax(records) + _bad()


CRAFTED = [
    ("mtime", _pax_bad({b"mtime": b"100000000000000000000"}), "mtime"),
    ("-mtime", _pax_bad({b"mtime": b"-100000000000000000000"}), "mtime"),
    ("uid b256", _bad(raw={108: b256(-5, 8)}), "uid -5"),
    ("uid pax", _pax_bad({b"uid": b"-5"}), "uid"),
    ("gid pax", _pax_bad({b"gid": b"99999999999"}), "gid"),
    ("devmajor", _bad(typeflag=b"3", raw={329: b256(2**31, 8)}), "devmajor"),
    ("devminor pax", _pax_bad({b"SCHILY.devminor": b"2000000"}), "devminor"),
    ("mtime b256", _bad(raw={136: b256(10**20, 12)}), "mtime"),
    ("nul name", _pax_bad({b"path": b"a\0b"}), "NUL"),
    ("nul link", _pax_bad({b"linkpath": b"a\0b"}), "NUL"),
    ("bad b256", _bad(raw={136: b"\x81" + bytes(11)}), "base-256"),
    ("bad octal", _bad(raw={108: b"12x4567\0"}), "octal"),
    ("bad pax", header(b"P", typeflag=b"x", size=10) + padded(b"99 path=x\n") + _bad(), "pax"),
    ("pax size", _pax_bad({b"size": b"12abc"}), "size"),
    ("bad b64", _pax_bad({b"LIBARCHIVE.xattr.user.x": b"!!!"}), "base64"),
    ("bad %", _pax_bad({b"LIBARCHIVE.xattr.user%zz": b"AA=="}), "escape"),
    ("empty xattr", _pax_bad({b"SCHILY.xattr.": b"v"}), "xattr name"),
    ("empty name", header(b"", size=3) + padded(b"bad"), "empty name"),
    (
        "long name",
        header(b"L", typeflag=b"L", size=MAX_NAME + 10) + padded(b"x" * (MAX_NAME + 10)) + _bad(),
        "GNU long name of",  # refused before it is read into memory
    ),
]


@pytest.mark.parametrize("what,crafted,reason", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_fields_reject_that_member_only(what: str, crafted: bytes, reason: str) -> None:
    data = member(b"before", b"one") + crafted + member(b"after", b"two") + EOF
    recs = read(data)
    assert [type(r).__name__ for r in recs] == ["Member", "Rejected", "Member"], recs
    assert reason in recs[1].reason, recs[1].reason
    assert recs[1].offset == 2 * BLOCK
    assert recs[2].path == b"after" and recs[2].xattrs[b"(data)"] == b"two"


def test_bad_header_resyncs_to_the_next_one() -> None:
    a = member(b"a", b"A" * 1000)
    b = member(b"b", b"B" * 700)
    c = member(b"c", b"C")
    # (A flip of the checksum's leading '0' to a space changes nothing: GNU
    # tar and this reader both skip leading spaces in numbers.)
    for flip_at in (0, 100, 149, 156, 300, 511):
        damaged = bytearray(a + b + c + EOF)
        damaged[len(a) + flip_at] ^= 0x10
        recs = read(bytes(damaged))
        assert names(recs) == [b"a", b"c"], flip_at
        dmg = recs[1]
        assert isinstance(dmg, Damage)
        # Exactly b's header and data are lost: not one block more or less.
        assert (dmg.start, dmg.end) == (len(a), len(a) + len(b)), flip_at
        assert recs[2].xattrs[b"(data)"] == b"C"


def test_damaged_pax_header_loses_its_member_from_the_pax_header_on() -> None:
    a = member(b"a", b"A")
    b = pax({b"SCHILY.xattr.user.x": b"v"}) + member(b"b", b"B")
    damaged = bytearray(a + b + member(b"c") + EOF)
    damaged[len(a) + 2 * BLOCK + 3] ^= 1  # b's own header, after a sound pax header
    recs = read(bytes(damaged))
    assert names(recs) == [b"a", b"c"]
    assert (recs[1].start, recs[1].end) == (len(a), len(a) + len(b))


def test_damaged_gnu_long_name_header_refuses_the_truncated_name() -> None:
    long = b"x/" + b"n" * 150
    a = member(b"a")
    b = (
        header(b"././@LongLink", typeflag=b"L", size=len(long) + 1, magic=b"ustar  \0")
        + padded(long + b"\0")
        + member(long[:100], b"B", magic=b"ustar  \0")
    )
    damaged = bytearray(a + b + member(b"c") + EOF)
    damaged[len(a) + 20] ^= 1  # the 'L' header: its name block is skipped as junk
    recs = read(bytes(damaged))
    assert names(recs) == [b"a", b"c"]
    assert isinstance(recs[1], Damage) and (recs[1].start, recs[1].end) == (BLOCK, 3 * BLOCK)
    # Under its first 100 bytes the member would be restored in the wrong place.
    assert isinstance(recs[2], Rejected) and recs[2].path == long[:100]
    assert "extended header" in recs[2].reason
    # A plain 100-byte name after ordinary damage is no reason to refuse.
    other = bytearray(a + member(b"junk", b"J" * 600) + member(long[:100], b"B") + EOF)
    other[len(a) + 7] ^= 1
    assert names(read(bytes(other))) == [b"a", long[:100]]


def test_negative_or_garbage_size_is_a_bad_header() -> None:
    for field in (b256(-1, 12), b"999999999999", b"\x81" + bytes(11)):
        data = member(b"a") + header(b"b", raw={124: field}) + member(b"c") + EOF
        recs = read(data)
        assert names(recs) == [b"a", b"c"]
        assert isinstance(recs[1], Damage) and "size" in recs[1].reason


def test_lone_zero_block_is_reported_and_read_past() -> None:
    recs = read(member(b"a") + bytes(BLOCK) + member(b"b") + EOF)
    assert names(recs) == [b"a", b"b"]
    assert isinstance(recs[1], Damage) and (recs[1].start, recs[1].end) == (BLOCK, 2 * BLOCK)


@pytest.mark.parametrize("cut", [0, 100, BLOCK, BLOCK + 5, 3 * BLOCK, 3 * BLOCK + 512, 5 * BLOCK])
def test_truncated_archive(cut: int) -> None:
    data = (member(b"a", b"A" * 600) + member(b"b", b"B" * 1000) + EOF)[:cut]
    reader = TarReader(io.BytesIO(data))
    recs = []
    errors = []
    for r in reader:
        recs.append(r)
        if isinstance(r, Member):
            try:
                with reader.open(r) as f:
                    f.read()
            except OSError as e:
                errors.append((r.path, str(e)))
    assert isinstance(recs[-1], Damage), recs
    assert all(not isinstance(r, Rejected) for r in recs)
    if 2 * BLOCK < cut < 3 * BLOCK or 4 * BLOCK < cut < 5 * BLOCK:
        assert errors and "archive ends" in errors[0][1]


def test_huge_size_swallows_to_the_end_and_says_so() -> None:
    data = member(b"a") + pax({b"size": str(2**50).encode()}) + member(b"b", b"x") + EOF
    recs = read_tolerant(data)
    assert names(recs) == [b"a", b"b"]
    assert isinstance(recs[-1], Damage) and recs[-1].path == b"b" and recs[-1].end is None


def read_tolerant(data: bytes) -> list:
    reader = TarReader(io.BytesIO(data))
    out = []
    for r in reader:
        out.append(r)
        if isinstance(r, Member):
            try:
                with reader.open(r) as f:
                    f.read()
            except OSError:
                pass
    return out


def test_sparse_map_with_empty_pieces() -> None:
    """Old GNU sparse: pieces (0, 0), (4, 3), (8, 0), (9, 2) of an 11-byte file."""
    area = b"".join(octal(o, 12) + octal(n, 12) for o, n in ((0, 0), (4, 3), (8, 0)))
    head = header(
        b"s", typeflag=b"S", size=5, magic=b"ustar  \0", raw={386: area, 483: octal(11, 12)}
    )
    # Three pieces fit in the header; the fourth is in an extension block.
    head = header(
        b"s",
        typeflag=b"S",
        size=5,
        magic=b"ustar  \0",
        raw={386: area, 482: b"\1", 483: octal(11, 12)},
    )
    ext = padded(octal(9, 12) + octal(2, 12))
    recs = read(head + ext + padded(b"abcde") + member(b"after", b"x") + EOF)
    assert names(recs) == [b"s", b"after"]
    assert recs[0].real_size == 11
    assert recs[0].xattrs[b"(data)"] == b"\0\0\0\0abc\0\0de"
    assert recs[1].xattrs[b"(data)"] == b"x"


def test_data_is_readable_only_while_current() -> None:
    reader = TarReader(io.BytesIO(member(b"a", b"A") + member(b"b", b"B") + EOF))
    it = iter(reader)
    a = next(it)
    f = reader.open(a)
    next(it)
    with pytest.raises(OSError):
        f.read()
    with pytest.raises(OSError):
        reader.open(a)


# -- real writers -----------------------------------------------------------

XATTR = b"\0\n=\xff\xfe%3D binary"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    deep = src / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_bytes(b"deep")
    (src / "x").write_bytes(os.urandom(3000))
    os.setxattr(src / "x", "user.bin", XATTR)
    os.setxattr(src / "x", "user.a=b%c", b"v")
    os.link(src / "x", src / "hl")
    os.symlink("t" * 150, src / "sym")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", 0o20666, os.makedev(1, 3))
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"end")
    return src


def _listing(archive: Path) -> list[str]:
    out = subprocess.run(["tar", "-tf", archive], capture_output=True, check=True).stdout
    return [line.rstrip("/") for line in out.decode().splitlines()]


def _backup_entries(backup: TarBackup) -> dict:
    out = {}
    for e in backup.entries():
        assert not isinstance(e, TreeProblem), e.reason
        data = None
        if e.open is not None:
            with e.open() as f:
                data = f.read()
        out[b"/".join(e.path)] = (e, data)
    return out


@pytest.mark.parametrize(
    "flags",
    [
        ("--format=posix",),
        ("--format=gnu",),
        ("--format=posix", "-S", "--sparse-version=1.0"),
        ("--format=posix", "-S", "--sparse-version=0.1"),
        ("--format=posix", "-S", "--sparse-version=0.0"),
        ("--format=gnu", "-S"),
        ("--format=posix", "-z"),
        ("--format=posix", "-j"),
        ("--format=posix", "-J"),
        ("--format=posix", "--zstd"),
    ],
)
def test_gnu_tar_archives_read_like_the_tree(tree: Path, tmp_path: Path, flags) -> None:
    archive = tmp_path / "a.bin"  # the name says nothing: compression is found by magic
    posix = "--format=posix" in flags
    xa = ("--xattrs", "--xattrs-include=*") if posix else ()
    subprocess.run(["tar", *xa, *flags, "-cf", archive, "-C", tree, "."], check=True)
    if "-S" in flags:  # stored sparse: the 3 MiB of holes are not in the archive
        assert archive.stat().st_size < 1 << 20
    with TarBackup(archive) as b:
        got = _backup_entries(b)
    want = {os.fsencode(p.lstrip("./")) for p in _listing(archive)} | {b""}
    want.discard(b".")
    assert set(got) == want
    for rel, (e, data) in got.items():
        path = tree / os.fsdecode(rel)
        st = os.lstat(path)
        assert e.mode == st.st_mode & 0o7777 and e.mtime_ns // 10**9 == int(st.st_mtime), rel
        if e.kind is Kind.REG and data is not None:
            assert data == path.read_bytes(), rel
            assert e.size == st.st_size
    if not posix:
        return
    x = got[b"x"][0] if got[b"x"][1] is not None else got[b"hl"][0]
    assert x.xattrs[b"user.bin"] == XATTR and x.xattrs[b"user.a=b%c"] == b"v"
    assert got[b"sym"][0].target == b"t" * 150
    assert got[b"null"][0].kind is Kind.CHR and got[b"null"][0].rdev == (1, 3)
    assert got[b"fifo"][0].kind is Kind.FIFO
    assert got[b"hl"][0].link_key == got[b"x"][0].link_key


def test_bsdtar_base64_xattrs(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    subprocess.run(["bsdtar", "--xattrs", "-cf", archive, "-C", tree, "x"], check=True)
    raw = archive.read_bytes()
    assert b"LIBARCHIVE.xattr.user.bin=" in raw
    with TarBackup(archive) as b:
        got = _backup_entries(b)
    assert got[b"x"][0].xattrs[b"user.bin"] == XATTR
    # Only the base64 record: drop bsdtar's SCHILY copies by reading our own pax.
    data = pax({b"LIBARCHIVE.xattr.user.a%3Db%25c": b"dg"}) + member(b"y") + EOF
    assert read(data)[0].xattrs == {b"user.a=b%c": b"v"}


def test_stream_from_a_pipe_with_zstd(tree: Path, tmp_path: Path) -> None:
    tar = subprocess.Popen(
        ["tar", "--xattrs", "--xattrs-include=*", "--zstd", "-cf", "-", "-C", tree, "."],
        stdout=subprocess.PIPE,
    )
    assert tar.stdout is not None
    b = TarBackup(None, stream=tar.stdout)
    assert not tar.stdout.seekable()
    got = _backup_entries(b)
    assert tar.wait() == 0
    assert got[b"sparse"][1] == (tree / "sparse").read_bytes()
    assert b.compression == "zstd"


def test_damaged_compressed_stream_is_reported(tmp_path: Path) -> None:
    plain = member(b"a", os.urandom(200_000)) + member(b"b", b"B") + EOF
    z = subprocess.run(["zstd", "-c"], input=plain, capture_output=True, check=True).stdout
    bad = z[: len(z) // 2] + bytes(64) + z[len(z) // 2 + 64 :]
    recs = read_tolerant(bad)
    # zstd may fail outright or give bytes that no longer fit the blocks.
    assert isinstance(recs[-1], Damage) and recs[-1].end is None, recs
    assert b"b" not in names(recs)


def test_not_a_tar_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(5000))
    from ciphertextfs.restore.backup import BackupError

    with pytest.raises(BackupError, match="not a tar archive"), TarBackup(junk) as b:
        list(b.entries())


def test_side_file_after_its_entries(tmp_path: Path) -> None:
    """Format 1: a side file after the entries that need it, file and stream."""
    d = tmp_path / "s"
    (d / "dir" / "sub").mkdir(parents=True)
    for rel, text in (("dir/a", "1"), ("dir/sub/x", "2"), ("dir/sub/.fscrypt-longnames", "S2")):
        (d / rel).write_text(text)
    (d / "dir" / ".fscrypt-longnames").write_text("S1")
    order = ["./", "./dir/", "./dir/a", "./dir/sub/", "./dir/sub/x"]
    order += ["./dir/sub/.fscrypt-longnames", "./dir/.fscrypt-longnames"]
    archive = tmp_path / "f1.tar.gz"
    subprocess.run(["tar", "-czf", archive, "-C", d, "--no-recursion", *order], check=True)
    with TarBackup(archive) as b:
        seen = {}
        for e in b.entries():
            if e.path in ((b"dir", b"a"), (b"dir", b"sub", b"x")):
                seen[e.path] = (b.side_file(e.path[:-1]), b.side_file((b"dir",)))
    assert seen == {(b"dir", b"a"): (b"S1", b"S1"), (b"dir", b"sub", b"x"): (b"S2", b"S1")}
    # A stream cannot look ahead: None, then the late side file is reported.
    r, w = os.pipe()
    data = archive.read_bytes()
    threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True).start()
    with os.fdopen(r, "rb") as f:
        b = TarBackup(None, stream=f)
        problems = []
        for e in b.entries():
            if isinstance(e, TreeProblem):
                problems.append(e.path)
            elif e.path == (b"dir", b"a"):
                assert b.side_file((b"dir",)) is None
    assert problems == [(b"dir", b".fscrypt-longnames")]
    assert not isinstance(problems, ArchiveDamage)


def test_decompressed_detects_by_magic() -> None:
    for tool, name in (("gzip", "gzip"), ("bzip2", "bzip2"), ("xz", "xz"), ("zstd", "zstd")):
        z = subprocess.run([tool, "-c"], input=b"hello", capture_output=True, check=True).stdout
        stream, found = decompressed(io.BytesIO(z))
        assert (found, stream.read()) == (name, b"hello")
    stream, found = decompressed(io.BytesIO(b"plain"))
    assert (found, stream.read()) == (None, b"plain")


@pytest.mark.parametrize("flags", [("--format=posix", "-S"), ("--format=gnu", "-S")])
def test_random_corruption_never_raises(tree: Path, tmp_path: Path, flags) -> None:
    """Random bytes over headers, maps and data: records come out, never an exception."""
    import random

    archive = tmp_path / "a.tar"
    subprocess.run(["tar", *flags, "-cf", archive, "-C", tree, "."], check=True)
    clean = archive.read_bytes()
    rng = random.Random(7)
    for _ in range(150):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            data[at : at + rng.randint(1, 12)] = rng.randbytes(rng.randint(1, 12))
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        b = TarBackup(None, stream=io.BytesIO(bytes(data)))
        try:
            for e in b.entries():
                if not isinstance(e, TreeProblem) and e.open is not None:
                    try:
                        with e.open() as f:
                            while f.read(1 << 16):
                                pass
                    except OSError:
                        pass
        except Exception as err:  # only "not a tar archive" may end the reading
            from ciphertextfs.restore.backup import BackupError

            assert isinstance(err, BackupError), repr(err)
