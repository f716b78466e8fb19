"""The ext4 reader on kernel-encrypted trees, with the kernel as the oracle.

Each image variant (block size, block maps, inline data, stable inodes, 32-bit
descriptors, linear directories) gets trees written through a real fscrypt
mount under several policies.  While the keys are present the kernel tells
us each object's inode number, policy and nonce; once the keys are removed
it lists every encrypted directory by no-key names.  The image is then read
with `Filesystem` only, and what it returns must agree with both: the
directory entries with the locked listing, the raw contexts with the
policies and nonces, and the ciphertext (names, contents, symlink bodies)
must decrypt under the test keys to the plaintext that was written.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ciphertextfs.ext4.errors import CorruptError
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.ext4.inode import EXT4_INDEX_FL, Inode
from ciphertextfs.ext4.superblock import (
    COMPAT_DIR_INDEX,
    COMPAT_STABLE_INODES,
    INCOMPAT_INLINE_DATA,
)
from ciphertextfs.ext4.xattr import EXT4_XATTR_INDEX_ENCRYPTION
from ciphertextfs.fscrypt import kernel
from ciphertextfs.fscrypt.crypto import decrypt_contents
from ciphertextfs.fscrypt.fname import (
    decrypt_filename,
    decrypt_symlink,
    encrypted_name_size,
    parse_symlink_body,
)
from ciphertextfs.fscrypt.nokey import parse_nokey_name
from ciphertextfs.view.model import View
from tests import harness, trees

_INO_POLICIES = {"v2-ino64", "v2-ino32"}


@dataclass(frozen=True)
class Variant:
    features: tuple[str, ...]
    policies: tuple[str, ...] = ("v1", "v2")
    block_size: int = 4096
    # The policy whose tree also holds the big (htree) directory and long files.
    big: str | None = None


VARIANTS = {
    "default": Variant(
        ("encrypt",),
        tuple(p.name for p in trees.POLICIES if p.name not in _INO_POLICIES),
        big="v2",
    ),
    # 1 KiB blocks make the big directory a two-level htree.
    "bs1k": Variant(("encrypt",), block_size=1024, big="v2"),
    # mke2fs refuses ^extents together with 64bit.
    "no_extents": Variant(("encrypt", "^extents", "^64bit")),
    "inline_data": Variant(("encrypt", "inline_data")),
    "stable_inodes": Variant(("encrypt", "stable_inodes"), ("v1", "v2", "v2-ino64", "v2-ino32")),
    "no_64bit": Variant(("encrypt", "^64bit")),
    # Here the big directory is a multi-block linear directory.
    "no_dir_index": Variant(("encrypt", "^dir_index"), big="v2"),
}

CASES = [(v, p) for v, spec in VARIANTS.items() for p in spec.policies]
CASE_IDS = [f"{v}-{p}" for v, p in CASES]


@dataclass
class Obj:
    """One object of a tree as the kernel showed it with the key present."""

    ino: int
    kind: str  # "reg", "dir", "lnk" or "special"
    parent: str | None  # relative path of the parent directory, None for the tree root
    policy: kernel.KernelPolicy | None = None  # regular files and directories only
    nonce: bytes | None = None


@dataclass
class Tree:
    policy: str
    expected: trees.Expected
    objects: dict[str, Obj] = field(default_factory=dict)
    # Directory inode -> {plaintext name: inode}, with the key.
    plain: dict[int, dict[bytes, int]] = field(default_factory=dict)
    # Directory inode -> {no-key name: inode}, after the key was removed.
    locked: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass
class Built:
    image: Path
    block_size: int
    trees: dict[str, Tree]
    keep_size_refusals: list[str]


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "reg"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "lnk"
    return "special"


def _capture_unlocked(root: Path, tree: Tree) -> None:
    """Inode numbers, policies, nonces and plaintext listings, key present."""
    st = os.lstat(root)
    tree.objects[""] = Obj(st.st_ino, "dir", None, kernel.get_policy(root), kernel.get_nonce(root))
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        rel_dir = os.path.relpath(d, root) if d != root else ""
        listing: dict[bytes, int] = {}
        for name in dirnames + filenames:
            p = d / name
            rel = os.path.join(rel_dir, name) if rel_dir else name
            st = os.lstat(p)
            kind = _kind(st.st_mode)
            obj = Obj(st.st_ino, kind, rel_dir)
            if kind in ("reg", "dir"):
                obj.policy = kernel.get_policy(p)
                obj.nonce = kernel.get_nonce(p)
            tree.objects[rel] = obj
            listing[os.fsencode(name)] = st.st_ino
        tree.plain[os.lstat(d).st_ino] = listing


def _capture_locked(root: Path, tree: Tree) -> None:
    """The kernel's no-key listing of every encrypted directory."""
    for dirpath, dirnames, filenames in os.walk(root):
        tree.locked[os.lstat(dirpath).st_ino] = {
            name: os.lstat(Path(dirpath) / name).st_ino for name in dirnames + filenames
        }


@contextlib.contextmanager
def _keep_size_refused(refusals: list[str]) -> Iterator[None]:
    """Turn the kernel's refusal of keep-size fallocate into an assertion.

    Block-mapped (non-extent) files cannot hold blocks beyond i_size, so
    `fallocate -n` fails with EOPNOTSUPP; write_tree() records the file as
    its three written bytes either way.  Everything else runs unchanged.
    """
    real = harness.run

    def run(*argv: str | os.PathLike[str], input: bytes | None = None) -> str:
        if argv[:2] == ("fallocate", "-n"):
            with pytest.raises(subprocess.CalledProcessError) as refused:
                real(*argv, input=input)
            assert b"unsupported" in refused.value.stderr
            refusals.append(os.fspath(argv[-1]))
            return ""
        return real(*argv, input=input)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "run", run)
        yield


def _build(tmp: Path, name: str) -> Built:
    spec = VARIANTS[name]
    bs = spec.block_size
    image = harness.mkfs(
        tmp / "fs.img",
        size_mb=64,
        block_size=bs,
        features=spec.features,
        extra=["-N", "8192"],
    )
    built = Built(image, bs, {}, [])
    with harness.mounted(image, tmp / "mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            for pname in spec.policies:
                root = mnt / pname
                root.mkdir()
                trees.POLICY[pname].apply(root, keys)
                writer = (
                    _keep_size_refused(built.keep_size_refusals)
                    if "^extents" in spec.features
                    else contextlib.nullcontext()
                )
                with writer:
                    exp = trees.write_tree(root, bs, small=pname != spec.big)
                tree = Tree(pname, exp)
                _capture_unlocked(root, tree)
                built.trees[pname] = tree
            # A plaintext directory beside the trees: on inline_data images it
            # is stored inline, proving the feature is live.
            (mnt / "plain").mkdir()
            (mnt / "plain" / "f").write_bytes(b"plain")
            trees.lock(mnt, keys)
            for pname in spec.policies:
                _capture_locked(mnt / pname, built.trees[pname])
    return built


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    """Each variant's image, written and captured once per module."""
    harness.require_kernel()
    cache: dict[str, Built] = {}

    def get(variant: str) -> Built:
        if variant not in cache:
            cache[variant] = _build(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return get


@pytest.fixture
def case(images, request) -> Iterator[tuple[Built, Tree, Filesystem]]:
    variant, policy = request.param
    built = images(variant)
    fs = Filesystem.open(built.image)
    try:
        yield built, built.trees[policy], fs
        assert fs.warnings == []
    finally:
        fs.close()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_listing_matches_locked_kernel(case) -> None:
    """read_dir() of each encrypted directory against the kernel's no-key listing."""
    _built, tree, fs = case
    dirs = {o.ino for o in tree.objects.values() if o.kind == "dir"}
    assert set(tree.locked) == dirs
    for dir_ino, locked in tree.locked.items():
        dinode = fs.inode(dir_ino)
        assert dinode.is_dir and dinode.is_encrypted
        entries = fs.read_dir(dinode)
        assert sorted(e.inode for e in entries) == sorted(locked.values()), dir_ino
        linear = not fs.is_dx_dir(dinode)
        unmatched = list(entries)
        hashes = []
        for kname, ino in locked.items():
            nk = parse_nokey_name(kname)
            found = [e for e in unmatched if e.inode == ino and nk.matches(e.name)]
            assert len(found) == 1, (dir_ino, kname)
            unmatched.remove(found[0])
            if nk.sha256 is None:
                assert found[0].name == nk.prefix
            else:
                assert found[0].name.startswith(nk.prefix) and len(found[0].name) > 149
            assert found[0].hash is None and found[0].minor_hash is None
            hashes.append((nk.hash, nk.minor_hash))
        assert unmatched == []
        # The kernel passes dirhashes exactly when it reads the directory
        # as an htree: our is_dx_dir() must agree with its choice.
        if linear:
            assert set(hashes) <= {(0, 0)}, dir_ino
        elif hashes:
            assert any(h != (0, 0) for h in hashes), dir_ino


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_contexts_match_kernel(case) -> None:
    """The raw context xattr is the kernel's policy plus its nonce, byte for byte."""
    _built, tree, fs = case
    want_policy = trees.POLICY[tree.policy]
    nonces: dict[int, bytes] = {}
    for rel, obj in tree.objects.items():
        inode = fs.inode(obj.ino)
        if obj.kind == "special":
            # fscrypt leaves fifos and device nodes unencrypted.
            assert not inode.is_encrypted, rel
            assert not any(x.name_index == EXT4_XATTR_INDEX_ENCRYPTION for x in fs.xattrs(inode))
            continue
        assert inode.is_encrypted, rel
        raw, ctx = trees.on_disk_context(fs, inode)
        nonces[obj.ino] = ctx.nonce
        if obj.policy is not None:
            assert obj.nonce is not None
            want = trees.kernel_context(obj.policy, obj.nonce)
            assert ctx.version == want.version
            assert ctx.contents_mode == want.contents_mode
            assert ctx.filenames_mode == want.filenames_mode
            assert ctx.flags == want.flags
            assert ctx.log2_data_unit_size == want.log2_data_unit_size
            assert ctx.key_spec == want.key_spec
            assert ctx.nonce == want.nonce
            assert raw == want.to_bytes()
        else:
            # No ioctl opens a symlink: its policy is its directory's, and
            # its nonce is proven by test_symlinks_decrypt.
            parent = tree.objects[obj.parent]
            assert parent.policy is not None
            want = trees.kernel_context(parent.policy, ctx.nonce)
            assert raw == want.to_bytes()
        assert ctx.version == want_policy.version
        assert ctx.flags == want_policy.flags
        assert ctx.log2_data_unit_size == want_policy.log2_data_unit_size
        if ctx.version == 2:
            assert ctx.key_spec == trees.MASTER_KEYS[2].identifier
        else:
            assert ctx.key_spec == trees.TEST_KEY_V1_DESCRIPTOR
    assert len(set(nonces.values())) == len(nonces)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_contents_decrypt(case) -> None:
    """fs.read() returns ciphertext that decrypts to exactly what was written."""
    built, tree, fs = case
    bs = built.block_size
    for rel, data in tree.expected.files.items():
        inode = fs.inode(tree.objects[rel].ino)
        assert inode.is_reg and inode.is_encrypted, rel
        assert inode.i_size == len(data), rel
        ctx, key = trees.file_key(fs, inode, for_filenames=False)
        ct = fs.read(inode, 0, ctx.ciphertext_size(len(data), bs))
        plain = decrypt_contents(key, ct)
        assert plain[: len(data)] == data, rel
        # The kernel zeroes the tail of the last block before encrypting it.
        assert not any(plain[len(data) :]), rel
    prealloc = fs.inode(tree.objects["sparse/prealloc"].ino)
    keep = fs.inode(tree.objects["sparse/keep-size"].ino)
    holey = fs.inode(tree.objects["sparse/holey"].ino)
    mapped = {m.lblk + k for m in fs.mappings(holey) for k in range(m.len)}
    assert 1 not in mapped and 2 not in mapped, "sparse/holey has no hole"
    if prealloc.has_extents:
        assert any(m.unwritten for m in fs.mappings(prealloc))
        assert any(m.unwritten and m.lblk + m.len > 1 for m in fs.mappings(keep))
    else:
        assert built.keep_size_refusals and all(
            p.endswith("sparse/keep-size") for p in built.keep_size_refusals
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_batched_reads_decrypt(case) -> None:
    """read_files() returns what fs.read() does, however the requests are merged."""
    built, tree, fs = case
    bs = built.block_size
    wanted = []
    for rel, data in tree.expected.files.items():
        inode = fs.inode(tree.objects[rel].ino)
        ctx, key = trees.file_key(fs, inode, for_filenames=False)
        wanted.append((inode, ctx.ciphertext_size(len(data), bs), key, data))
    for max_gap, max_span in ((0, bs), (32 << 10, 1 << 20), (1 << 40, 1 << 40)):
        got = fs.read_files([(i, n) for i, n, _, _ in wanted], max_gap=max_gap, max_span=max_span)
        assert set(got) == {i.ino for i, n, _, _ in wanted if n}
        for inode, n, key, data in wanted:
            if n:
                assert got[inode.ino] == fs.read(inode, 0, n)
                assert decrypt_contents(key, got[inode.ino])[: len(data)] == data


@pytest.mark.parametrize("case", CASES[:1], ids=CASE_IDS[:1], indirect=True)
def test_view_reads_a_directory_of_small_files_in_one_batch(case) -> None:
    """Reading a directory's small files in listing order costs one batched read."""
    _built, tree, fs = case
    view = View(fs)
    sizes = tree.objects["sizes"].ino
    inos = [e.ino for e in view.entries(sizes) if view.attr(e.ino).st_size]
    assert len(inos) >= 10
    device_reads = []
    read_data = fs.source.read_data

    def counting(offset: int, length: int, what: str = "data") -> bytes:
        device_reads.append((offset, length))
        return read_data(offset, length, what)

    fs.source.read_data = counting  # type: ignore[method-assign]
    try:
        got = {ino: view.read(ino, 0, view.attr(ino).st_size) for ino in inos}
        batched = len(device_reads)
    finally:
        del fs.source.read_data
    for ino, data in got.items():
        assert data == fs.read(fs.inode(ino), 0, len(data))
    # One request per run of adjacent files: fewer than half a request per file.
    assert 1 <= batched < len(inos) // 2, device_reads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_reads_at_any_offset_agree(case) -> None:
    """Any slice of a file, aligned or not, across holes and extents, is that slice."""
    built, tree, fs = case
    bs = built.block_size
    for rel in ("sparse/holey", "sparse/prealloc", *(r for r in tree.expected.files if "big" in r)):
        if rel not in tree.objects:
            continue
        inode = fs.inode(tree.objects[rel].ino)
        size = -(-inode.i_size // bs) * bs + bs
        whole = fs.read(inode, 0, size)
        for off in sorted({0, 1, 15, bs - 1, bs, bs + 7, 2 * bs, size // 2, max(size - bs - 3, 0)}):
            for n in (1, 16, bs, bs + 1, 3 * bs, size):
                assert fs.read(inode, off, n) == (whole[off : off + n] + bytes(n))[:n], (
                    rel,
                    off,
                    n,
                )


def test_read_ahead_tries_each_file_once(kernel, tmp_path: Path) -> None:
    """Files a batch cannot fetch (inline data here) are read alone, without rescans."""
    image = harness.mkfs(tmp_path / "inline.img", size_mb=8, features=("inline_data",))
    with harness.mounted(image, tmp_path / "mnt") as (_dev, mnt):
        (mnt / "d").mkdir()
        for i in range(40):
            (mnt / "d" / f"f{i}").write_bytes(os.urandom(1 + i * (150 if i % 2 else 1)))
    with Filesystem.open(image) as fs:
        view = View(fs)
        d = view.lookup(2, b"d")
        inos = [e.ino for e in view.entries(d)]
        assert sum(fs.inode(ino).has_inline_data for ino in inos) >= 10
        batches = []
        read_files = fs.read_files

        def counting(wanted, **kw):
            batches.append(len(wanted))
            return read_files(wanted, **kw)

        fs.read_files = counting  # type: ignore[method-assign]
        for ino in inos:
            assert view.read(ino, 0, 1 << 20) == fs.read(fs.inode(ino), 0, view.attr(ino).st_size)
        assert batches == [len(inos)], batches


def test_batched_reads_leave_out_what_lies_beyond_the_source(images, tmp_path: Path) -> None:
    """A file whose blocks are cut off is left to its own read, which fails alone."""
    built = images("default")
    tree = built.trees["v2"]
    with Filesystem.open(built.image) as fs:
        files = [fs.inode(tree.objects[rel].ino) for rel in tree.expected.files]
        files = [i for i in files if fs.mappings(i)]
        last = max(files, key=lambda i: fs.mappings(i)[0].pblk)
        cut = fs.mappings(last)[0].pblk * fs.block_size
    copy = tmp_path / "cut.img"
    with open(built.image, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read(cut))
    with Filesystem.open(copy) as fs:
        inodes = [fs.inode(i.ino) for i in files]
        got = fs.read_files([(i, i.i_size) for i in inodes], max_gap=1 << 20, max_span=1 << 30)
        assert last.ino not in got
        with pytest.raises(CorruptError):
            fs.read(fs.inode(last.ino), 0, last.i_size)
        beyond = {
            i.ino
            for i in inodes
            if any(m.pblk + m.len > cut // fs.block_size for m in fs.mappings(i))
        }
        assert set(got) == {i.ino for i in inodes} - beyond
        for inode in inodes:
            if inode.ino in got:
                assert got[inode.ino] == fs.read(inode, 0, inode.i_size)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_names_decrypt(case) -> None:
    """Every on-disk name decrypts, under its directory's key, to the plaintext name."""
    _built, tree, fs = case
    for dir_ino, plain in tree.plain.items():
        dinode = fs.inode(dir_ino)
        ctx, key = trees.file_key(fs, dinode, for_filenames=True)
        entries = fs.read_dir(dinode)
        got = {}
        for e in entries:
            name = decrypt_filename(key, e.name)
            assert len(e.name) == encrypted_name_size(ctx.filename_padding, len(name))
            got[name] = e.inode
        assert len(got) == len(entries)
        assert got == plain, dir_ino


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS, indirect=True)
def test_symlinks_decrypt(case) -> None:
    """Fast and slow encrypted symlink bodies decrypt to the targets."""
    built, tree, fs = case
    kinds = set()
    for rel, target in tree.expected.symlinks.items():
        inode = fs.inode(tree.objects[rel].ino)
        assert inode.is_symlink and inode.is_encrypted, rel
        body = fs.symlink_body(inode)
        assert len(body) == inode.i_size
        kinds.add(bool(fs.mappings(inode)))
        _ctx, key = trees.file_key(fs, inode, for_filenames=True)
        assert decrypt_symlink(key, parse_symlink_body(body)) == target.encode(), rel
    assert kinds == {False, True}, "need both fast (in-inode) and block symlinks"


def _dx_indirect_levels(fs: Filesystem, inode: Inode) -> int:
    """dx_root_info.indirect_levels: byte 30 of the dx_root block."""
    block0 = fs.read(inode, 0, fs.block_size)
    return block0[0x1E]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_shape(images, variant: str) -> None:
    """Each image really has the shape its variant is named for."""
    built = images(variant)
    with Filesystem.open(built.image) as fs:
        sb = fs.sb
        assert fs.block_size == VARIANTS[variant].block_size
        encrypted = [
            fs.inode(o.ino)
            for t in built.trees.values()
            for o in t.objects.values()
            if o.kind != "special"
        ]
        plain_dir = fs.inode(next(e.inode for e in fs.read_dir(fs.inode(2)) if e.name == b"plain"))
        if VARIANTS[variant].big:
            big = built.trees[VARIANTS[variant].big].objects["big"]
            big_inode = fs.inode(big.ino)
            assert big_inode.i_size > 8 * fs.block_size
            assert len(built.trees["v2"].locked[big.ino]) == 1100
            indexed = bool(big_inode.i_flags & EXT4_INDEX_FL)
            assert indexed == (variant != "no_dir_index")
            if variant == "bs1k":
                assert _dx_indirect_levels(fs, big_inode) == 1
        if variant == "no_extents":
            assert not any(i.has_extents for i in encrypted)
        else:
            assert all(i.has_extents for i in encrypted if i.is_reg)
        if variant == "inline_data":
            assert sb.has_incompat(INCOMPAT_INLINE_DATA)
            assert plain_dir.has_inline_data
            # ext4_set_context() clears EXT4_STATE_MAY_INLINE_DATA: the kernel
            # never stores an encrypted inode inline.
            assert not any(i.has_inline_data for i in encrypted)
        if variant == "stable_inodes":
            assert sb.has_compat(COMPAT_STABLE_INODES)
        assert sb.is_64bit == (variant not in ("no_extents", "no_64bit"))
        assert sb.has_compat(COMPAT_DIR_INDEX) == (variant != "no_dir_index")
        assert fs.warnings == []
