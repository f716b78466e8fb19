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
from ciphertextfs.ext4.dirhash import dx_hash_version, ext4fs_dirhash
from ciphertextfs.ext4.extents import (
    EXT_INIT_MAX_LEN,
    Mapping,
    encode_header,
    encode_index,
    encode_leaf,
    extent_block_tail,
    extents_per_block,
)
from ciphertextfs.ext4.inode import (
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
    INCOMPAT_ENCRYPT,
    INCOMPAT_EXTENTS,
    INCOMPAT_FILETYPE,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    parse_superblock,
)
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_INDEX_ENCRYPTION,
    XATTR_HEADER_SIZE,
    Xattr,
    area_size,
    encode_block,
    encode_ibody,
)
from ciphertextfs.mounts import loop_devices_of, read_mountinfo
from ciphertextfs.restore import DEFAULT_BLOCK_SIZE
from ciphertextfs.restore.backup import Backup, Entry, Kind
from ciphertextfs.restore.plan import RestoreProblem
from ciphertextfs.restore.report import Report

from .libext2fs import Ext2Error, Ext2Fs
from .plan import FIRST_INO, Node, Plan

INODE_SIZE = 256
READ_CHUNK = 1 << 20
EXT4_LINK_MAX = 65000
MAX_I_BLOCKS = 1 << 48

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
    return max(size // 16384, wanted, len(plan.nodes) + FIRST_INO + 1024)


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


def mkfs_command(plan: Plan, target: str, size: int, opts: MkfsOptions, device: bool) -> list[str]:
    bs = block_size_of(plan)
    features = ["encrypt"]
    if plan.fs_uuid is not None:
        features.append("stable_inodes")
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


def make_filesystem(plan: Plan, target: str, opts: MkfsOptions) -> None:
    size = opts.size if opts.size is not None else image_size(plan)
    device = prepare_target(target, size, opts)
    cmd = mkfs_command(plan, target, size, opts, device)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"mke2fs failed: {res.stderr.strip() or res.stdout.strip()}")


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
                entries = [(0, b".", 0), (0, b"..", 0)] + [(0, n, 0) for n, _ in node.children]
                leaves = len(pack_leaf_blocks(entries, bs, csum))
                if leaves > 1:
                    leaves += 1 + _ceil(leaves, dx_limit(bs, DX_NODE_COUNT_OFFSET, csum))
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

    def _extent_tree(self, node: Node, mappings: list[Mapping]) -> tuple[bytes, int]:
        """i_block and the number of tree blocks for a list of mappings."""
        if len(mappings) <= 4:
            body = encode_header(len(mappings), 4, 0) + encode_leaf(mappings)
            return body.ljust(I_BLOCK_SIZE, b"\0"), 0
        per = extents_per_block(self.bs)
        leaves = [mappings[i : i + per] for i in range(0, len(mappings), per)]
        if len(leaves) > 4:
            raise RestoreProblem(
                f"{len(mappings)} extents: files this fragmented are not written yet"
            )
        seed = self._inode_seed(node)
        index = []
        for leaf in leaves:
            blk = self._alloc_one()
            body = encode_header(len(leaf), per, 0) + encode_leaf(leaf)
            body = body.ljust(12 + 12 * per, b"\0")
            if seed is not None:
                body += extent_block_tail(body, seed)
            self._pwrite(blk, body.ljust(self.bs, b"\0"))
            index.append(encode_index(leaf[0].lblk, blk))
        i_block = encode_header(len(leaves), 4, 1) + b"".join(index)
        return i_block.ljust(I_BLOCK_SIZE, b"\0"), len(leaves)

    def _inode_seed(self, node: Node) -> int | None:
        if self.seed is None:
            return None
        return inode_csum_seed(self.seed, node.ino, 0)

    # -- xattrs --------------------------------------------------------

    def _split_xattrs(self, node: Node) -> tuple[list[Xattr], list[Xattr]]:
        space = ibody_xattr_space(self.inode_size)
        xs = node.xattrs
        if not xs:
            return [], []
        if 8 + area_size(xs) <= space:
            return xs, []
        ctx = [x for x in xs if x.name_index == EXT4_XATTR_INDEX_ENCRYPTION]
        rest = [x for x in xs if x.name_index != EXT4_XATTR_INDEX_ENCRYPTION]
        if not ctx or 8 + area_size(ctx) > space:
            ctx, rest = [], xs
        if XATTR_HEADER_SIZE + area_size(rest) + 4 > self.bs:
            raise RestoreProblem("xattrs too large for one block (ea_inode is not supported)")
        return ctx, rest

    # -- one inode -----------------------------------------------------

    def _encode(self, node: Node) -> int:
        bs = self.bs
        flags = EXT4_ENCRYPT_FL if node.encrypted else 0
        i_block = bytes(I_BLOCK_SIZE)
        blocks = 0
        size = 0
        nbytes = 0
        links = node.links
        ibody, block_xattrs = self._split_xattrs(node)
        if node.kind is Kind.REG:
            mappings, blocks = self._write_data(node)
            tree_blocks = 0
            i_block, tree_blocks = self._extent_tree(node, mappings)
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
                i_block, _ = self._extent_tree(node, [Mapping(0, blk, 1, False)])
                blocks = 1
                flags |= EXT4_EXTENTS_FL
        elif node.kind in (Kind.CHR, Kind.BLK):
            i_block = encode_rdev(*node.rdev)
        file_acl = 0
        if block_xattrs:
            file_acl = self._alloc_one()
            self._pwrite(file_acl, encode_block(block_xattrs, bs, file_acl, self.seed))
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
            ibody_xattrs=encode_ibody(ibody, ibody_xattr_space(self.inode_size)),
        )
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
        seed = self._inode_seed(node)
        if len(packed) > 1 and self.sb.has_compat(COMPAT_DIR_INDEX):
            blocks = self._htree(node, entries[2:], seed)
        else:
            blocks = [encode_leaf_block(b, self.bs, seed) for b in packed]
        mappings: list[Mapping] = []
        lblk = 0
        for blk, cnt in self._alloc(len(blocks)):
            for k in range(cnt):
                self._pwrite(blk + k, blocks[lblk + k])
            _add_mapping(mappings, lblk, blk, cnt)
            lblk += cnt
        i_block, tree = self._extent_tree(node, mappings)
        return i_block, len(blocks) + tree

    def _htree(
        self, node: Node, entries: list[tuple[int, bytes, int]], seed: int | None
    ) -> list[bytes]:
        """The blocks of an indexed directory: root, interior nodes, leaves in hash order.

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
        if len(leaves) <= root_limit:
            first_leaf = 1
            root = [(index[i], first_leaf + i) for i in range(len(leaves))]
            interior: list[bytes] = []
            levels = 0
        else:
            groups = _ceil(len(leaves), node_limit)
            if groups > root_limit:
                raise RestoreProblem(
                    f"directory of {len(entries)} entries needs a third htree level (largedir)"
                )
            first_leaf = 1 + groups
            root, interior = [], []
            for g in range(groups):
                lo = g * node_limit
                part = range(lo, min(lo + node_limit, len(leaves)))
                interior.append(
                    encode_dx_node([(index[i], first_leaf + i) for i in part], bs, seed)
                )
                root.append((index[lo], 1 + g))
            levels = 1
        blocks = [
            encode_dx_root(node.ino, node.parent.ino, raw_version, levels, root, bs, seed),
            *interior,
        ]
        blocks += [encode_leaf_block(b, bs, seed) for b in leaves]
        node.indexed = True
        return blocks


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
