"""Make the filesystem with mke2fs and write the planned inodes into it.

A filesystem mke2fs has just made is empty: blocks are taken in order
from libext2fs' allocator, inodes at the numbers the plan chose, and every
structure (inodes, extent trees, directory blocks, xattr blocks) is encoded
with the reader's definitions in ciphertextfs.ext4 and its checksums.  Data
goes straight to the target with pwrite; libext2fs writes the inode tables,
bitmaps, group descriptors and superblock when it closes.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ciphertextfs.ext4.dirent import (
    DX_NODE_COUNT_OFFSET,
    DX_ROOT_COUNT_OFFSET,
    EXT4_FT_BLKDEV,
    EXT4_FT_CHRDEV,
    EXT4_FT_DIR,
    EXT4_FT_FIFO,
    EXT4_FT_REG_FILE,
    EXT4_FT_SOCK,
    EXT4_FT_SYMLINK,
    dx_limit,
    encode_dx_node,
    encode_dx_root,
    encode_leaf_block,
    pack_leaf_blocks,
)
from ciphertextfs.ext4.dirhash import (
    DX_HASH_LEGACY_UNSIGNED,
    DX_HASH_TEA,
    EXT2_FLAGS_SIGNED_HASH,
    EXT2_FLAGS_UNSIGNED_HASH,
    dx_hash_version,
    ext4fs_dirhash,
)
from ciphertextfs.ext4.extents import (
    EXT4_EXT_MAX_DEPTH,
    EXT_INIT_MAX_LEN,
    Mapping,
    encode_header,
    encode_index,
    encode_leaf,
    extent_block_tail,
    extents_per_block,
)
from ciphertextfs.ext4.inode import (
    EXT4_EA_INODE_FL,
    EXT4_ENCRYPT_FL,
    EXT4_EXTENTS_FL,
    EXT4_INDEX_FL,
    I_BLOCK_SIZE,
    encode_inode,
    encode_rdev,
    ibody_xattr_space,
    inode_csum_seed,
)
from ciphertextfs.ext4.superblock import (
    COMPAT_DIR_INDEX,
    INCOMPAT_EA_INODE,
    INCOMPAT_ENCRYPT,
    INCOMPAT_EXTENTS,
    INCOMPAT_FILETYPE,
    INCOMPAT_LARGEDIR,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    parse_superblock,
    with_fields,
)
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_INDEX_ENCRYPTION,
    XATTR_HEADER_SIZE,
    EaRefs,
    Xattr,
    area_size,
    ea_inode_value_hash,
    encode_block,
    encode_ibody,
    min_large_ea_size,
)
from ciphertextfs.mounts import loop_devices_of, read_mountinfo
from ciphertextfs.restore import DEFAULT_BLOCK_SIZE
from ciphertextfs.restore.backup import Backup, Entry, Kind, show_path
from ciphertextfs.restore.plan import RestoreProblem
from ciphertextfs.restore.report import Report

from .libext2fs import Ext2Error, Ext2Fs
from .plan import FIRST_INO, Node, Plan, backup_name

INODE_SIZE = 256
READ_CHUNK = 1 << 20
EXT4_LINK_MAX = 65000
MAX_I_BLOCKS = 1 << 48
EXT4_HTREE_LEVEL = 3
"""Index levels (the root included) the kernel follows with large_dir; 2 without."""

_FILE_TYPE = {
    Kind.REG: EXT4_FT_REG_FILE,
    Kind.DIR: EXT4_FT_DIR,
    Kind.SYMLINK: EXT4_FT_SYMLINK,
    Kind.FIFO: EXT4_FT_FIFO,
    Kind.CHR: EXT4_FT_CHRDEV,
    Kind.BLK: EXT4_FT_BLKDEV,
    Kind.SOCK: EXT4_FT_SOCK,
}
_S_IFMT = {
    Kind.REG: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.CHR: stat.S_IFCHR,
    Kind.BLK: stat.S_IFBLK,
    Kind.SOCK: stat.S_IFSOCK,
}


class TargetError(Exception):
    """The target cannot be used (exists, mounted, too small); nothing was written."""


@dataclass
class MkfsOptions:
    size: int | None = None
    force: bool = False
    features: list[str] = field(default_factory=list)
    extended: list[str] = field(default_factory=list)
    label: str | None = None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def block_size_of(plan: Plan) -> int:
    return plan.block_size or DEFAULT_BLOCK_SIZE


def inode_count(plan: Plan, size: int) -> int:
    """As many inodes as mke2fs would give (one per 16 KiB), and enough for the plan."""
    wanted = max((n.want_ino or 0 for n in plan.nodes), default=0)
    ea = len(large_values(plan))
    return max(size // 16384, wanted, len(plan.nodes) + ea + FIRST_INO + 1024)


def large_values(plan: Plan) -> list[int]:
    """Sizes of the xattr values that may need EA inodes: every value of a node
    whose xattrs together do not fit in one block (a bound for sizing)."""
    bs = block_size_of(plan)
    return [
        len(x.value)
        for n in plan.nodes
        if XATTR_HEADER_SIZE + area_size(n.xattrs) + 4 > bs
        for x in n.xattrs
    ]


def image_size(plan: Plan) -> int:
    """Bytes for the backup's data and metadata, with a quarter and 64 MiB of headroom."""
    bs = block_size_of(plan)
    data = 0
    for n in plan.nodes:
        if n.kind is Kind.REG:
            data += _ceil(n.data_len, bs) * bs
        elif n.kind is Kind.SYMLINK and len(n.body) >= I_BLOCK_SIZE:
            data += bs
        elif n.kind is Kind.DIR:
            data += bs
        if len(n.xattrs) > 1:
            data += bs
    data += sum(_ceil(v, bs) * bs for v in large_values(plan))
    data += plan.name_bytes * 2
    size = data + data // 4 + (64 << 20)
    groups = _ceil(inode_count(plan, size), 8 * bs)
    size = max(size, groups * 8 * bs * bs)
    size += (len(plan.nodes) + FIRST_INO) * INODE_SIZE
    return _ceil(size, 1 << 20) << 20


# -- the target ----------------------------------------------------------------


def prepare_target(target: str, size: int, opts: MkfsOptions) -> bool:
    """Create a sparse image, or check that an existing one may be overwritten.

    Returns whether the target is a block device (whose old contents are
    not discarded).  An existing image keeps its size unless --size says
    otherwise or it is too small; a mounted device, or an image a loop
    device is using, is refused even with --force.
    """
    try:
        st = os.stat(target)
    except FileNotFoundError:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise TargetError(f"{target}: {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return False
    if not opts.force:
        raise TargetError(f"{target} exists; use --force to overwrite it")
    if stat.S_ISBLK(st.st_mode):
        if (os.major(st.st_rdev), os.minor(st.st_rdev)) in {m.dev for m in read_mountinfo()}:
            raise TargetError(f"{target} is mounted")
        try:
            fd = os.open(target, os.O_RDONLY | os.O_EXCL)
        except OSError as e:
            raise TargetError(f"{target}: in use ({e.strerror})") from None
        try:
            dev_size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if dev_size < size and opts.size is None:
            raise TargetError(f"{target}: {dev_size} bytes, the backup needs about {size}")
        return True
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(f"{target}: not a regular file or block device")
    loops = loop_devices_of(target)
    if loops:
        raise TargetError(f"{target} is in use by /dev/{loops[0].name}")
    new_size = opts.size if opts.size is not None else max(st.st_size, size)
    os.truncate(target, 0)
    os.truncate(target, new_size)
    return False


def needs_large_dir(plan: Plan, bs: int) -> bool:
    """Whether a directory may need a third htree level (large_dir, Linux 4.13).

    Counted with metadata_csum's smaller blocks and a margin, since the
    leaves are packed in hash order, which mke2fs has not chosen yet; the
    feature is only asked for when a directory comes close, so that other
    images still mount on older kernels.
    """
    capacity = dx_limit(bs, DX_ROOT_COUNT_OFFSET, True) * dx_limit(bs, DX_NODE_COUNT_OFFSET, True)
    for node in plan.nodes:
        if node.kind is Kind.DIR and len(node.children) > capacity * 0.9:
            entries = [(0, b".", 0), (0, b"..", 0)] + [(0, n, 0) for n, _ in node.children]
            if len(pack_leaf_blocks(entries, bs, True)) > capacity * 0.9:
                return True
    return False


def mkfs_command(plan: Plan, target: str, size: int, opts: MkfsOptions, device: bool) -> list[str]:
    bs = block_size_of(plan)
    features = ["encrypt"]
    if plan.fs_uuid is not None:
        features.append("stable_inodes")
    if needs_large_dir(plan, bs) and not any(f.endswith("large_dir") for f in opts.features):
        features.append("large_dir")
    if large_values(plan) and not any(f.endswith("ea_inode") for f in opts.features):
        features.append("ea_inode")
    features += opts.features
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(bs), "-I", str(INODE_SIZE)]
    cmd += ["-N", str(inode_count(plan, size)), "-O", ",".join(features)]
    if plan.fs_uuid is not None:
        cmd += ["-U", str(uuidlib.UUID(bytes=plan.fs_uuid))]
    extended = (["lazy_itable_init=0"] if device else []) + opts.extended
    if extended:
        cmd += ["-E", ",".join(extended)]
    if opts.label is not None:
        cmd += ["-L", opts.label]
    cmd.append(target)
    if device and opts.size is not None:
        cmd.append(f"{size // 1024}k")
    return cmd


def admin_hash_seed(opts: MkfsOptions) -> bool:
    return any(o.startswith("hash_seed=") for o in opts.extended)


def make_filesystem(plan: Plan, target: str, opts: MkfsOptions) -> None:
    size = opts.size if opts.size is not None else image_size(plan)
    device = prepare_target(target, size, opts)
    cmd = mkfs_command(plan, target, size, opts, device)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"mke2fs failed: {res.stderr.strip() or res.stdout.strip()}")
    if plan.dirhash is not None:
        set_dirhash(target, *plan.dirhash, keep_seed=admin_hash_seed(opts))


def set_dirhash(target: str, version: int, seed: bytes, *, keep_seed: bool) -> None:
    """Give the new filesystem the original's directory hash, before anything is written.

    The hash inside a no-key name is computed with s_hash_seed and the hash
    version (s_def_hash_version for a directory the kernel reads without a
    dx_root, and for the directories it indexes later), whose legacy
    algorithms depend on the unsigned-char flag.  mke2fs sets none of them
    from outside as needed: its hash_seed= option replaces an all-zero seed
    (which means "no seed" to the kernel) with a random one, and it takes the
    char signedness of the machine it runs on.
    """
    unsigned = version >= DX_HASH_LEGACY_UNSIGNED
    base = version - DX_HASH_LEGACY_UNSIGNED if unsigned else version
    assert 0 <= base <= DX_HASH_TEA
    fd = os.open(target, os.O_RDWR)
    try:
        raw = os.pread(fd, SUPERBLOCK_SIZE, SUPERBLOCK_OFFSET)
        sb = parse_superblock(raw)
        flags = sb.s_flags & ~(EXT2_FLAGS_SIGNED_HASH | EXT2_FLAGS_UNSIGNED_HASH)
        flags |= EXT2_FLAGS_UNSIGNED_HASH if unsigned else EXT2_FLAGS_SIGNED_HASH
        fields: dict[str, int | bytes] = {"s_def_hash_version": base, "s_flags": flags}
        if not keep_seed:
            fields["s_hash_seed"] = seed
        os.pwrite(fd, with_fields(raw, **fields), SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)


# -- filling it ----------------------------------------------------------------


class _NodeFailed(Exception):
    pass


class ImageWriter:
    """Writes every node of a plan into a filesystem mke2fs has just made."""

    def __init__(
        self, plan: Plan, target: str, report: Report, reopen: Callable[[], Backup]
    ) -> None:
        self.plan = plan
        self.reopen = reopen
        self.target = target
        self.report = report
        with open(target, "rb") as f:
            f.seek(SUPERBLOCK_OFFSET)
            self.sb = parse_superblock(f.read(SUPERBLOCK_SIZE))
        for flag, name in (
            (INCOMPAT_EXTENTS, "extent"),
            (INCOMPAT_FILETYPE, "filetype"),
            (INCOMPAT_ENCRYPT, "encrypt"),
        ):
            if not self.sb.has_incompat(flag):
                raise TargetError(f"restore-image needs the {name} feature (-O ^{name} given?)")
        self.bs = self.sb.block_size
        self.inode_size = self.sb.inode_size
        self.ea_inode = self.sb.has_incompat(INCOMPAT_EA_INODE)
        self.large_ea = min_large_ea_size(self.bs)
        self._next_ino = FIRST_INO
        self._reserved_inos: set[int] = set()
        self.seed = self.sb.csum_seed if self.sb.metadata_csum else None
        self.zero_block = bytes(self.bs)
        self.goal = 0
        self.failed: set[int] = set()
        self.now_ns = time.time_ns()
        self._allocated: list[tuple[int, int]] = []

    def run(self) -> None:
        fs = Ext2Fs(self.target)
        self.fs = fs
        self.fd = os.open(self.target, os.O_WRONLY)
        try:
            self._assign_inodes()
            fs.punch(2)
            fs.punch(11)
            reserve = self._reserve_metadata()
            self._write_files()
            for blk, n in reserve:
                fs.free_range(blk, n)
            self.goal = reserve[0][0] if reserve else self.goal
            for node in self.plan.nodes:
                if node.kind not in (Kind.DIR, Kind.REG) and node.ino:
                    self._write_node(node)
            for node in reversed(self.plan.nodes):
                if node.kind is Kind.DIR and node.ino:
                    self._write_node(node)
            os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            fs.abandon()
            raise
        os.close(self.fd)
        fs.close()

    def _reserve_metadata(self) -> list[tuple[int, int]]:
        """Blocks held back for directories, symlinks and xattr blocks while files are written.

        A file that finds no space costs that file only; a directory that
        found none would leave its entries unattached, so the blocks every
        directory (with all its entries, an htree, an extent tree) and every
        other non-file inode may need are taken first and given back after
        the files.
        """
        bs = self.bs
        csum = self.seed is not None
        need = 0
        for node in self.plan.nodes:
            if not node.ino:
                continue
            if len(node.xattrs) > 1:
                need += 1
            if node.kind is Kind.DIR:
                if XATTR_HEADER_SIZE + area_size(node.xattrs) + 4 > bs:
                    need += sum(_ceil(len(x.value), bs) + 1 for x in node.xattrs)
                entries = [(0, b".", 0), (0, b"..", 0)] + [(0, n, 0) for n, _ in node.children]
                leaves = len(pack_leaf_blocks(entries, bs, csum))
                if leaves > 1:
                    per = dx_limit(bs, DX_NODE_COUNT_OFFSET, csum)
                    leaves += 1 + _ceil(leaves, per) + _ceil(leaves, per * per)
                need += leaves + (0 if leaves <= 4 else 4)
            elif node.kind is Kind.SYMLINK and len(node.body) >= I_BLOCK_SIZE:
                need += 1
        self._allocated = []
        try:
            self._alloc(need)
        except Ext2Error:
            for blk, n in self._allocated:
                self.fs.free_range(blk, n)
            raise TargetError(
                f"{self.target}: no room for the directories ({need} blocks); give a larger --size"
            ) from None
        return self._allocated

    def _write_files(self) -> None:
        """Regular files, in a second read of the backup.

        A tar archive read as a stream gives a member's contents only while
        that member is the current entry, so contents are read in backup
        order, in a pass of their own once the filesystem exists.
        """
        todo = {n.path: n for n in self.plan.nodes if n.kind is Kind.REG and n.ino}
        with self.reopen() as backup:
            for item in backup.entries():
                node = todo.pop(item.path, None) if isinstance(item, Entry) else None
                if node is None:
                    continue
                if item.kind is not Kind.REG or item.open is None or item.size != node.data_len:
                    self._fail(node, "changed in the backup between its two reads")
                    continue
                node.open = item.open
                self._write_node(node)
        for node in todo.values():
            self._fail(node, "missing from the backup on its second read")

    def _fail(self, node: Node, reason: str) -> None:
        self.failed.add(node.ino)
        self.report.problem(node.path, reason)

    def _assign_inodes(self) -> None:
        reserved = {n.want_ino for n in self.plan.nodes if n.want_ino is not None}
        nxt = FIRST_INO
        limit = self.sb.s_inodes_count
        for node in self.plan.nodes:
            if node.ino:
                continue
            if node.want_ino is not None:
                node.ino = node.want_ino
            else:
                while nxt in reserved:
                    nxt += 1
                node.ino = nxt
                nxt += 1
            if node.ino > limit:
                self.report.problem(node.path, f"inode number {node.ino} beyond {limit}")
                node.ino = 0
        self._next_ino = nxt
        self._reserved_inos = reserved

    def _spare_ino(self) -> int:
        """An inode number no node has, for an EA inode."""
        while self._next_ino in self._reserved_inos:
            self._next_ino += 1
        ino = self._next_ino
        if ino > self.sb.s_inodes_count:
            raise RestoreProblem("no inode left for an xattr value (give a larger --size)")
        self._next_ino += 1
        return ino

    def _write_node(self, node: Node) -> None:
        self._allocated = []
        try:
            nbytes = self._encode(node)
        except (RestoreProblem, ValueError, Ext2Error, OSError, EOFError, tarfile.TarError) as err:
            for blk, n in self._allocated:
                self.fs.free_range(blk, n)
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            self._fail(node, reason)
            return
        self.report.done(nbytes)

    # -- blocks --------------------------------------------------------

    def _alloc(self, count: int) -> list[tuple[int, int]]:
        out = []
        while count:
            blk, n = self.fs.new_range(self.goal, count)
            self._allocated.append((blk, n))
            out.append((blk, n))
            self.goal = blk + n
            count -= n
        return out

    def _alloc_one(self) -> int:
        return self._alloc(1)[0][0]

    def _pwrite(self, blk: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        off = blk * self.bs
        while view:
            n = os.pwrite(self.fd, view, off)
            view = view[n:]
            off += n

    def _write_data(self, node: Node) -> tuple[list[Mapping], int]:
        """Copy a file's blocks; all-zero blocks stay holes.  (mappings, blocks used)."""
        assert node.open is not None
        bs = self.bs
        nblocks = _ceil(node.size, bs)
        mappings: list[Mapping] = []
        used = 0
        lblk = 0
        remaining = node.data_len
        with node.open() as src:
            while remaining > 0:
                chunk = src.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise RestoreProblem(
                        f"backup ends {remaining} bytes before the end of the file"
                    )
                remaining -= len(chunk)
                if len(chunk) % bs:
                    if remaining:
                        more = src.read(bs - len(chunk) % bs)
                        remaining -= len(more)
                        chunk += more
                    chunk += bytes(-len(chunk) % bs)
                mv = memoryview(chunk)
                n = len(chunk) // bs
                i = 0
                while i < n and lblk + i < nblocks:
                    if mv[i * bs : (i + 1) * bs] == self.zero_block:
                        i += 1
                        continue
                    j = i + 1
                    while (
                        j < n
                        and lblk + j < nblocks
                        and mv[j * bs : (j + 1) * bs] != self.zero_block
                    ):
                        j += 1
                    pos = i
                    for blk, cnt in self._alloc(j - i):
                        self._pwrite(blk, mv[pos * bs : (pos + cnt) * bs])
                        _add_mapping(mappings, lblk + pos, blk, cnt)
                        pos += cnt
                    used += j - i
                    i = j
                lblk += n
                self.report.add_bytes(len(chunk))
                self.report.tick()
        return mappings, used

    def _extent_tree(self, ino: int, mappings: list[Mapping]) -> tuple[bytes, int]:
        """i_block and the number of tree blocks for a list of mappings.

        Leaves are filled, then as many levels of full index blocks as the
        four entries of i_block need: a fragmented file (a sparse encrypted
        file has one extent per written run) gets the shallowest tree that
        holds it, which is also the one e2fsck finds nothing to narrow in.
        """
        if len(mappings) <= 4:
            body = encode_header(len(mappings), 4, 0) + encode_leaf(mappings)
            return body.ljust(I_BLOCK_SIZE, b"\0"), 0
        per = extents_per_block(self.bs)
        seed = self._inode_seed(ino)
        level = [
            (chunk[0].lblk, encode_leaf(chunk), len(chunk))
            for chunk in (mappings[i : i + per] for i in range(0, len(mappings), per))
        ]
        depth = 0
        written = 0
        while True:
            if depth >= EXT4_EXT_MAX_DEPTH:
                raise RestoreProblem(f"{len(mappings)} extents need a deeper tree than ext4's")
            index = []
            for first, entries, count in level:
                blk = self._alloc_one()
                body = (encode_header(count, per, depth) + entries).ljust(12 + 12 * per, b"\0")
                if seed is not None:
                    body += extent_block_tail(body, seed)
                self._pwrite(blk, body.ljust(self.bs, b"\0"))
                index.append((first, encode_index(first, blk)))
            written += len(level)
            depth += 1
            if len(index) <= 4:
                break
            level = [
                (chunk[0][0], b"".join(e for _, e in chunk), len(chunk))
                for chunk in (index[i : i + per] for i in range(0, len(index), per))
            ]
        i_block = encode_header(len(index), 4, depth) + b"".join(e for _, e in index)
        return i_block.ljust(I_BLOCK_SIZE, b"\0"), written

    def _inode_seed(self, ino: int) -> int | None:
        if self.seed is None:
            return None
        return inode_csum_seed(self.seed, ino, 0)

    # -- xattrs --------------------------------------------------------

    def _split_xattrs(self, node: Node) -> tuple[list[Xattr], list[Xattr], list[Xattr]]:
        """(in the inode, in the EA block, in EA inodes of their own).

        As the kernel does: a value too large to share a block goes to an
        EA inode, and with the ea_inode feature, when the inode and one block
        cannot hold the rest, the largest values follow until they can.
        """
        space = ibody_xattr_space(self.inode_size)
        xs = list(node.xattrs)
        if not xs:
            return [], [], []
        big: list[Xattr] = []
        small = list(xs)
        if self.ea_inode:
            big = [x for x in xs if (len(x.value) + 3) & ~3 > self.large_ea]
            small = [x for x in xs if x not in big]
        while True:
            refs = {(x.name_index, x.name): (0, 0) for x in big}
            if 8 + area_size(xs, refs) <= space:
                return xs, [], big
            ctx = [x for x in xs if x.name_index == EXT4_XATTR_INDEX_ENCRYPTION]
            rest = [x for x in xs if x.name_index != EXT4_XATTR_INDEX_ENCRYPTION]
            if not ctx or 8 + area_size(ctx) > space:
                ctx, rest = [], xs
            if XATTR_HEADER_SIZE + area_size(rest, refs) + 4 <= self.bs:
                return ctx, rest, big
            movable = [x for x in small if x.name_index != EXT4_XATTR_INDEX_ENCRYPTION]
            why = "" if self.ea_inode else " (-O ea_inode allows more)"
            if not movable:
                raise RestoreProblem(f"xattrs too large for the inode and one block{why}")
            largest = max(movable, key=lambda x: len(x.value))
            small.remove(largest)
            if self.ea_inode:
                big.append(largest)
            elif node.kind is Kind.DIR:
                # Its entries are written already: the directory must be, too.
                xs = [x for x in xs if x is not largest]
                self.plan.warnings += 1
                self.report.note(
                    f"{show_path(node.path)}: xattr {backup_name(largest)} left out: "
                    f"too large for the inode and one block{why}"
                )
            else:
                raise RestoreProblem(f"xattrs too large for the inode and one block{why}")

    def _write_ea_values(
        self, node: Node, big: list[Xattr]
    ) -> tuple[EaRefs, list[tuple[int, bytes]]]:
        """Blocks of each EA inode written; (references, inodes still to write).

        An EA inode's blocks are all allocated (the kernel reads a hole in
        one as corruption); it records the crc32c of its value in i_atime and
        its reference count in i_version, and its owner's uid and gid.
        """
        refs: EaRefs = {}
        inodes = []
        for x in big:
            ino = self._spare_ino()
            value_hash = ea_inode_value_hash(self.sb.csum_seed, x.value)
            nblocks = _ceil(len(x.value), self.bs)
            mappings: list[Mapping] = []
            lblk = 0
            for blk, cnt in self._alloc(nblocks):
                chunk = x.value[lblk * self.bs : (lblk + cnt) * self.bs]
                self._pwrite(blk, chunk.ljust(cnt * self.bs, b"\0"))
                _add_mapping(mappings, lblk, blk, cnt)
                lblk += cnt
            i_block, tree = self._extent_tree(ino, mappings)
            raw = encode_inode(
                self.inode_size,
                mode=stat.S_IFREG | 0o600,
                uid=node.uid,
                gid=node.gid,
                size=len(x.value),
                links=1,
                flags=EXT4_EA_INODE_FL | EXT4_EXTENTS_FL,
                atime_ns=value_hash * 1_000_000_000,
                mtime_ns=self.now_ns,
                ctime_ns=0,
                crtime_ns=self.now_ns,
                i_block=i_block,
                i_blocks=(nblocks + tree) * (self.bs // 512),
                version=1,
            )
            refs[(x.name_index, x.name)] = (ino, value_hash)
            inodes.append((ino, raw))
        return refs, inodes

    # -- one inode -----------------------------------------------------

    def _encode(self, node: Node) -> int:
        bs = self.bs
        flags = EXT4_ENCRYPT_FL if node.encrypted else 0
        i_block = bytes(I_BLOCK_SIZE)
        blocks = 0
        size = 0
        nbytes = 0
        links = node.links
        ibody, block_xattrs, big = self._split_xattrs(node)
        if node.kind is Kind.REG:
            mappings, blocks = self._write_data(node)
            tree_blocks = 0
            i_block, tree_blocks = self._extent_tree(node.ino, mappings)
            blocks += tree_blocks
            flags |= EXT4_EXTENTS_FL
            size = node.size
            nbytes = node.data_len
        elif node.kind is Kind.DIR:
            i_block, blocks = self._write_dir(node)
            size = blocks * bs
            flags |= EXT4_EXTENTS_FL
            if node.indexed:
                flags |= EXT4_INDEX_FL
            subdirs = sum(
                1
                for _, c in node.children
                if c.kind is Kind.DIR and c.ino and c.ino not in self.failed
            )
            links = 2 + subdirs
            if links >= EXT4_LINK_MAX:
                links = 1
        elif node.kind is Kind.SYMLINK:
            size = len(node.body)
            if size < I_BLOCK_SIZE:
                i_block = node.body.ljust(I_BLOCK_SIZE, b"\0")
            else:
                if size >= bs:
                    raise RestoreProblem(f"symlink body of {size} bytes does not fit a block")
                blk = self._alloc_one()
                self._pwrite(blk, node.body.ljust(bs, b"\0"))
                i_block, _ = self._extent_tree(node.ino, [Mapping(0, blk, 1, False)])
                blocks = 1
                flags |= EXT4_EXTENTS_FL
        elif node.kind in (Kind.CHR, Kind.BLK):
            i_block = encode_rdev(*node.rdev)
        refs, ea_inodes = self._write_ea_values(node, big)
        # The owner is charged for its EA inodes' values, as the kernel's quota does.
        blocks += sum(_ceil(len(x.value), bs) for x in big)
        file_acl = 0
        if block_xattrs:
            file_acl = self._alloc_one()
            self._pwrite(file_acl, encode_block(block_xattrs, bs, file_acl, self.seed, refs))
            blocks += 1
        i_blocks = blocks * (bs // 512)
        if i_blocks >= MAX_I_BLOCKS:
            raise RestoreProblem("file too large")
        raw = encode_inode(
            self.inode_size,
            mode=_S_IFMT[node.kind] | node.mode,
            uid=node.uid,
            gid=node.gid,
            size=size,
            links=links,
            flags=flags,
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=self.now_ns,
            crtime_ns=self.now_ns,
            i_block=i_block,
            i_blocks=i_blocks,
            file_acl=file_acl,
            ibody_xattrs=encode_ibody(ibody, ibody_xattr_space(self.inode_size), refs),
        )
        for ino, ea_raw in ea_inodes:
            self.fs.alloc_inode(ino, False)
            self.fs.write_inode(ino, ea_raw)
        if node.ino not in (2, 11):
            self.fs.alloc_inode(node.ino, node.kind is Kind.DIR)
        self.fs.write_inode(node.ino, raw)
        return nbytes

    def _write_dir(self, node: Node) -> tuple[bytes, int]:
        assert node.parent is not None
        entries = [(node.ino, b".", EXT4_FT_DIR), (node.parent.ino, b"..", EXT4_FT_DIR)]
        entries += [
            (c.ino, name, _FILE_TYPE[c.kind])
            for name, c in node.children
            if c.ino and c.ino not in self.failed
        ]
        packed = pack_leaf_blocks(entries, self.bs, self.seed is not None)
        seed = self._inode_seed(node.ino)
        blocks = None
        if len(packed) > 1 and self.sb.has_compat(COMPAT_DIR_INDEX):
            blocks = self._htree(node, entries[2:], seed)
        if blocks is None:
            blocks = [encode_leaf_block(b, self.bs, seed) for b in packed]
        mappings: list[Mapping] = []
        lblk = 0
        for blk, cnt in self._alloc(len(blocks)):
            for k in range(cnt):
                self._pwrite(blk + k, blocks[lblk + k])
            _add_mapping(mappings, lblk, blk, cnt)
            lblk += cnt
        i_block, tree = self._extent_tree(node.ino, mappings)
        return i_block, len(blocks) + tree

    def _htree(
        self, node: Node, entries: list[tuple[int, bytes, int]], seed: int | None
    ) -> list[bytes] | None:
        """The blocks of an indexed directory: root, interior nodes, leaves in hash order;
        None when the filesystem allows too few levels for it.

        Names are hashed as the kernel hashes them for lookups (the
        ciphertext name in an encrypted directory), with the filesystem's
        default hash version recorded in dx_root_info.
        """
        assert node.parent is not None
        bs = self.bs
        csum = self.seed is not None
        raw_version = self.sb.s_def_hash_version
        version = dx_hash_version(raw_version, self.sb.s_flags)
        hashed = sorted(
            (ext4fs_dirhash(name, version, self.sb.s_hash_seed), ino, name, ft)
            for ino, name, ft in entries
        )
        leaves = pack_leaf_blocks([(i, n, f) for _, i, n, f in hashed], bs, csum)
        hashes = [h for h, *_ in hashed]
        index: list[int] = []
        pos = 0
        for leaf in leaves:
            h = hashes[pos][0]
            if pos and hashes[pos - 1][0] == h:
                h |= 1
            index.append(h)
            pos += len(leaf)
        root_limit = dx_limit(bs, DX_ROOT_COUNT_OFFSET, csum)
        node_limit = dx_limit(bs, DX_NODE_COUNT_OFFSET, csum)
        counts = htree_levels(len(leaves), root_limit, node_limit)
        allowed = EXT4_HTREE_LEVEL if self.sb.has_incompat(INCOMPAT_LARGEDIR) else 2
        if len(counts) >= allowed:
            # Its entries are written already: refusing the directory would
            # leave them unattached.  A linear directory holds any number.
            self.plan.warnings += 1
            self.report.note(
                f"{show_path(node.path)}: {len(entries)} entries need {len(counts) + 1} htree "
                f"levels, this filesystem allows {allowed}"
                + ("" if allowed == EXT4_HTREE_LEVEL else " (-O large_dir allows 3)")
                + ": written as a linear directory, whose lookups are slow and whose "
                "no-key names carry no hash"
            )
            return None
        # Block 0 is the root, then the interior levels from the top down,
        # then the leaves; the tree is built from the leaves up.
        starts = []
        pos = 1
        for count in reversed(counts):
            starts.insert(0, pos)
            pos += count
        refs = [(index[i], pos + i) for i in range(len(leaves))]
        interior: list[list[bytes]] = []
        for level, start in enumerate(starts):
            groups = [refs[i : i + node_limit] for i in range(0, len(refs), node_limit)]
            assert len(groups) == counts[level]
            interior.insert(0, [encode_dx_node(g, bs, seed) for g in groups])
            refs = [(g[0][0], start + k) for k, g in enumerate(groups)]
        blocks = [
            encode_dx_root(node.ino, node.parent.ino, raw_version, len(counts), refs, bs, seed),
            *(b for level in interior for b in level),
        ]
        blocks += [encode_leaf_block(b, bs, seed) for b in leaves]
        node.indexed = True
        return blocks


def htree_levels(leaves: int, root_limit: int, node_limit: int) -> list[int]:
    """Interior blocks per level, from the level above the leaves up, for the
    fewest levels under a root of root_limit entries."""
    counts: list[int] = []
    n = leaves
    while n > root_limit:
        n = _ceil(n, node_limit)
        counts.append(n)
    return counts


def _add_mapping(mappings: list[Mapping], lblk: int, pblk: int, n: int) -> None:
    """Append a run, merged with the previous extent when contiguous on both sides."""
    while n:
        if mappings:
            last = mappings[-1]
            if (
                last.lblk + last.len == lblk
                and last.pblk + last.len == pblk
                and last.len < EXT_INIT_MAX_LEN
            ):
                take = min(n, EXT_INIT_MAX_LEN - last.len)
                mappings[-1] = Mapping(last.lblk, last.pblk, last.len + take, False)
                lblk, pblk, n = lblk + take, pblk + take, n - take
                continue
        take = min(n, EXT_INIT_MAX_LEN)
        mappings.append(Mapping(lblk, pblk, take, False))
        lblk, pblk, n = lblk + take, pblk + take, n - take
