"""An inode's extended attributes, wherever ext4 keeps them (libext2fs's ext_attr).

In the inode body after i_extra_isize, then in the EA block, values larger
than a block in EA inodes.  The layouts are parsed in ext4/xattr.py; this
module finds the pieces and bounds what one inode may make us read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import xattr as _xattr
from .errors import CorruptError
from .inode import EXT4_EA_INODE_FL, Inode
from .xattr import Xattr

if TYPE_CHECKING:
    from .fs import Filesystem

__all__ = ["find_xattr", "read_xattrs", "MAX_XATTR_VALUES"]

MAX_XATTR_VALUES = 16 << 20


def read_xattrs(fs: Filesystem, inode: Inode) -> list[Xattr]:
    """In-inode xattrs, then those of the EA block, EA inode values resolved."""
    what = f"inode {inode.ino}"
    ea_inode = fs.ea_inode_feature
    entries = _xattr.ibody_entries(inode.raw, inode.i_extra_isize, what, ea_inode)
    if inode.i_file_acl:
        blk = inode.i_file_acl
        if not fs.limits.valid(blk):
            raise CorruptError(f"{what}: xattr block {blk} outside the filesystem")
        block = fs.read_block(blk)
        if fs.csum_seed is not None and not _xattr.block_checksum_ok(block, blk, fs.csum_seed):
            fs.warn(f"{what}: xattr block {blk} checksum mismatch")
        entries += _xattr.block_entries(block, f"{what} xattr block {blk}", ea_inode)
    out: list[Xattr] = []
    total = 0
    for e in entries:
        total += e.value_size
        if total > MAX_XATTR_VALUES:
            raise CorruptError(f"{what}: xattr values too large")
        value = e.value if not e.value_inum else _ea_inode_value(fs, inode, e)
        out.append(Xattr(e.name_index, e.name, value))
    return out


def _ea_inode_value(fs: Filesystem, owner: Inode, e: _xattr.RawEntry) -> bytes:
    what = f"inode {owner.ino}: xattr value inode {e.value_inum}"
    if e.value_inum == owner.ino:
        raise CorruptError(f"{what} is the inode itself")
    ea = fs.inode(e.value_inum)
    if not ea.i_flags & EXT4_EA_INODE_FL or not ea.is_reg:
        raise CorruptError(f"{what} is not an EA inode")
    if ea.i_size != e.value_size:
        raise CorruptError(f"{what} has size {ea.i_size}, expected {e.value_size}")
    return fs.files.read(ea, 0, e.value_size)


def find_xattr(fs: Filesystem, inode: Inode, name_index: int, name: bytes) -> bytes | None:
    """One xattr's value, or None: the inode body first, the EA block only when needed.

    What ext4 writes with the inode (the fscrypt context above all) is found
    without reading the EA block; anything else costs what `read_xattrs`
    costs, and fails as it fails.
    """
    what = f"inode {inode.ino}"
    ea_inode = fs.ea_inode_feature
    for e in _xattr.ibody_entries(inode.raw, inode.i_extra_isize, what, ea_inode):
        if e.name_index == name_index and e.name == name:
            if not e.value_inum:
                return e.value
            break
    else:
        if not inode.i_file_acl:
            return None
    for x in read_xattrs(fs, inode):
        if x.name_index == name_index and x.name == name:
            return x.value
    return None
