"""Encrypted trees written by the kernel, in every shape the view must handle.

The tests build a tree through a real fscrypt-encrypted mount, remember the
plaintext (`Expected`), then lock the directory or unmount; the view, the
reader and the restore are then checked against that plaintext and against
what the kernel itself shows.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import Inode
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_INDEX_ENCRYPTION,
    EXT4_XATTR_NAME_ENCRYPTION_CONTEXT,
)
from ciphertextfs.fscrypt import kernel
from ciphertextfs.fscrypt.keysetup import FileKey, MasterKey, derive_file_key
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32,
    FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64,
    FSCRYPT_POLICY_FLAGS_PAD_4,
    FSCRYPT_POLICY_FLAGS_PAD_8,
    FSCRYPT_POLICY_FLAGS_PAD_16,
    FSCRYPT_POLICY_FLAGS_PAD_32,
    FSCRYPT_POLICY_V1,
    FscryptContext,
    build_context,
    parse_context,
)
from tests import harness

TEST_KEY_V2 = bytes(range(64))
TEST_KEY_V1 = bytes(range(64, 128))
TEST_KEY_V1_DESCRIPTOR = bytes.fromhex("0123456789abcdef")
MASTER_KEYS = {1: MasterKey(TEST_KEY_V1), 2: MasterKey(TEST_KEY_V2)}


def kernel_context(policy: kernel.KernelPolicy, nonce: bytes) -> FscryptContext:
    """The context the kernel stores for `policy` (as FS_IOC_GET_ENCRYPTION_POLICY_EX
    reports it) and `nonce` (FS_IOC_GET_ENCRYPTION_NONCE)."""
    return build_context(
        1 if policy.version == FSCRYPT_POLICY_V1 else 2,
        policy.key_spec,
        nonce,
        contents_mode=policy.contents_mode,
        filenames_mode=policy.filenames_mode,
        flags=policy.flags,
        log2_data_unit_size=policy.log2_data_unit_size,
    )


def on_disk_context(fs: Filesystem, inode: Inode) -> tuple[bytes, FscryptContext]:
    """The inode's one fscrypt context xattr, raw and parsed."""
    raw = [
        x.value
        for x in fs.xattrs(inode)
        if x.name_index == EXT4_XATTR_INDEX_ENCRYPTION
        and x.name == EXT4_XATTR_NAME_ENCRYPTION_CONTEXT
    ]
    assert len(raw) == 1, f"inode {inode.ino}: {len(raw)} encryption contexts"
    return raw[0], parse_context(raw[0])


def file_key(
    fs: Filesystem, inode: Inode, *, for_filenames: bool
) -> tuple[FscryptContext, FileKey]:
    """The inode's context and its contents or filenames key, under the test keys."""
    _raw, ctx = on_disk_context(fs, inode)
    return ctx, derive_file_key(
        MASTER_KEYS[ctx.version],
        ctx,
        ino=inode.ino,
        fs_uuid=fs.uuid,
        for_filenames=for_filenames,
        block_size=fs.block_size,
    )


@dataclass(frozen=True)
class Policy:
    """One fscrypt policy as the tests set it on a directory."""

    name: str
    version: int = 2
    flags: int = FSCRYPT_POLICY_FLAGS_PAD_32
    log2_data_unit_size: int = 0

    def apply(self, directory: Path, keys: dict[int, bytes]) -> None:
        if self.version == 1:
            kernel.set_policy_v1(directory, keys[1], flags=self.flags)
        else:
            kernel.set_policy_v2(
                directory,
                keys[2],
                flags=self.flags,
                log2_data_unit_size=self.log2_data_unit_size,
            )


POLICIES = [
    Policy("v1", version=1),
    Policy("v1-pad4", version=1, flags=FSCRYPT_POLICY_FLAGS_PAD_4),
    Policy("v2"),
    Policy("v2-pad4", flags=FSCRYPT_POLICY_FLAGS_PAD_4),
    Policy("v2-pad8", flags=FSCRYPT_POLICY_FLAGS_PAD_8),
    Policy("v2-pad16", flags=FSCRYPT_POLICY_FLAGS_PAD_16),
    Policy("v2-ino64", flags=FSCRYPT_POLICY_FLAGS_PAD_32 | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64),
    Policy("v2-ino32", flags=FSCRYPT_POLICY_FLAGS_PAD_32 | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32),
    Policy("v2-du512", log2_data_unit_size=9),
]
POLICY = {p.name: p for p in POLICIES}


@contextlib.contextmanager
def keys_added(mnt: Path) -> Iterator[dict[int, bytes]]:
    """Add the v1 and v2 test keys; yield {1: descriptor, 2: identifier}."""
    ident = kernel.add_key(mnt, TEST_KEY_V2)
    desc = kernel.add_key(mnt, TEST_KEY_V1, descriptor=TEST_KEY_V1_DESCRIPTOR)
    yield {1: desc, 2: ident}


def stamp_mtimes(root: Path, first_ns: int = 1_500_000_000_123_456_789) -> None:
    """Give `root` and every entry below it its own mtime, long past.

    rsync compares a directory's or a symlink's mtime with its copy's in
    whole seconds only, so a tree written less than a second before it is
    copied keeps the copy's own sub-second creation times on those entries,
    and an exact comparison with the original fails now and then.  Distinct
    times with nanoseconds also let a comparison catch one entry's time
    given to another.
    """
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / name for name in sorted([*dirnames, *filenames])]
    for i, path in enumerate(paths):
        ns = first_ns + i * 1_000_001_001
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def lock(mnt: Path, keys: dict[int, bytes]) -> None:
    """Remove both keys so every encrypted directory shows no-key names.

    A key whose files are still in use (an inode someone holds) is only
    partly removed and its directories would keep showing plaintext names;
    a second removal after dropping the caches finishes the job, and the
    key's status must then say it is gone.
    """
    os.sync()
    for spec in keys.values():
        for _attempt in range(3):
            try:
                kernel.remove_key(mnt, spec, all_users=True)
            except OSError as e:
                if e.errno != errno.ENOKEY:
                    raise
            harness.drop_caches()
            if kernel.key_status(mnt, spec).status == kernel.FSCRYPT_KEY_STATUS_ABSENT:
                break
        else:
            raise AssertionError(f"key {spec.hex()} still present after removal")


def ascii_name(n: int, tag: str = "") -> str:
    base = (tag + "abcdefghijklmnopqrstuvwxyz0123456789") * 8
    return base[:n]


def utf8_name(nbytes: int) -> str:
    """A name of exactly nbytes bytes of multi-byte UTF-8 (padded with ASCII)."""
    chars = "é漢🙂"
    out, size, i = [], 0, 0
    while True:
        c = chars[i % len(chars)]
        if size + len(c.encode()) > nbytes:
            break
        out.append(c)
        size += len(c.encode())
        i += 1
    return "".join(out) + "x" * (nbytes - size)


@dataclass
class Expected:
    """What a tree holds in plaintext, relative to its root."""

    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)


def write_tree(root: Path, block_size: int, *, small: bool = False) -> Expected:
    """Write the standard shapes below `root` (an encrypted directory or not).

    Sizes straddle every 16-byte and block boundary that matters, names span
    1..255 bytes, and there are holes, preallocation, hard links with long
    names in several directories, every symlink kind, fifos, device nodes
    and xattrs.  `small` leaves out the big directory and long files, for
    tests that only need the variety.
    """
    exp = Expected()

    def add_file(rel: str, data: bytes) -> None:
        (root / rel).write_bytes(data)
        exp.files[rel] = data

    def add_dir(rel: str) -> None:
        (root / rel).mkdir()
        exp.dirs.append(rel)

    add_dir("sizes")
    sizes = sorted({0, 1, 15, 16, 17, 31, 32, 33, block_size - 1, block_size, block_size + 1})
    if not small:
        sizes += [2 * block_size + 7, 5 * block_size]
    for n in sizes:
        add_file(f"sizes/f{n}", os.urandom(n))

    add_dir("sparse")
    hole = bytearray(4 * block_size + 100)
    hole[:10] = b"0123456789"
    hole[-20:] = os.urandom(20)
    with open(root / "sparse/holey", "wb") as f:
        f.write(hole[:10])
        f.seek(len(hole) - 20)
        f.write(hole[-20:])
    exp.files["sparse/holey"] = bytes(hole)
    with open(root / "sparse/tail-hole", "wb") as f:
        f.write(b"head")
        f.truncate(3 * block_size)
    exp.files["sparse/tail-hole"] = b"head" + bytes(3 * block_size - 4)
    fd = os.open(root / "sparse/prealloc", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 3 * block_size)
        os.pwrite(fd, b"written", block_size)
    finally:
        os.close(fd)
    exp.files["sparse/prealloc"] = bytes(block_size) + b"written" + bytes(2 * block_size - 7)
    (root / "sparse/keep-size").write_bytes(b"abc")
    harness.run("fallocate", "-n", "-l", str(4 * block_size), root / "sparse/keep-size")
    exp.files["sparse/keep-size"] = b"abc"

    add_dir("names")
    for n in (1, 2, 15, 16, 17, 31, 32, 33, 100, 143, 144, 149, 150, 180, 200, 240, 255):
        add_file(f"names/{ascii_name(n)}", f"ascii {n}".encode())
    for n in (2, 16, 50, 150, 254):
        add_file(f"names/{utf8_name(n)}", f"utf8 {n}".encode())

    rel = "deep"
    add_dir(rel)
    for level in range(12):
        rel += f"/level{level}"
        add_dir(rel)
    add_file(rel + "/bottom", b"twelve levels down\n")

    add_dir("links")
    add_dir("links/other")
    long_a = ascii_name(250, "A")
    long_b = ascii_name(251, "B")
    add_file("links/" + long_a, b"hard-linked\n")
    os.link(root / "links" / long_a, root / "links/other" / long_b)
    os.link(root / "links" / long_a, root / "links/short-link")
    exp.files["links/other/" + long_b] = exp.files["links/" + long_a]
    exp.files["links/short-link"] = exp.files["links/" + long_a]
    targets = {
        "links/fast": "sizes/f1",
        "links/slow": "../" + "x" * 200 + "/target",
        "links/dangling": "does/not/exist",
        "links/" + ascii_name(230, "S"): "target-of-a-long-named-symlink",
    }
    for link, target in targets.items():
        os.symlink(target, root / link)
        exp.symlinks[link] = target

    add_dir("special")
    for rel, mode, dev in (
        ("special/fifo", stat.S_IFIFO | 0o640, 0),
        ("special/chardev", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        ("special/blockdev", stat.S_IFBLK | 0o600, os.makedev(7, 200)),
        ("special/" + ascii_name(200, "F"), stat.S_IFIFO | 0o600, 0),
    ):
        os.mknod(root / rel, mode, dev)
        exp.special[rel] = mode

    add_dir("xattrs")
    add_file("xattrs/tagged", b"has xattrs\n")
    os.setxattr(root / "xattrs/tagged", "user.comment", b"hello")
    os.setxattr(root / "xattrs/tagged", "user.binary", bytes(range(256)))
    os.setxattr(root / "xattrs", "user.dir", b"on a directory")
    harness.run("setfacl", "-m", "u:1234:r--,g:4321:rw-", root / "xattrs/tagged")
    harness.run("setfacl", "-d", "-m", "u:1234:rwx", root / "xattrs")
    os.chmod(root / "xattrs/tagged", 0o640)
    os.chown(root / "xattrs/tagged", 1234, 4321)

    if not small:
        # Enough entry bytes (plaintext names of 52..128 bytes, so no name
        # is past the 149-byte no-key limit) that on 1 KiB blocks the leaves
        # outgrow the 123 slots of a dx_root even when the kernel packs them
        # 90% full: the htree must get a second level whatever the hashes.
        add_dir("big")
        for i in range(1100):
            add_file(f"big/entry-{i:05d}-" + "n" * (40 + i % 77), b"")
    return exp


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def listing(root: Path) -> dict[str, tuple]:
    """Everything a backup tool sees below `root` (a view, say), per relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                body = file_sha256(p)
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                )
            )
            out[os.fspath(p.relative_to(root))] = (
                st.st_ino,
                st.st_mode,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_rdev,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                body,
                xattrs,
            )
    return out
