"""Round trips: kernel-encrypted ext4 -> view-format backup -> ciphertextfs decrypt.

The kernel encrypts; the restored tree must equal what the kernel shows
with the key present (tests/harness_restore.walk), entry for entry.
"""

from __future__ import annotations

import os
import pty
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ciphertextfs.fscrypt import kernel
from ciphertextfs.fscrypt.keysetup import MasterKey
from tests import trees
from tests.harness_restore import make_view_copy, walk

PY = [sys.executable, "-m", "ciphertextfs", "decrypt"]
LONG_DIR = "D" * 230
LONG_FILE = "é" * 100  # 200 bytes: ciphertext name longer than 149 bytes


def decrypt(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *map(os.fspath, args)], capture_output=True, text=True, check=False)


def populate(enc: Path) -> None:
    """Every kind of entry the restore handles, inside an unlocked encrypted directory."""
    (enc / "small.txt").write_bytes(b"hello\n")
    (enc / "empty").write_bytes(b"")
    (enc / "exact").write_bytes(os.urandom(8192))
    (enc / "big").write_bytes(os.urandom(3 * 4096 + 100))
    with open(enc / "sparse", "wb") as f:
        f.seek(3 * 4096 + 7)
        f.write(b"data after a hole" * 3)
        f.truncate(10 * 4096 + 5)
    (enc / LONG_FILE).write_bytes(b"long name\n")
    (enc / LONG_DIR).mkdir()
    (enc / LONG_DIR / "inner").write_bytes(b"inner\n")
    (enc / "sub" / "deeper").mkdir(parents=True)
    (enc / "sub" / "deeper" / "f").write_bytes(b"f" * 5000)
    os.symlink("small.txt", enc / "link")
    os.symlink("t" * 300, enc / "longlink")
    os.link(enc / "big", enc / "sub" / "hardlink")
    os.mkfifo(enc / "fifo", 0o640)
    os.mknod(enc / "null", 0o20666, os.makedev(1, 3))
    os.setxattr(enc / "small.txt", "user.color", b"\x00blue\xff")
    subprocess.run(["setfacl", "-m", "u:1234:r", enc / "exact"], check=True)
    os.chown(enc / "big", 1000, 1001)
    os.chmod(enc / "small.txt", 0o640)
    os.chmod(enc / "sub", 0o750)
    os.utime(enc / "exact", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    os.utime(enc / "sub", ns=(1_600_000_000_000_000_001, 1_400_000_000_000_000_002))


def compare(orig: Path, restored: Path) -> None:
    a, b = walk(orig), walk(restored)
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], rel


@pytest.fixture
def backup(ext4, tmp_path: Path):
    """A v2-encrypted tree, its plaintext walk, and a view-format copy of it."""
    raw = os.urandom(64)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(raw)
    with ext4(size_mb=64) as (image, _dev, mnt):
        ident = kernel.add_key(mnt, raw)
        enc = mnt / "enc"
        enc.mkdir()
        kernel.set_policy_v2(enc, ident)
        populate(enc)
        (mnt / "plain").mkdir()
        (mnt / "plain" / ".fscrypt-longnames").write_bytes(b"a user file\n")
        os.symlink("fscrypt:1:not:encrypted", mnt / "plain" / "lookalike")
        orig = tmp_path / "orig"
        subprocess.run(["cp", "-a", mnt, orig], check=True)
        trees.lock(mnt, {2: ident})
        copy = make_view_copy(image, mnt, tmp_path / "copy")
    return orig, copy, keyfile, ident


def test_tree_and_tar_round_trip(backup, tmp_path: Path) -> None:
    orig, copy, keyfile, _ = backup
    # cp -a keeps everything walk() compares; the oracle is the kernel's view.
    r = decrypt("--key", keyfile, copy, tmp_path / "dest")
    assert r.returncode == 0, r.stderr
    assert "0 not restored" in r.stderr
    compare(orig, tmp_path / "dest")
    assert not (tmp_path / "dest" / "enc" / ".fscrypt-longnames").exists()
    assert (tmp_path / "dest" / "plain" / ".fscrypt-longnames").read_bytes() == b"a user file\n"
    # Holes stay holes: the sparse file occupies far less than its size.
    st = os.stat(tmp_path / "dest" / "enc" / "sparse")
    assert st.st_blocks * 512 <= 2 * 4096

    tar = tmp_path / "copy.tar.gz"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-czf", tar, "-C", copy, "."], check=True
    )
    r = decrypt("--key", keyfile, tar, tmp_path / "dest2")
    assert r.returncode == 0, r.stderr
    compare(orig, tmp_path / "dest2")

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", extracted], check=True
    )
    r = decrypt("--key", keyfile, extracted, tmp_path / "dest3")
    assert r.returncode == 0, r.stderr
    compare(orig, tmp_path / "dest3")

    synced = tmp_path / "synced"
    subprocess.run(["rsync", "-aHAX", f"{copy}/", synced], check=True)
    r = decrypt("--verify", "--key", keyfile, synced)
    assert r.returncode == 0, r.stderr
    assert "restorable" in r.stderr


def test_missing_and_wrong_key(backup, tmp_path: Path) -> None:
    _, copy, _, ident = backup
    wrong = tmp_path / "wrong"
    wrong.write_bytes(os.urandom(64))
    r = decrypt("--key", wrong, copy, tmp_path / "dest")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "missing key" in ln]
    assert len(lines) == 1, r.stderr
    # Every entry below enc, and enc itself, but not the side file.
    n_enc = sum(1 for p in (copy / "enc").rglob("*") if p.name != ".fscrypt-longnames") + 1
    assert f"v2 key identifier {ident.hex()}: {n_enc} entries not restored" in lines[0]
    assert (tmp_path / "dest" / "plain" / "lookalike").is_symlink()
    assert not (tmp_path / "dest" / "enc").exists()
    wrong_id = MasterKey(wrong.read_bytes()).identifier.hex()
    assert f"key {wrong} (v2 identifier {wrong_id}, v1 descriptor" in r.stderr


def test_damage_is_reported_and_contained(backup, tmp_path: Path) -> None:
    orig, copy, keyfile, _ = backup
    big = _nokey_of(copy, b"12388")
    with open(big, "r+b") as f:
        f.truncate(4096)
    r = decrypt("--key", keyfile, copy, tmp_path / "dest")
    assert r.returncode == 1
    assert "truncated: 4096 bytes of ciphertext in the backup, size 12388 needs 12400" in r.stderr
    # The hard link to the same inode is reported too; everything else is there.
    restored = walk(tmp_path / "dest")
    expected = {k for k in walk(orig) if k not in ("enc/big", "enc/sub/hardlink")}
    assert set(restored) == expected
    assert r.stderr.count("not restored:") == 2


def _isreg(p: Path) -> bool:
    return stat.S_ISREG(os.lstat(p).st_mode)


def _nokey_of(copy: Path, size: bytes) -> Path:
    enc = copy / "enc"
    for n in os.listdir(enc):
        p = enc / n
        if _isreg(p) and n != ".fscrypt-longnames":
            if os.getxattr(p, "user.fscrypt.size") == size:
                return p
    raise AssertionError(f"no file of size {size!r}")


def test_tampering_is_reported_and_contained(backup, tmp_path: Path) -> None:
    orig, copy, keyfile, _ = backup
    enc = copy / "enc"
    # A damaged file context, a damaged directory context, a renamed entry,
    # and a long name whose side-file line was altered.
    os.setxattr(_nokey_of(copy, b"6"), "user.fscrypt.context", b"\x07" + bytes(39))
    sub = next(
        p
        for p in enc.iterdir()
        if stat.S_ISDIR(os.lstat(p).st_mode) and len(os.listdir(p)) == 2  # "sub"
    )
    os.setxattr(sub, "user.fscrypt.context", b"\x02" + bytes(20))
    os.rename(_nokey_of(copy, b"0"), enc / "renamed-by-someone")
    side = enc / ".fscrypt-longnames"
    lines = side.read_bytes().splitlines(keepends=True)
    long_file = next(ln for ln in lines if _is_file_line(enc, ln))
    nk, full = long_file.split(b" ")
    tampered = full[:10] + (b"A" if full[10:11] != b"A" else b"B") + full[11:]
    side.write_bytes(b"".join(ln if ln != long_file else nk + b" " + tampered for ln in lines))

    r = decrypt("--key", keyfile, copy, tmp_path / "dest")
    assert r.returncode == 1
    err = r.stderr
    assert "damaged fscrypt context: unknown fscrypt context version 7" in err
    assert "damaged fscrypt context: fscrypt v2 context of 21 bytes, expected 40" in err
    assert "(and 3 entries below it)" in err  # sub: deeper, deeper/f, hardlink
    assert "enc/renamed-by-someone: not a no-key name in an encrypted directory" in err
    assert "does not match the SHA-256 of its no-key name" in err
    assert "7 not restored" in err.splitlines()[-1], err
    restored = set(walk(tmp_path / "dest"))
    lost = {"enc/small.txt", "enc/empty", "enc/" + LONG_FILE}
    lost |= {k for k in walk(orig) if k.startswith("enc/sub")}
    assert restored == set(walk(orig)) - lost

    v = decrypt("--verify", "--key", keyfile, copy)
    assert v.returncode == 1
    assert sorted(_problem_lines(v.stderr)) == sorted(_problem_lines(err))


def _is_file_line(enc: Path, line: bytes) -> bool:
    return _isreg(enc / os.fsdecode(line.split(b" ")[0]))


def _problem_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "not restored:" in ln]


def test_inspect(backup, tmp_path: Path) -> None:
    import json

    _, copy, _, ident = backup
    enc = copy / "enc"
    long_name = next(n for n in os.listdir(enc) if len(n) > 200 and _isreg(enc / n) and n[0] != ".")
    link = next(n for n in os.listdir(enc) if (enc / n).is_symlink())
    paths = [enc, enc / long_name, enc / link, _nokey_of(copy, b"12388")]
    r = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "inspect", "--json", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [i["context"]["master_key_identifier"] for i in info] == [ident.hex()] * 4
    assert info[0]["type"] == "directory"
    assert info[1]["nokey_name"]["long"] and info[1]["nokey_name"]["side_file_matches"]
    assert info[2]["type"] == "symlink" and info[2]["symlink"]["ciphertext_length"] >= 16
    assert info[3]["size"] == 12388 and info[3]["ciphertext_size"] == 12400
    text = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "inspect", str(paths[3])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "contents AES-256-XTS" in text and "size: 12388 (ciphertext 12400 bytes)" in text


@pytest.mark.parametrize(
    "policy",
    ["v1", "v2-iv-ino-lblk-64", "v2-iv-ino-lblk-32", "v2-du1024"],
)
def test_policies_into_encrypted_dest(ext4, tmp_path: Path, policy: str) -> None:
    """Other policies round-trip, restored into an unlocked encrypted directory."""
    raw = os.urandom(64)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(raw)
    features = ["encrypt", "stable_inodes"] if "ino" in policy else ["encrypt"]
    args = []
    with ext4(size_mb=64, features=features) as (image, _dev, mnt):
        enc = mnt / "enc"
        enc.mkdir()
        if policy == "v1":
            desc = bytes.fromhex("0123456789abcdef")
            spec = kernel.add_key(mnt, raw, descriptor=desc)
            kernel.set_policy_v1(enc, desc)
            args = ["--v1-key", f"{desc.hex()}={keyfile}"]
        else:
            spec = kernel.add_key(mnt, raw)
            kw: dict = {}
            if policy == "v2-iv-ino-lblk-64":
                kw["flags"] = 0x03 | 0x08
            elif policy == "v2-iv-ino-lblk-32":
                kw["flags"] = 0x03 | 0x10
            elif policy == "v2-du1024":
                kw["log2_data_unit_size"] = 10
            else:
                kw.update(contents_mode=9, filenames_mode=9)
            kernel.set_policy_v2(enc, spec, **kw)
            args = ["--key", str(keyfile)]
        (enc / "a").write_bytes(os.urandom(70000))
        with open(enc / "holey", "wb") as f:
            f.seek(40960)
            f.write(b"x" * 3000)
        (enc / "d").mkdir()
        (enc / "d" / ("n" * 180)).write_bytes(b"long")
        os.symlink("a", enc / "d" / "s")
        orig = tmp_path / "orig"
        subprocess.run(["cp", "-a", enc, orig], check=True)
        trees.lock(mnt, {2: spec})
        copy = make_view_copy(image, mnt, tmp_path / "copy")
    with ext4(name="dest", size_mb=32) as (_i, _d, dmnt):
        ident = kernel.add_key(dmnt, raw)
        (dmnt / "locked").mkdir()
        kernel.set_policy_v2(dmnt / "locked", ident)
        r = decrypt(*args, copy, dmnt / "locked" / "restored")
        assert r.returncode == 0, r.stderr
        compare(orig, dmnt / "locked" / "restored" / "enc")
        assert kernel.get_policy(dmnt / "locked" / "restored" / "enc" / "a").key_spec == ident


def _run_on_terminal(argv: list[str]) -> tuple[int, bytes]:
    """Run argv with stderr on a pseudo-terminal; return (status, what it printed)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
        os.close(follower)
        out = bytearray()
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=60), bytes(out)
    finally:
        os.close(leader)


def test_progress_on_a_terminal_only(backup, tmp_path: Path) -> None:
    """A terminal gets a redrawn progress line; a pipe and --quiet get none."""
    _, copy, keyfile, _ = backup
    status, shown = _run_on_terminal([*PY, "--key", keyfile, copy, tmp_path / "tty"])
    assert status == 0, shown
    assert b"\r" in shown and b"MiB/s" in shown, shown
    piped = decrypt("--key", keyfile, copy, tmp_path / "pipe")
    assert piped.returncode == 0
    assert "\r" not in piped.stderr and "MiB/s" not in piped.stderr
    assert "entries restored" in piped.stderr
    status, shown = _run_on_terminal([*PY, "-q", "--key", keyfile, copy, tmp_path / "quiet"])
    assert status == 0 and shown == b"", shown


def _tar_side_files_last(tree: Path, archive: Path) -> None:
    """A pax archive of `tree` with xattrs, each side file after its directory's entries
    (as format-1 archives made by tar from a rsync copy may have them)."""
    import tarfile

    def info(p: Path, arc: str) -> tarfile.TarInfo:
        ti = tar.gettarinfo(os.fspath(p), arc)
        ti.pax_headers = {
            "SCHILY.xattr." + n: os.getxattr(p, n, follow_symlinks=False).decode(
                "utf-8", "surrogateescape"
            )
            for n in os.listxattr(p, follow_symlinks=False)
        }
        ns = os.lstat(p).st_mtime_ns
        ti.pax_headers["mtime"] = f"{ns // 10**9}.{ns % 10**9:09d}"
        return ti

    def add(p: Path, arc: str) -> None:
        ti = info(p, arc)
        if ti.isreg():
            with open(p, "rb") as f:
                tar.addfile(ti, f)
        else:
            tar.addfile(ti)
        if ti.isdir():
            kids = sorted(os.listdir(p), key=lambda n: (n == ".fscrypt-longnames", n))
            for n in kids:
                add(p / n, f"{arc}/{n}")

    with tarfile.open(
        archive, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        add(tree, ".")


def test_format_1_archive_with_side_files_last(backup, tmp_path: Path) -> None:
    """Format 1 put no order on side files: a seekable archive still restores."""
    orig, copy, keyfile, _ = backup
    assert b"fscrypt-side 2" not in (copy / "enc" / ".fscrypt-longnames").read_bytes()
    archive = tmp_path / "f1.tar"
    _tar_side_files_last(copy, archive)
    r = decrypt("--key", keyfile, archive, tmp_path / "dest")
    assert r.returncode == 0, r.stderr
    compare(orig, tmp_path / "dest")
