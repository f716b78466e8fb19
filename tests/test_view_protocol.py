"""The view the FUSE adapter sees: `ViewProtocol`, answered by `View` and `MetadataView`.

`MetadataView` once passed every member it did not define on to the inner
view, so a member added to the view later answered the metadata entry's
synthetic inodes from the inner view, which does not know them.  These
tests hold that every member is the wrapper's own, and that each answers
the metadata inodes itself.  No FUSE and no kernel mount: the model is
called directly on an image mke2fs builds from a directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.view.metadata_view import META_INO_BASE, MetadataView, MetaNode
from ciphertextfs.view.model import View, ViewNoAttr, ViewNotFound
from ciphertextfs.view.protocol import ViewProtocol
from ciphertextfs.viewformat import META_DIR_NAME, META_POLICIES, XATTR_META_MARK
from tests import harness

POLICY_DATA = b"policy bytes"


def protocol_members() -> set[str]:
    """Every attribute and method `ViewProtocol` declares."""
    names = set(ViewProtocol.__dict__.get("__annotations__", {}))
    names |= {n for n, v in vars(ViewProtocol).items() if callable(v) and not n.startswith("_")}
    return names


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("protocol")
    tree = tmp / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"contents\n")
    os.symlink("d/f", tree / "link")
    return harness.mkfs(tmp / "fs.img", features=("encrypt",), extra=("-d", str(tree)))


@pytest.fixture
def fs(image: Path):
    with Filesystem.open(image) as fs:
        yield fs


def metadata_view(fs: Filesystem) -> tuple[View, MetadataView]:
    inner = View(fs)
    policies = MetaNode(META_POLICIES, stat.S_IFDIR | 0o700, mtime_ns=5)
    policies.children[b"p1"] = MetaNode(b"p1", stat.S_IFREG | 0o600, 7, 8, 9, POLICY_DATA)
    top = MetaNode(META_DIR_NAME, stat.S_IFDIR | 0o755, xattrs={XATTR_META_MARK: b"1"})
    top.children[META_POLICIES] = policies
    return inner, MetadataView(inner, top)


def test_protocol_members_are_the_adapters() -> None:
    assert protocol_members() == {
        "root_ino",
        "cache_timeout",
        "live",
        "watched",
        "apply_changes",
        "attr",
        "entries",
        "attrs_ahead",
        "damage",
        "lookup",
        "xattr_names",
        "xattr",
        "readlink",
        "read",
        "small_contents",
        "statfs",
    }


def test_both_views_answer_the_protocol(fs: Filesystem) -> None:
    inner, outer = metadata_view(fs)
    assert isinstance(inner, ViewProtocol)
    assert isinstance(outer, ViewProtocol)


def test_metadata_view_defines_every_member_itself() -> None:
    """No fallthrough: a member missing here must be an AttributeError, not the inner view's."""
    assert "__getattr__" not in vars(MetadataView)
    own = {n for klass in MetadataView.__mro__ if klass is not object for n in vars(klass)}
    assert protocol_members() <= own


def test_metadata_inodes_are_answered_by_the_wrapper(fs: Filesystem) -> None:
    inner, outer = metadata_view(fs)
    root = inner.root_ino
    top = outer.lookup(root, META_DIR_NAME)
    assert top >= META_INO_BASE
    assert outer.entries(root)[0].name == META_DIR_NAME
    assert outer.entries(root)[0].ifmt == stat.S_IFDIR
    outer.attrs_ahead(root, outer.entries(root))  # a hint: not failed by the metadata entry
    assert [e.name for e in outer.entries(root)[1:]] == [e.name for e in inner.entries(root)]
    pol_dir = outer.lookup(top, META_POLICIES)
    f = outer.lookup(pol_dir, b"p1")
    with pytest.raises(ViewNotFound):
        outer.lookup(top, b"nothing")
    a = outer.attr(f)
    assert (a.st_ino, a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns, a.st_size) == (
        f,
        stat.S_IFREG | 0o600,
        7,
        8,
        9,
        len(POLICY_DATA),
    )
    assert stat.S_ISDIR(outer.attr(top).st_mode)
    assert outer.damage(top) == ()
    assert outer.xattr_names(top) == [XATTR_META_MARK]
    assert outer.xattr(top, XATTR_META_MARK) == b"1"
    with pytest.raises(ViewNoAttr):
        outer.xattr(f, XATTR_META_MARK)
    with pytest.raises(ViewNotFound):
        outer.readlink(f)
    assert outer.read(f, 2, 4) == POLICY_DATA[2:6]
    assert outer.small_contents(f) == POLICY_DATA
    assert outer.small_contents(top) is None


def test_other_inodes_and_figures_are_the_inner_views(fs: Filesystem) -> None:
    inner, outer = metadata_view(fs)
    assert (outer.root_ino, outer.cache_timeout, outer.live) == (
        inner.root_ino,
        inner.cache_timeout,
        inner.live,
    )
    assert outer.statfs() == inner.statfs()
    d = outer.lookup(outer.root_ino, b"d")
    f = outer.lookup(d, b"f")
    link = outer.lookup(outer.root_ino, b"link")
    assert outer.attr(f) == inner.attr(f)
    assert outer.read(f, 0, 100) == b"contents\n"
    assert outer.small_contents(f) == inner.small_contents(f)
    assert outer.readlink(link) == b"d/f"
    assert outer.damage(d) == ()
    assert outer.xattr_names(f) == inner.xattr_names(f)


def test_statfs_figures_are_the_superblocks(image: Path, fs: Filesystem) -> None:
    """Checked against dumpe2fs, which reads the same superblock with its own code."""
    s = View(fs).statfs()
    h = harness.dumpe2fs_header(image)
    assert s.block_size == int(h["Block size"]) == 4096
    assert s.blocks == int(h["Block count"])
    assert s.free_blocks == int(h["Free blocks"])
    assert s.files == int(h["Inode count"])
    assert s.free_files == int(h["Free inodes"])
    assert s.available_blocks < s.free_blocks
    assert s.name_max == 255
