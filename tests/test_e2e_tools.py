"""Every backup tool over the view, onto every destination; and the tools that lose xattrs.

One kernel-made image holds, per policy (v1, v2, IV_INO_LBLK_64, IV_INO_LBLK_32),
the standard shapes and encrypted symlinks from 1 byte to the kernel's
maximum, plus encrypted entries renamed out into an unencrypted directory.
Each tool must exit 0 over the view and each copy must decrypt to the
plaintext the kernel showed with the keys present.  The tools that drop
xattrs must make the restore and --verify fail loudly, never pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import harness, trees
from tests.harness_restore import walk
from tests.harness_view import CLI, view_mount

BLOCK = 4096
POLICIES = ("v1", "v2", "v2-ino64", "v2-ino32")
LENGTHS = (1, 700, 1024, 2900, 3000)


def run(*argv: str | os.PathLike[str], cwd: Path | None = None, env=None, shell=False):
    args = argv[0] if shell else [os.fspath(a) for a in argv]
    return subprocess.run(
        args, capture_output=True, check=False, timeout=300, cwd=cwd, env=env, shell=shell
    )


def target_of(n: int) -> str:
    return ("abcdefghi/" * 410)[:n]


def symlink_max(d: Path) -> int:
    """The longest target the kernel accepts for a symlink in directory `d`."""
    for n in range(4095, 3000, -1):
        try:
            os.symlink(target_of(n), d / "probe")
        except OSError as e:
            assert e.errno == errno.ENAMETOOLONG, e
            continue
        os.unlink(d / "probe")
        return n
    raise AssertionError("no symlink over 3000 bytes accepted")


@dataclass
class Source:
    base: Path
    image: Path
    plain: dict
    max_len: dict[str, int]
    keys: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    harness.require_fuse()
    base = tmp_path_factory.mktemp("tools")
    image = harness.mkfs(
        base / "src.img", size_mb=64, block_size=BLOCK, features=("encrypt", "stable_inodes")
    )
    (base / "v2.key").write_bytes(trees.TEST_KEY_V2)
    (base / "v1.key").write_bytes(trees.TEST_KEY_V1)
    max_len = {}
    with harness.mounted(image, base / "src.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            plain = mnt / "plain"
            plain.mkdir()
            (plain / "readme").write_bytes(b"not encrypted\n")
            for name in POLICIES:
                d = mnt / f"enc-{name}"
                d.mkdir()
                trees.POLICY[name].apply(d, keys)
                trees.write_tree(d, BLOCK, small=True)
                (d / "symlinks").mkdir()
                max_len[name] = symlink_max(d / "symlinks")
                for n in (*LENGTHS, max_len[name]):
                    os.symlink(target_of(n), d / "symlinks" / f"len{n}")
                # Renamed out of their encrypted directory into a plain one.
                os.symlink(target_of(max_len[name]), d / "moved-long")
                os.rename(d / "moved-long", plain / f"moved-long-{name}")
                os.symlink("short", d / "moved-short")
                os.rename(d / "moved-short", plain / f"moved-short-{name}")
                (d / "moved-file").write_bytes(os.urandom(3 * BLOCK + 5))
                os.rename(d / "moved-file", plain / f"moved-file-{name}")
            trees.stamp_mtimes(mnt)
            os.sync()
            snapshot = walk(mnt)
            trees.lock(mnt, keys)
    return Source(
        base,
        image,
        snapshot,
        max_len,
        [
            "--key",
            os.fspath(base / "v2.key"),
            "--v1-key",
            f"{trees.TEST_KEY_V1_DESCRIPTOR.hex()}={base / 'v1.key'}",
        ],
    )


@contextlib.contextmanager
def destination(base: Path, kind: str):
    """A fresh filesystem of `kind` mounted under `base`, removed afterwards."""
    mnt = base / f"dst-{kind}"
    mnt.mkdir()
    if kind == "tmpfs":
        harness.run("mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", mnt)
        try:
            yield mnt
        finally:
            harness.unmount(mnt)
        return
    img = base / f"dst-{kind}.img"
    with open(img, "wb") as f:
        f.truncate((320 if kind == "xfs" else 160) << 20)
    if kind == "ext4-4k":
        harness.run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", img)
    elif kind == "ext4-1k":
        harness.run("mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", img)
    elif kind == "xfs":
        harness.run("mkfs.xfs", "-q", "-f", img)
    else:
        harness.run("mkfs.btrfs", "-q", "-f", img)
    fstype = {"xfs": "xfs", "btrfs": "btrfs"}.get(kind, "ext4")
    with harness.loop_device(img) as dev:
        harness.run("mount", "-t", fstype, dev, mnt)
        try:
            yield mnt
        finally:
            harness.unmount(mnt)


DESTS = ("ext4-4k", "ext4-1k", "xfs", "btrfs", "tmpfs")
XA = ("--xattrs", "--xattrs-include=*", "--acls")


@dataclass
class Copies:
    runs: dict[str, subprocess.CompletedProcess]
    good: dict[str, Path]
    lossy: dict[str, Path]
    view_targets: dict[str, bytes]


@pytest.fixture(scope="module")
def copies(source: Source):
    b = source.base
    runs: dict[str, subprocess.CompletedProcess] = {}
    good: dict[str, Path] = {}
    lossy: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        dests = {k: stack.enter_context(destination(b, k)) for k in DESTS}
        with view_mount(source.image, b / "view") as v:
            m = v.mountpoint
            targets = {}
            for dirpath, dirnames, filenames in os.walk(m):
                for n in dirnames + filenames:
                    p = Path(dirpath) / n
                    if p.is_symlink():
                        targets[os.fspath(p.relative_to(m))] = os.readlink(os.fsencode(p))
            good["tar"] = b / "view.tar"
            runs["tar -c"] = run("tar", *XA, "-cf", good["tar"], "-C", m, ".")
            good["tar -x onto ext4-1k"] = dests["ext4-1k"] / "tar-x"
            good["tar -x onto ext4-1k"].mkdir()
            runs["tar -x"] = run("tar", *XA, "-xpf", good["tar"], "-C", good["tar -x onto ext4-1k"])
            zst = b / "view.tar.zst"
            runs["tar --zstd | pipe"] = run(
                f"tar --xattrs --xattrs-include='*' --acls --zstd -cf - -C {m} . | cat > {zst}",
                shell=True,
            )
            good["tar --zstd"] = zst
            good["tar --zstd, extracted"] = b / "zstd-x"
            good["tar --zstd, extracted"].mkdir()
            runs["tar --zstd -x"] = run(
                "tar", *XA, "--zstd", "-xpf", zst, "-C", good["tar --zstd, extracted"]
            )
            good["bsdtar"] = b / "view.bsdtar"
            runs["bsdtar -c"] = run(
                "bsdtar",
                "--format",
                "pax",
                "--xattrs",
                "--acls",
                "-cf",
                good["bsdtar"],
                "-C",
                m,
                ".",
            )
            for k, d in dests.items():
                good[f"rsync -aHAX onto {k}"] = d / "rsync"
                runs[f"rsync onto {k}"] = run("rsync", "-aHAX", f"{m}/", d / "rsync")
            good["cp -a"] = dests["ext4-4k"] / "cp"
            runs["cp -a"] = run("cp", "-a", m, good["cp -a"])
            env = dict(os.environ, BORG_PASSPHRASE="", BORG_BASE_DIR=os.fspath(b / "borgbase"))
            env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
            repo = b / "borg"
            runs["borg init"] = run("borg", "init", "--encryption", "none", repo, env=env)
            runs["borg create"] = run("borg", "create", f"{repo}::a", ".", cwd=m, env=env)
            good["borg"] = b / "borg-x"
            good["borg"].mkdir()
            runs["borg extract"] = run("borg", "extract", f"{repo}::a", cwd=good["borg"], env=env)

            # The tools and options that drop user.* xattrs.
            lossy["rsync -a"] = b / "rsync-a"
            runs["rsync -a"] = run("rsync", "-aH", f"{m}/", lossy["rsync -a"])
            lossy["tar without --xattrs"] = b / "noxattrs.tar"
            runs["tar -c without --xattrs"] = run(
                "tar", "-cf", lossy["tar without --xattrs"], "-C", m, "."
            )
            lossy["tar -x without --xattrs"] = b / "tar-x-plain"
            lossy["tar -x without --xattrs"].mkdir()
            runs["tar -x without --xattrs"] = run(
                "tar", "-xpf", good["tar"], "-C", lossy["tar -x without --xattrs"]
            )
            cpio = b / "view.cpio"
            runs["cpio -o"] = run(
                f"cd {m} && find . -print0 | cpio -0 -o -H newc > {cpio}", shell=True
            )
            lossy["cpio"] = b / "cpio-x"
            lossy["cpio"].mkdir()
            runs["cpio -i"] = run(f"cpio -idm < {cpio}", cwd=lossy["cpio"], shell=True)
        yield Copies(runs, good, lossy, targets)


def decrypt(source: Source, backup: Path, dest: Path | None) -> subprocess.CompletedProcess:
    tail = [backup, dest] if dest is not None else ["--verify", backup]
    return run(*CLI, "decrypt", *source.keys, *tail)


def test_kernel_accepts_the_long_symlinks(source: Source) -> None:
    for name, n in source.max_len.items():
        assert n > 3000, name
        assert source.plain[f"enc-{name}/symlinks/len{n}"].content == target_of(n)


def test_every_tool_exits_0_over_the_view(copies: Copies) -> None:
    for what, proc in copies.runs.items():
        assert proc.returncode == 0, (what, proc.stderr.decode(errors="replace")[-2000:])


def test_no_view_symlink_target_over_1024_bytes(source: Source, copies: Copies) -> None:
    targets = copies.view_targets
    assert max(len(t) for t in targets.values()) <= 1024
    for name in POLICIES:
        # 1024, 2900, 3000 and the maximum (and 700 too where the inode number
        # and uuid ride along) are referred to the side file.
        refs = [t for p, t in targets.items() if p.startswith(f"enc-{name}/")]
        n_refs = sum(t.startswith(b"fscrypt:2:") for t in refs)
        assert n_refs == (5 if "ino" in name else 4), (name, n_refs)
        assert targets[f"plain/moved-long-{name}"].startswith(b"fscrypt:2:")
        assert targets[f"plain/moved-short-{name}"].startswith(b"fscrypt:1:")


@pytest.mark.parametrize(
    "copy",
    [
        "tar",
        "tar -x onto ext4-1k",
        "tar --zstd",
        "tar --zstd, extracted",
        "bsdtar",
        *(f"rsync -aHAX onto {k}" for k in DESTS),
        "cp -a",
        "borg",
    ],
)
def test_copy_decrypts_to_the_original(
    source: Source, copies: Copies, copy: str, tmp_path: Path
) -> None:
    proc = decrypt(source, copies.good[copy], tmp_path / "dest")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    got = walk(tmp_path / "dest")
    assert sorted(got) == sorted(source.plain)
    for rel, node in source.plain.items():
        if copy == "rsync -aHAX onto xfs":
            # rsync drops default ACLs onto XFS, from any source directory, and
            # copies XFS's own trusted.SGI_ACL_* copies of the ACLs.
            acl = ("system.posix_acl_default", "trusted.SGI_ACL_")
            node = _without(node, acl)
            got[rel] = _without(got[rel], acl)
        assert got[rel] == node, rel


def _without(node, prefix: str, seconds: bool = False):
    xattrs = tuple(x for x in node.xattrs if not x[0].startswith(prefix))
    mtime = (
        node.mtime_ns // 10**9 * 10**9 if seconds and node.kind != oct(0o040000) else node.mtime_ns
    )
    return dataclasses.replace(node, xattrs=xattrs, mtime_ns=mtime)


@pytest.mark.parametrize(
    "copy", ["rsync -a", "tar without --xattrs", "tar -x without --xattrs", "cpio"]
)
def test_lost_xattrs_are_reported(source: Source, copies: Copies, copy: str, tmp_path) -> None:
    for dest in (None, tmp_path / "dest"):
        proc = decrypt(source, copies.lossy[copy], dest)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 1, err[-3000:]
        assert "this backup has lost its xattrs" in err, err[-3000:]
        assert "rsync -a without -X, or tar without --xattrs" in err
        summary = err.strip().splitlines()[-1]
        not_restored = int(summary.rsplit(",", 1)[1].split()[0])
        # Every entry of the encrypted trees is counted (the side files excepted).
        n_enc = sum(1 for p in source.plain if p.startswith("enc-") and "/" in p)
        assert not_restored >= n_enc, summary


def test_one_file_without_context_is_reported(
    source: Source, copies: Copies, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    harness.run("cp", "-a", copies.good["rsync -aHAX onto tmpfs"], copy)
    victim = next(
        p
        for p in (copy / "enc-v2").rglob("*")
        # is_file() follows a symlink, whose view target may not resolve at all.
        if not p.is_symlink()
        and p.is_file()
        and p.name != ".fscrypt-longnames"
        and p.stat().st_size > 0
        and p.stat().st_nlink == 1
    )
    os.removexattr(victim, "user.fscrypt.context")
    proc = decrypt(source, copy, None)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    rel = os.fspath(victim.relative_to(copy))
    assert f"not restored: {rel}: no user.fscrypt.context inside an encrypted directory" in err
    assert err.strip().splitlines()[-1].endswith(", 1 not restorable"), err
    out = run(*CLI, "inspect", victim)
    assert out.returncode == 1
    assert b"context missing" in out.stdout


class _Counting:
    """A backup that counts how often the restore asks it for a side file."""

    def __init__(self, inner) -> None:
        self.inner, self.asked = inner, 0
        self.description = inner.description

    def entries(self):
        return self.inner.entries()

    def side_file(self, path):
        self.asked += 1
        return self.inner.side_file(path)


def _restore_in_process(source: Source, backup, tmp_path: Path) -> tuple[int, str]:
    import io

    from ciphertextfs.restore.keys import KeyRing
    from ciphertextfs.restore.report import Report
    from ciphertextfs.restore.restorer import Restorer
    from ciphertextfs.restore.writer import DestWriter

    keys = KeyRing.from_args([source.keys[1]], [source.keys[3]])
    out = io.StringIO()
    dest = tmp_path / "dest"
    rc = Restorer(backup, DestWriter(os.fspath(dest), dry=False), keys, Report(stream=out)).run(
        verify=False
    )
    return rc, out.getvalue()


def test_format_2_archive_is_read_in_one_pass(
    source: Source, copies: Copies, tmp_path: Path
) -> None:
    """The side files come first in every directory: nothing is asked of the archive."""
    from ciphertextfs.restore.backup import open_backup

    with open_backup(copies.good["tar"]) as inner:
        backup = _Counting(inner)
        rc, err = _restore_in_process(source, backup, tmp_path)
    assert rc == 0, err
    assert backup.asked == 0
    got = walk(tmp_path / "dest")
    assert got == source.plain


def test_block_size_reaches_every_subtree(source: Source, tmp_path: Path) -> None:
    """1 KiB blocks: the directories carry the block size, whichever subtree is copied."""
    image = harness.mkfs(tmp_path / "1k.img", size_mb=16, block_size=1024)
    data = {"moved": os.urandom(5000), "inner": os.urandom(3000)}
    with harness.mounted(image, tmp_path / "1k.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            enc, out = mnt / "enc", mnt / "plain" / "sub"
            enc.mkdir()
            out.mkdir(parents=True)
            trees.POLICY["v2"].apply(enc, keys)
            (enc / "sub").mkdir()
            (enc / "sub" / "inner").write_bytes(data["inner"])
            (enc / "moved").write_bytes(data["moved"])
            os.rename(enc / "moved", out / "moved")
            os.sync()
            trees.lock(mnt, keys)
        with view_mount(image, tmp_path / "v") as v:
            [sub] = os.listdir(v.mountpoint / "enc")
            for name, rel in (("plain-sub", "plain/sub"), ("enc-sub", f"enc/{sub}")):
                p = run("rsync", "-aHAX", f"{v.mountpoint / rel}/", tmp_path / name)
                assert p.returncode == 0, p.stderr
            alone = tmp_path / "alone"
            alone.mkdir()
            harness.run("cp", "--preserve=xattr", v.mountpoint / "plain/sub/moved", alone / "moved")
    for name, file in (("plain-sub", "moved"), ("enc-sub", "inner")):
        proc = decrypt(source, tmp_path / name, tmp_path / f"{name}.dest")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"{name}.dest" / file).read_bytes() == data[file], name
    proc = run(*CLI, "decrypt", *source.keys, "--block-size", "1024", alone, tmp_path / "a.dest")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.dest" / "moved").read_bytes() == data["moved"]


def test_inspect_reads_long_symlinks_from_the_side_file(copies: Copies) -> None:
    copy = copies.good["tar --zstd, extracted"]
    out = run(*CLI, "inspect", copy / "plain" / "moved-long-v2-ino32")
    assert out.returncode == 0, out.stderr
    assert b"kept in the directory's side file" in out.stdout
    assert b"IV_INO_LBLK_32" in out.stdout


def test_one_directory_without_context_is_reported(
    source: Source, copies: Copies, tmp_path: Path
) -> None:
    """An encrypted directory that lost its xattrs while its entries kept theirs."""
    copy = tmp_path / "copy"
    harness.run("cp", "-a", copies.good["rsync -aHAX onto tmpfs"], copy)
    # The top encrypted directory: its parent is not encrypted, so only the
    # evidence below it (no-key names with contexts, a side file) tells.
    for attr in os.listxattr(copy / "enc-v2"):
        if attr.startswith("user.fscrypt."):
            os.removexattr(copy / "enc-v2", attr)
    for dest in (None, tmp_path / "dest"):
        proc = decrypt(source, copy, dest)
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        lost = [ln for ln in err.splitlines() if "not restored: enc-v2/" in ln]
        assert lost and all("xattrs were lost" in ln for ln in lost), err
        assert "this backup has lost its xattrs" not in err
