"""The ext4 reader against debugfs, on images made by mke2fs -d and by the kernel.

For every inode reachable from the root, the reader's directory listings,
inode fields, times, device numbers, xattrs, block lists and contents are
compared with what debugfs prints for the same image (batched with
`debugfs -f`), and with the source tree the image was made from.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import EXT4_INLINE_DATA_FL, Inode
from ciphertextfs.ext4.superblock import INCOMPAT_INLINE_DATA
from tests import harness

IMAGE_MB = 96
DUMP_LIMIT = 16 << 20
XATTR_PREFIX = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
    7: b"system.",
    8: b"system.richacl",
}


# -- the source tree ------------------------------------------------------


def _sizes() -> list[int]:
    sizes = {0, 1, 59, 60, 61}
    for bs in (1024, 4096):
        for k in (1, 2, 12, 13):
            sizes.update((k * bs - 1, k * bs, k * bs + 1))
    sizes.update((268 * 1024, 268 * 1024 + 1))  # 1 KiB block map: double indirect starts
    return sorted(sizes)


def _pattern(n: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def _names() -> list[str]:
    names = [(f"{n:03d}" + "a" * n)[:n] for n in range(1, 256)]
    names += ["é" * n for n in (1, 50, 127)]  # 2-byte UTF-8, up to 254 bytes
    names += ["日本"[n % 2] * n for n in (1, 85)]  # 3 bytes, up to 255
    names += ["\U0001f600" * n for n in (1, 63)]  # 4 bytes, up to 252
    return names


def build_tree(root: Path, *, kernel: bool = False) -> None:
    """Every kind of object the reader must handle, as plain files."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = root / "sizes"
    sizes.mkdir()
    for i, n in enumerate(_sizes()):
        (sizes / f"s{n}").write_bytes(_pattern(n, i))
    sparse = root / "sparse"
    sparse.mkdir()
    with open(sparse / "truncated", "wb") as f:
        f.truncate(3 << 20)
    with open(sparse / "middle", "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle of nowhere")
        f.truncate(3 << 20)
    with open(sparse / "far", "wb") as f:  # triple indirect with 1 KiB blocks
        f.seek(80 << 20)
        f.write(_pattern(5000, 3))
    if kernel:
        with open(sparse / "prealloc", "wb") as f:
            f.write(b"written head")
            os.posix_fallocate(f.fileno(), 0, 256 << 10)
        with open(sparse / "prealloc_keep", "wb") as f:
            subprocess.run(["fallocate", "-n", "-l", "64K", f.name], check=True)
    names = root / "names"
    names.mkdir()
    for i, name in enumerate(_names()):
        (names / name).write_bytes(name.encode()[: i % 17])
    big = root / "bigdir"
    big.mkdir()
    for i in range(1200):
        (big / f"entry-{i:05d}-with-a-longer-name").write_bytes(b"%d" % i)
    deep = root
    for level in range(12):
        deep = deep / f"level{level}"
        deep.mkdir()
    (deep / "bottom").write_bytes(b"twelve levels down\n")
    links = root / "links"
    links.mkdir()
    (links / "hard_a").write_bytes(b"shared by two names\n")
    os.link(links / "hard_a", links / "hard_b")
    os.symlink("hard_a", links / "fast")
    os.symlink("t" * 59, links / "fast59")
    os.symlink("t" * 60, links / "slow60")
    os.symlink("/nowhere/" + "long/" * 80, links / "slow_dangling")
    os.symlink("missing", links / "dangling")
    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    os.mknod(special / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(special / "bigdev", 0o640 | stat.S_IFBLK, os.makedev(300, 70000))
    xa = root / "xattrs"
    xa.mkdir()
    (xa / "small").write_bytes(b"small xattr\n")
    os.setxattr(xa / "small", "user.one", b"1")
    os.setxattr(xa / "small", "user.bin", b"\x00\xff\n")
    (xa / "block").write_bytes(b"block xattr\n")
    os.setxattr(xa / "block", "user.large", _pattern(800, 9))
    os.setxattr(xa, "user.on_dir", b"directory value")
    (xa / "eainode").write_bytes(b"gets a 6000-byte xattr with ea_inode\n")
    inline = root / "inline"
    inline.mkdir()
    (inline / "tiny").write_bytes(b"fits in i_block")
    (inline / "medium").write_bytes(_pattern(100, 5))
    small_dir = inline / "smalldir"
    small_dir.mkdir()
    (small_dir / "x").write_bytes(b"x")


# -- debugfs ---------------------------------------------------------------


def debugfs(image: Path, commands: list[str]) -> dict[str, bytes]:
    """Run commands in one debugfs session; map each command to its output."""
    script = image.with_suffix(".cmds")
    script.write_text("\n".join(commands) + "\n")
    out = subprocess.run(
        ["debugfs", "-f", str(script), str(image)], capture_output=True, check=True
    ).stdout
    result: dict[str, bytes] = {}
    current = None
    for line in out.split(b"\n"):
        if line.startswith(b"debugfs: "):
            current = line[len(b"debugfs: ") :].decode()
            result[current] = b""
        elif current is not None:
            result[current] += line + b"\n"
    missing = [c for c in commands if c not in result]
    assert not missing, f"debugfs did not run {missing[:3]}"
    return result


@dataclass
class Stat:
    ino: int
    flags: int
    generation: int
    uid: int
    gid: int
    size: int
    links: int
    file_acl: int
    times: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    rdev: tuple[int, int] | None = None


def parse_stat(text: bytes) -> Stat:
    s = text.decode("utf-8", "surrogateescape")
    m = re.search(r"Inode: (\d+)\s+Type: .*?Flags: (0x[0-9a-f]+)", s)
    g = re.search(r"Generation: (\d+)", s)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*Size: (\d+)", s)
    a = re.search(r"File ACL: (\d+)", s)
    ln = re.search(r"Links: (\d+)", s)
    assert m and g and u and a and ln, s
    st = Stat(
        ino=int(m[1]),
        flags=int(m[2], 16),
        generation=int(g[1]),
        uid=int(u[1]),
        gid=int(u[2]),
        size=int(u[3]),
        links=int(ln[1]),
        file_acl=int(a[1]),
    )
    for t in re.finditer(
        r"^\s*(ctime|atime|mtime|crtime): 0x([0-9a-f]+)(?::([0-9a-f]+))?", s, re.M
    ):
        st.times[t[1]] = (int(t[2], 16), int(t[3], 16) if t[3] else None)
    d = re.search(r"Device major/minor number: (\d+):(\d+)", s)
    if d:
        st.rdev = (int(d[1]), int(d[2]))
    return st


def debugfs_time_ns(sec: int, extra: int | None) -> int:
    """The kernel's reading of a 32-bit time and its extra word (epoch bits, ns)."""
    signed = sec - (1 << 32) if sec >= 1 << 31 else sec
    if extra is None:
        return signed * 10**9
    return (signed + ((extra & 3) << 32)) * 10**9 + (extra >> 2)


def parse_ls(text: bytes) -> dict[bytes, tuple[int, int]]:
    """`ls -p` lines /ino/mode/uid/gid/name/size/ into {name: (ino, mode)}."""
    out = {}
    for line in text.split(b"\n"):
        if not line.startswith(b"/"):
            continue
        parts = line.split(b"/")
        ino, mode, name = int(parts[1]), int(parts[2], 8), parts[5]
        if ino and name not in (b".", b".."):
            out[name] = (ino, mode)
    return out


def parse_ea_list(text: bytes) -> dict[bytes, int]:
    out = {}
    for m in re.finditer(rb"^  (\S+) \((\d+)\)", text, re.M):
        out[m[1]] = int(m[2])
    return out


def parse_stat_blocks(text: bytes) -> list[tuple[int, int, bool]]:
    """(lblk, pblk, unwritten) per data block from stat's BLOCKS/EXTENTS list.

    Entries such as (IND) or (ETB0) name tree blocks, not file data.
    """
    out = []
    pattern = rb"\((\d+)(?:-(\d+))?(\[u\])?\):(\d+)(?:-(\d+))?"
    for m in re.finditer(pattern, text.split(b"BLOCKS:", 1)[-1].split(b"EXTENTS:", 1)[-1]):
        first, last = int(m[1]), int(m[2] or m[1])
        pblk = int(m[4])
        out += [(first + k, pblk + k, bool(m[3])) for k in range(last - first + 1)]
    return out


# -- the comparison ----------------------------------------------------------


def walk(fs: Filesystem) -> tuple[dict[int, Inode], dict[int, dict[bytes, int]], dict[bytes, int]]:
    """Every reachable inode, every directory listing, every path's inode."""
    inodes: dict[int, Inode] = {}
    listings: dict[int, dict[bytes, int]] = {}
    paths: dict[bytes, int] = {b"": 2}
    queue = deque([(2, b"")])
    while queue:
        ino, path = queue.popleft()
        if ino in inodes:
            continue
        inode = fs.inode(ino)
        inodes[ino] = inode
        if inode.is_dir:
            entries = fs.read_dir(inode)
            listings[ino] = {e.name: e.inode for e in entries}
            assert len(listings[ino]) == len(entries), f"duplicate names in {path!r}"
            for e in entries:
                paths[path + b"/" + e.name] = e.inode
                queue.append((e.inode, path + b"/" + e.name))
    return inodes, listings, paths


def xattr_name(index: int, name: bytes) -> bytes:
    prefix = XATTR_PREFIX[index]
    return prefix + name if prefix.endswith(b".") else prefix


def check_image(image: Path, src: Path, tmp: Path, times: dict[bytes, int] | None = None) -> dict:
    """Compare everything the reader sees in `image` with debugfs and `src`."""
    fs = Filesystem.open(image)
    try:
        assert fs.warnings == [], fs.warnings
        inodes, listings, paths = walk(fs)
        dumps = tmp / "dumps"
        dumps.mkdir(exist_ok=True)
        cmds = []
        for ino, inode in inodes.items():
            cmds += [f"stat <{ino}>", f"ea_list <{ino}>"]
            if inode.is_dir:
                cmds.append(f"ls -p <{ino}>")
            if inode.is_reg and inode.i_size <= DUMP_LIMIT:
                cmds.append(f"dump <{ino}> {dumps}/{ino}")
        out = debugfs(image, cmds)
        ea_cmds = []
        for ino in inodes:
            for name in parse_ea_list(out[f"ea_list <{ino}>"]):
                if name != b"system.data":
                    ea_cmds.append(
                        f"ea_get -f {dumps}/ea{ino}-{name.decode()} <{ino}> {name.decode()}"
                    )
        if ea_cmds:
            debugfs(image, ea_cmds)

        counts = {"dx": 0, "inline": 0, "ea_inode": 0, "unwritten": 0, "rdev": 0}
        for ino, listing in listings.items():
            want = parse_ls(out[f"ls -p <{ino}>"])
            assert listing == {n: i for n, (i, _) in want.items()}, f"directory {ino}"
            for name, (child, mode) in want.items():
                assert inodes[child].i_mode == mode, (ino, name)
            counts["dx"] += fs.is_dx_dir(inodes[ino]) and len(listing) > 500
        for ino, inode in inodes.items():
            st = parse_stat(out[f"stat <{ino}>"])
            assert (st.ino, st.flags, st.generation) == (ino, inode.i_flags, inode.i_generation)
            assert (st.uid, st.gid, st.size) == (inode.i_uid, inode.i_gid, inode.i_size), ino
            assert (st.links, st.file_acl) == (inode.i_links_count, inode.i_file_acl), ino
            assert st.rdev == inode.rdev, ino
            counts["rdev"] += inode.rdev is not None
            ours = {
                "ctime": inode.i_ctime_ns,
                "atime": inode.i_atime_ns,
                "mtime": inode.i_mtime_ns,
                "crtime": inode.i_crtime_ns,
            }
            for key, raw in st.times.items():
                assert ours[key] == debugfs_time_ns(*raw), (ino, key)
            if "crtime" not in st.times:
                assert inode.i_crtime_ns is None
            counts["inline"] += bool(inode.i_flags & EXT4_INLINE_DATA_FL)
            ea_want = parse_ea_list(out[f"ea_list <{ino}>"])
            ea_ours = {xattr_name(x.name_index, x.name): x.value for x in fs.xattrs(inode)}
            assert {n: len(v) for n, v in ea_ours.items()} == ea_want, ino
            for name, value in ea_ours.items():
                if name != b"system.data":
                    assert (dumps / f"ea{ino}-{name.decode()}").read_bytes() == value
                counts["ea_inode"] += len(value) > fs.block_size
            if not inode.has_inline_data and (inode.is_reg or inode.is_dir or inode.is_symlink):
                maps = fs.mappings(inode)
                mapped = [(m.lblk + k, m.pblk + k, m.unwritten) for m in maps for k in range(m.len)]
                assert mapped == parse_stat_blocks(out[f"stat <{ino}>"]), ino
                counts["unwritten"] += any(m.unwritten for m in maps)
            if f"dump <{ino}> {dumps}/{ino}" in out:
                dumped = (dumps / str(ino)).read_bytes()
                if inode.has_inline_data:
                    # debugfs dumps the whole inline area, whatever i_size says.
                    n = max(len(dumped), inode.i_size)
                    assert fs.read(inode, 0, n) == dumped.ljust(n, b"\0"), ino
                else:
                    assert fs.read(inode, 0, inode.i_size) == dumped, ino
        for path, ino in paths.items():
            inode = inodes[ino]
            source = src / os.fsdecode(path.lstrip(b"/"))
            if inode.is_symlink:
                assert fs.symlink_body(inode) == os.fsencode(os.readlink(source)), path
            elif inode.is_reg:
                size = inode.i_size
                if not fs.sb.has_incompat(INCOMPAT_INLINE_DATA):
                    # mke2fs 1.47.0 -d with inline_data drops trailing holes of
                    # sparse files; debugfs (above) is the size oracle there.
                    assert size == source.stat().st_size, path
                with open(source, "rb") as f:
                    for off in {0, max(size - 8192, 0), size // 2 & ~4095}:
                        f.seek(off)
                        assert fs.read(inode, off, 8192) == f.read(8192).ljust(8192, b"\0")
            if times is not None and path in times:
                assert inode.i_mtime_ns == times[path], path
        return counts
    finally:
        fs.close()


# -- the variants -------------------------------------------------------------

VARIANTS = {
    "ext4-4k": ["-t", "ext4", "-b", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "ext4-2k": ["-t", "ext4", "-b", "2048"],
    "ext4-sparse-super2": ["-t", "ext4", "-O", "sparse_super2"],
    "ext4-no-flex-bg": ["-t", "ext4", "-O", "^flex_bg", "-b", "1024"],
    "ext4-64k": ["-t", "ext4", "-b", "65536"],
    "ext4-32bit-nocsum": ["-t", "ext4", "-O", "^metadata_csum,^64bit"],
    "ext4-64bit-nocsum": ["-t", "ext4", "-O", "^metadata_csum,64bit"],
    "ext4-inline": ["-t", "ext4", "-O", "inline_data"],
    "ext4-nodirindex": ["-t", "ext4", "-O", "^dir_index"],
    "ext4-ea-inode": ["-t", "ext4", "-O", "ea_inode"],
    "ext4-meta-bg": ["-t", "ext4", "-O", "meta_bg,^resize_inode"],
    "ext4-bigalloc": ["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
    "ext3-4k": ["-t", "ext3", "-b", "4096"],
    "ext3-1k": ["-t", "ext3", "-b", "1024"],
    "ext2-1k-128": ["-t", "ext2", "-b", "1024", "-I", "128"],
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tree")
    build_tree(src)
    return src


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mke2fs_image(variant: str, tree: Path, tmp_path: Path) -> None:
    args = VARIANTS[variant]
    src = tree
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        # Every small file costs a whole block: 64 KiB blocks need room.
        f.truncate((IMAGE_MB * 6 if "65536" in args else IMAGE_MB) << 20)
    harness.run("mke2fs", "-q", "-F", "-N", "8192", *args, "-d", src, image)
    # e2fsck -D indexes every directory large enough, as the kernel would.
    rc = subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True).returncode
    assert rc in (0, 1), rc
    counts = check_image(image, src, tmp_path)
    assert counts["rdev"] == 2
    if "dir_index" not in " ".join(args) and not variant.startswith("ext2"):
        assert counts["dx"] >= 1, counts
    if "inline_data" in args[-1]:
        assert counts["inline"] >= 3, counts


@pytest.mark.parametrize(
    "extra", [["-b", "4096", "-O", "ea_inode"], ["-b", "1024", "-O", "inline_data"]]
)
def test_kernel_image(extra: list[str], kernel: None, tmp_path: Path) -> None:
    """A tree written by the kernel: htree, unwritten extents, nanosecond times."""
    image = harness.mkfs(tmp_path / "k.img", size_mb=IMAGE_MB, features=(), extra=extra)
    src = tmp_path / "src"
    build_tree(src, kernel=True)
    times: dict[bytes, int] = {}
    with harness.mounted(image, tmp_path / "mnt") as (_dev, mnt):
        subprocess.run(["cp", "-a", f"{src}/.", str(mnt)], check=True)
        # Files only the kernel can make: unwritten extents beyond and inside i_size.
        build_tree(mnt / "native", kernel=True)
        if "ea_inode" in extra:
            os.setxattr(mnt / "native/xattrs/eainode", "user.huge", _pattern(6000, 11))
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                times[b"/" + os.fsencode(p.relative_to(mnt))] = p.lstat().st_mtime_ns
        subprocess.run(["cp", "-a", f"{mnt}/native", f"{src}/native"], check=True)
    counts = check_image(image, src, tmp_path, times)
    assert counts["dx"] >= 1 and counts["unwritten"] >= 1, counts
    if "inline_data" in extra:
        assert counts["inline"] >= 3, counts
    if "ea_inode" in extra:
        assert counts["ea_inode"] >= 1, counts


# -- damage and I/O modes ------------------------------------------------------


def _small_image(tmp_path: Path) -> Path:
    src = tmp_path / "small"
    (src / "dir").mkdir(parents=True)
    for i in range(40):
        (src / "dir" / f"file-{i:03d}").write_bytes(_pattern(5000 + i, i))
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    harness.run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "metadata_csum", "-d", src, image)
    return image


def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x55]))


def test_checksum_mismatches_are_warnings(tmp_path: Path) -> None:
    """A flipped byte in an inode or a directory block is reported, not fatal."""
    image = _small_image(tmp_path)
    with Filesystem.open(image) as fs:
        assert fs.warnings == []
        bs = fs.block_size
        dir_ino = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}[b"dir"]
        names = sorted(e.name for e in fs.read_dir(fs.inode(dir_ino)))
    imap = harness.run("debugfs", "-R", f"imap <{dir_ino}>", image)
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", imap)
    assert m, imap
    inode_off = int(m[1]) * bs + int(m[2], 16)
    blocks = parse_stat_blocks(harness.run("debugfs", "-R", f"stat <{dir_ino}>", image).encode())
    _flip(image, inode_off + 0x8)  # i_atime: parsing still works
    _flip(image, blocks[0][1] * bs + 33)  # a name byte of the entry after "." and ".."
    with Filesystem.open(image) as fs:
        inode = fs.inode(dir_ino)
        after = sorted(e.name for e in fs.read_dir(inode))
        assert f"inode {dir_ino}: checksum mismatch" in fs.warnings
        assert any("directory block checksum mismatch" in w for w in fs.warnings), fs.warnings
        assert len(after) == len(names) and len(set(after) - set(names)) == 1


def test_buffered_and_direct_reads_agree(tmp_path: Path) -> None:
    """O_DIRECT, forced buffered reads and a tmpfs copy read the same bytes."""
    image = _small_image(tmp_path)
    results = []
    shm = Path("/dev/shm") / f"ciphertextfs-test-{os.getpid()}.img"
    try:
        shm.write_bytes(image.read_bytes())
        for path, direct in ((image, True), (image, False), (shm, True)):
            with Filesystem.open(path, direct_io=direct) as fs:
                if not direct:
                    assert not fs.source.direct
                d = {e.name: e.inode for e in fs.read_dir(fs.inode(2))}[b"dir"]
                files = fs.read_dir(fs.inode(d))
                results.append(
                    [
                        fs.read(fs.inode(e.inode), 0, 6000)
                        for e in sorted(files, key=lambda e: e.name)
                    ]
                )
    finally:
        shm.unlink(missing_ok=True)
    assert results[0] == results[1] == results[2]
    assert results[0][0] == _pattern(5000, 0) + bytes(1000)


def test_hash_after_encrypted_casefolded_name() -> None:
    """Encrypted+casefolded directories keep (hash, minor_hash) after the name.

    No tool here can make such a directory (no casefold in this kernel, and
    the names are ciphertext), so the entry is assembled from the layout in
    the kernel's ext4_dir_entry_hash.
    """
    from ciphertextfs.ext4 import dirent

    name = bytes(range(1, 18))  # 17 bytes: the hash starts at 8 + 20
    rec = dirent.dir_rec_len(len(name), True)
    entry = struct.pack("<IHBB", 77, rec, len(name), 1) + name.ljust(20, b"\0")
    entry += struct.pack("<II", 0x12345678, 0x9ABCDEF0)
    block = entry + struct.pack("<IHBB", 0, 1024 - rec, 0, 0).ljust(1024 - rec, b"\0")
    seen: list[str] = []
    kw = {"block_size": 1024, "inodes_count": 100, "filetype": True, "what": "t"}
    (e,) = dirent.parse_entries(block, hashed=True, warn=seen.append, **kw)
    assert (e.inode, e.name, e.hash, e.minor_hash) == (77, name, 0x12345678, 0x9ABCDEF0)
    (plain,) = dirent.parse_entries(block, hashed=False, warn=seen.append, **kw)
    assert plain.hash is None and seen == []
    # Too short a record for name + hash: the entry is refused with a warning.
    short = bytearray(block)
    struct.pack_into("<H", short, 4, rec - 8)
    assert dirent.parse_entries(bytes(short), hashed=True, warn=seen.append, **kw) == []
    assert seen
