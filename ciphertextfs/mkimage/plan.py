"""The backup as a tree of inodes to write, checked entry by entry.

Nothing is written here: every entry becomes a `Node` (one per inode, hard
links share one) in its directory's list of on-disk names, or a reported
problem.  The tree tells the writer how large a filesystem to make, which
block size, UUID and inode numbers the policies need, before mke2fs runs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from ciphertextfs.ext4.acl import posix_acl_to_ext4
from ciphertextfs.ext4.dirent import EXT4_NAME_LEN
from ciphertextfs.ext4.errors import CorruptError
from ciphertextfs.ext4.inode import EXT4_GOOD_OLD_FIRST_INO, EXT4_ROOT_INO
from ciphertextfs.ext4.xattr import (
    EXT4_XATTR_ACL_NAMES,
    EXT4_XATTR_NAME_MAX,
    EXT4_XATTR_PREFIXES,
    Xattr,
    encryption_context_xattr,
)
from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.policy import FscryptContext
from ciphertextfs.restore.backup import Backup, Entry, Kind, Path_, TreeProblem, show_path
from ciphertextfs.restore.plan import RestoreProblem, ciphertext_name
from ciphertextfs.restore.report import Report
from ciphertextfs.viewformat import (
    SIDE_FILE_HEADER,
    SIDE_FILE_NAME,
    XATTR_FSCRYPT_CONTEXT,
    XATTR_FSCRYPT_DIRHASH,
    FormatError,
    SideFile,
    decode_dirhash,
    decode_side_file,
    decode_symlink,
    decode_xattrs,
    is_encrypted_symlink_target,
    original_xattrs,
)

LOST_AND_FOUND_INO = EXT4_GOOD_OLD_FIRST_INO
FIRST_INO = LOST_AND_FOUND_INO + 1
LOST_AND_FOUND = b"lost+found"

MAX_FILE_SIZE = 1 << 44
"""16 TiB: ext4's limit for 4 KiB blocks; larger sizes are refused as absurd."""

MAX_CIPHERTEXT_SLACK = 65536
"""A view file is the real size rounded up to at most one data unit."""

_ACL_INDEX = {name: index for index, name in EXT4_XATTR_ACL_NAMES.items()}


@dataclass(eq=False)
class Node:
    """One inode of the new filesystem."""

    path: Path_
    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    xattrs: list[Xattr] = field(default_factory=list)
    context: FscryptContext | None = None
    want_ino: int | None = None
    ino: int = 0
    size: int = 0
    data_len: int = 0
    open: Callable[[], BinaryIO] | None = None
    body: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    children: list[tuple[bytes, Node]] = field(default_factory=list)
    names: set[bytes] = field(default_factory=set)
    parent: Node | None = None
    links: int = 0
    side: SideFile | None = None
    side_loaded: bool = False
    indexed: bool = False
    block_size: int | None = None
    """The original filesystem's block size, as the entry or its directory records it."""

    @property
    def encrypted(self) -> bool:
        return self.context is not None


@dataclass
class Plan:
    root: Node
    nodes: list[Node]
    block_size: int | None
    fs_uuid: bytes | None
    data_bytes: int = 0
    name_bytes: int = 0
    dirhash: tuple[int, bytes] | None = None
    """(hash version, s_hash_seed) of the original filesystem, from its directories."""
    warnings: int = 0
    """Entries written, but with something of the backup reported and ignored."""


def backup_name(x: Xattr) -> str:
    """The name an on-disk xattr had in the backup, for messages."""
    if x.name_index in EXT4_XATTR_ACL_NAMES:
        return EXT4_XATTR_ACL_NAMES[x.name_index].decode()
    if x.name_index in EXT4_XATTR_PREFIXES:
        return (EXT4_XATTR_PREFIXES[x.name_index] + x.name).decode(errors="replace")
    return f"(index {x.name_index}) {x.name.decode(errors='replace')}"


def disk_xattrs(xattrs: dict[bytes, bytes]) -> list[Xattr]:
    """The original xattrs (user.fscrypt.* stripped) under their ext4 name indexes."""
    out = []
    for name, value in sorted(original_xattrs(xattrs).items()):
        if name in _ACL_INDEX:
            try:
                out.append(Xattr(_ACL_INDEX[name], b"", posix_acl_to_ext4(value)))
            except CorruptError as e:
                raise RestoreProblem(f"xattr {name.decode(errors='replace')}: {e}") from None
            continue
        for index, prefix in EXT4_XATTR_PREFIXES.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                suffix = name[len(prefix) :]
                if len(suffix) > EXT4_XATTR_NAME_MAX:
                    raise RestoreProblem(f"xattr name longer than {EXT4_XATTR_NAME_MAX} bytes")
                out.append(Xattr(index, suffix, value))
                break
        else:
            raise RestoreProblem(f"xattr {name.decode(errors='replace')} has no ext4 name index")
    return out


class Planner:
    """Reads the whole backup once (metadata and side files, not contents)."""

    def __init__(self, backup: Backup, report: Report) -> None:
        self.backup = backup
        self.report = report
        self.dirs: dict[Path_, Node] = {}
        self.links: dict[object, Node] = {}
        self.nodes: list[Node] = []
        self.wanted: dict[int, Node] = {}
        self.block_size: int | None = None
        self.fs_uuid: bytes | None = None
        self.data_bytes = 0
        self.name_bytes = 0
        self.failed_dirs: dict[Path_, int] = {}
        self.dir_problems: list[list] = []
        self.dirhash: tuple[int, bytes] | None = None
        self.dirhash_from: Path_ = ()
        self.dirhash_conflict = False
        self.encrypted = False
        self.warnings = 0

    def run(self) -> Plan:
        root: Node | None = None
        for item in self.backup.entries():
            if item.path and item.path[:-1] in self.failed_dirs:
                self._below_failed(item)
                continue
            if isinstance(item, TreeProblem):
                self.report.problem(item.path, item.reason)
                continue
            try:
                node = self._entry(item)
            except (RestoreProblem, FormatError, FscryptError, OSError) as err:
                reason = str(err)
                if isinstance(err, OSError) and err.strerror:
                    reason = err.strerror
                if item.kind is Kind.DIR:
                    self.failed_dirs[item.path] = len(self.dir_problems)
                    self.dir_problems.append([item.path, reason, 0])
                else:
                    self.report.problem(item.path, reason)
                continue
            if not item.path and node is not None:
                root = node
        for path, reason, below in self.dir_problems:
            self.report.problem(path, reason, below)
        if root is None:
            root = Node((), Kind.DIR, 0o755, 0, 0, 0, 0)
            self.nodes.insert(0, root)
        root.ino = EXT4_ROOT_INO
        root.parent = root
        lf = next((n for name, n in root.children if name == LOST_AND_FOUND), None)
        if lf is not None and (lf.kind is not Kind.DIR or lf.encrypted):
            self.report.problem(
                lf.path, "ext4 keeps /lost+found for a plain directory; an empty one is made"
            )
            root.children = [(n, c) for n, c in root.children if c is not lf]
            self.nodes.remove(lf)
            lf = None
        if lf is None:
            lf = Node((LOST_AND_FOUND,), Kind.DIR, 0o700, 0, 0, root.mtime_ns, root.atime_ns)
            lf.parent = root
            lf.links = 1
            root.children.append((LOST_AND_FOUND, lf))
            self.nodes.append(lf)
        lf.ino = LOST_AND_FOUND_INO
        if self.encrypted and self.dirhash is None:
            self.report.note(
                "the backup does not record the directory hash seed (it predates "
                "user.fscrypt.dirhash): locked directories will list other no-key names "
                "than the old disk, unless -E hash_seed=UUID (dumpe2fs -h of the old disk) "
                "is given"
            )
        return Plan(
            root,
            self.nodes,
            self.block_size,
            self.fs_uuid,
            self.data_bytes,
            self.name_bytes,
            self.dirhash,
            self.warnings,
        )

    def _below_failed(self, item: Entry | TreeProblem) -> None:
        """An entry below a directory that was not restored: counted with it."""
        index = self.failed_dirs[item.path[:-1]]
        self.dir_problems[index][2] += 1
        if isinstance(item, Entry) and item.kind is Kind.DIR:
            self.failed_dirs[item.path] = index

    def _side(self, d: Node) -> SideFile | None:
        if not d.side_loaded:
            d.side_loaded = True
            data = self.backup.side_file(d.path)
            d.side = decode_side_file(data) if data is not None else None
        return d.side

    def _note_dirhash(self, e: Entry) -> None:
        """The first directory's hash seed and version make the filesystem's.

        A bad value is reported with its directory, which is still written:
        it only costs the hashes inside that directory's no-key names.
        """
        value = e.xattrs.get(XATTR_FSCRYPT_DIRHASH)
        if value is None:
            return
        try:
            dirhash = decode_dirhash(value)
        except FormatError as err:
            self.warnings += 1
            self.report.note(f"{show_path(e.path)}: {err}: ignored")
            return
        if self.dirhash is None:
            self.dirhash, self.dirhash_from = dirhash, e.path
        elif dirhash != self.dirhash and not self.dirhash_conflict:
            self.dirhash_conflict = True
            self.report.note(
                f"{show_path(e.path)}: another directory hash seed than "
                f"{show_path(self.dirhash_from)} (a backup of two filesystems?): the "
                "first is used, and locked names below this one will differ"
            )

    def _note_block_size(self, attrs_bs: int | None) -> None:
        if attrs_bs is not None and self.block_size is None:
            self.block_size = attrs_bs

    def _entry(self, e: Entry) -> Node | None:
        parent = self.dirs.get(e.path[:-1]) if e.path else None
        if e.path and parent is None:
            raise RestoreProblem("its parent directory was not restored")
        if parent is not None and e.name == SIDE_FILE_NAME and e.kind is Kind.REG:
            if parent.encrypted or self._is_side_file(e):
                return None
        if e.kind is Kind.SOCK:
            raise RestoreProblem("sockets are not restored")
        if e.path:
            assert parent is not None
            dname = self._disk_name(e, parent)
            if e.link_key is not None and e.link_key in self.links:
                node = self.links[e.link_key]
                if node.kind is not e.kind:
                    raise RestoreProblem("hard link to an entry of another type")
                self._link(parent, dname, node)
                return node
        attrs = decode_xattrs(e.xattrs, regular=e.kind is Kind.REG)
        self._note_block_size(attrs.block_size)
        if e.kind is Kind.DIR:
            self._note_dirhash(e)
        node = Node(
            e.path,
            e.kind,
            e.mode & 0o7777,
            e.uid,
            e.gid,
            e.mtime_ns,
            e.atime_ns if e.atime_ns is not None else e.mtime_ns,
        )
        node.block_size = attrs.block_size or (parent.block_size if parent else None)
        in_encrypted = parent is not None and parent.encrypted
        ino = attrs.ino
        uuid = attrs.fs_uuid
        if e.kind is Kind.SYMLINK:
            target = e.target or b""
            if in_encrypted or is_encrypted_symlink_target(target):
                if not is_encrypted_symlink_target(target):
                    raise RestoreProblem("plain symlink inside an encrypted directory")
                assert parent is not None
                link = decode_symlink(target, self._side(parent))
                node.context = link.context
                node.xattrs.append(encryption_context_xattr(link.context_raw))
                node.body = struct.pack("<H", len(link.ciphertext)) + link.ciphertext
                ino, uuid = link.ino, link.fs_uuid
            else:
                if not target:
                    raise RestoreProblem("empty symlink target")
                node.body = target
            node.size = len(node.body)
        else:
            node.xattrs = disk_xattrs(e.xattrs)
            if attrs.context is not None:
                if e.kind not in (Kind.REG, Kind.DIR):
                    raise RestoreProblem(f"a {e.kind.value} cannot be encrypted")
                node.context = attrs.context
                raw = e.xattrs[XATTR_FSCRYPT_CONTEXT]
                node.xattrs.insert(0, encryption_context_xattr(raw))
            elif in_encrypted and e.kind in (Kind.REG, Kind.DIR):
                raise RestoreProblem(
                    "no user.fscrypt.context inside an encrypted directory: its xattrs "
                    "were lost (copied without rsync -X or tar --xattrs?)"
                )
        if node.context is not None:
            self.encrypted = True
        if node.context is not None and node.context.needs_inode_number:
            self._want(node, ino, uuid)
        if e.kind is Kind.REG:
            node.data_len = e.size
            node.open = e.open
            node.size = attrs.size if attrs.size is not None else e.size
            if node.size > MAX_FILE_SIZE:
                raise RestoreProblem(f"absurd size {node.size}")
            if node.encrypted and not (
                node.size <= node.data_len <= node.size + MAX_CIPHERTEXT_SLACK
            ):
                raise RestoreProblem(
                    f"{node.data_len} bytes of ciphertext for user.fscrypt.size "
                    f"{node.size} (truncated or tampered)"
                )
            self._check_data_unit(node)
            self.data_bytes += node.data_len
        elif e.kind in (Kind.CHR, Kind.BLK):
            node.rdev = e.rdev
        if e.kind is Kind.DIR:
            self.dirs[e.path] = node
        if e.link_key is not None:
            self.links[e.link_key] = node
        self.nodes.append(node)
        if e.path:
            assert parent is not None
            self._link(parent, dname, node)
        if node.want_ino is not None:
            self.wanted[node.want_ino] = node
        return node

    def _check_data_unit(self, node: Node) -> None:
        """Without a custom data unit size, the data unit is the block: it must not change."""
        ctx = node.context
        if ctx is None or ctx.log2_data_unit_size or node.block_size is None:
            return
        if self.block_size is not None and node.block_size != self.block_size:
            raise RestoreProblem(
                f"encrypted in {node.block_size}-byte data units (the block size of its "
                f"filesystem), but this image has {self.block_size}-byte blocks"
            )

    def _want(self, node: Node, ino: int | None, uuid: bytes | None) -> None:
        if ino is None or uuid is None:
            raise RestoreProblem("IV_INO_LBLK policy without its inode number and UUID")
        if self.fs_uuid is None:
            self.fs_uuid = uuid
        elif uuid != self.fs_uuid:
            raise RestoreProblem(
                f"IV_INO_LBLK policy bound to filesystem {uuid.hex()}, but this image is "
                f"made for {self.fs_uuid.hex()}"
            )
        if ino < FIRST_INO or ino > 0xFFFFFFFF:
            raise RestoreProblem(f"inode number {ino} cannot be kept in ext4")
        other = self.wanted.get(ino)
        if other is not None:
            raise RestoreProblem(f"inode number {ino} clashes with another entry")
        node.want_ino = ino

    def _is_side_file(self, e: Entry) -> bool:
        """A side file in an unencrypted directory (format 2 header) is not restored."""
        assert e.open is not None
        with e.open() as f:
            return f.read(len(SIDE_FILE_HEADER)) == SIDE_FILE_HEADER

    def _disk_name(self, e: Entry, parent: Node) -> bytes:
        if parent.encrypted:
            name = ciphertext_name(e.name, self._side(parent))
        else:
            name = e.name
        if not 0 < len(name) <= EXT4_NAME_LEN or b"/" in name and not parent.encrypted:
            raise RestoreProblem(f"name of {len(name)} bytes cannot be stored in ext4")
        if name in (b".", b".."):
            raise RestoreProblem("name is . or ..")
        if name in parent.names:
            raise RestoreProblem("two entries of the backup have the same on-disk name")
        return name

    def _link(self, parent: Node, dname: bytes, node: Node) -> None:
        parent.names.add(dname)
        parent.children.append((dname, node))
        self.name_bytes += len(dname) + 16
        node.links += 1
        if node.kind is Kind.DIR:
            node.parent = parent
