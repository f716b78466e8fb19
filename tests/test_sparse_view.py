"""Sparse and preallocated files: st_blocks as ext4 counts them, so tar -S and rsync -S skip holes.

Oracle: the kernel's stat of the same files on the image (locked, for the
encrypted ones) and the kernel's `tar -S` of the plain copy.  tar and
rsync find holes in a view file by reading zeros (pyfuse3 has no lseek
handler, so SEEK_HOLE sees none); they look for them at all only when
st_blocks is smaller than the size says.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import harness
from tests.harness_view import view_mount
from tests.trees import POLICY, keys_added, lock

SPARSE = 1 << 30
DATA = 2 << 20


def _fill(d: Path) -> None:
    with open(d / "sparse", "wb") as f:
        f.truncate(SPARSE)
        for off in (0, SPARSE // 2, SPARSE - DATA // 2):
            f.seek(off)
            f.write(os.urandom(DATA // 4))  # 1.5 MiB in three pieces, not block aligned
        f.seek(SPARSE // 4 + 123)
        f.write(os.urandom(DATA // 4))
    (d / "prealloc").write_bytes(os.urandom(1 << 20))
    harness.run("fallocate", "--keep-size", "-l", "8MiB", d / "prealloc")  # beyond i_size
    (d / "dense").write_bytes(os.urandom(100_000))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    """Yields (image, {relative path: kernel st_blocks})."""
    harness.require_fuse()
    tmp = tmp_path_factory.mktemp("lookup-sparse")
    img = harness.mkfs(tmp / "fs.img", size_mb=128, features=("encrypt",))
    blocks = {}
    with harness.mounted(img, tmp / "mnt") as (_, mnt):
        with keys_added(mnt) as keys:
            for name in ("plain", "v2"):
                d = mnt / name
                d.mkdir()
                if name != "plain":
                    POLICY[name].apply(d, keys)
                _fill(d)
            lock(mnt, keys)
        for dirpath, _dirs, files in os.walk(mnt):
            for f in files:
                p = Path(dirpath) / f
                blocks[os.fspath(p.relative_to(mnt))] = os.lstat(p).st_blocks
        for name in ("plain", "v2"):
            blocks[name] = os.lstat(mnt / name).st_blocks
    yield img, blocks


def _view_blocks(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for f in [*files, *dirs]:
            p = Path(dirpath) / f
            out[os.fspath(p.relative_to(root))] = os.lstat(p).st_blocks
    return out


def test_st_blocks_equal_the_kernels(image, tmp_path: Path) -> None:
    img, kernel = image
    with view_mount(img, tmp_path / "v") as v:
        got = _view_blocks(v.mountpoint)
    # The view's encrypted names differ; compare per directory by the set of values
    # for the plain tree and by file for the encrypted one through its sizes.
    for rel in ("plain/sparse", "plain/prealloc", "plain/dense", "plain"):
        assert got[rel] == kernel[rel], rel
    enc_kernel = sorted(v for k, v in kernel.items() if k.startswith("v2/"))
    enc_view = sorted(v for k, v in got.items() if k.startswith("v2/"))
    assert enc_view == enc_kernel
    assert got["v2"] == kernel["v2"]
    assert kernel["plain/sparse"] * 512 < 4 * DATA, "the sparse file is sparse"
    assert kernel["plain/prealloc"] * 512 >= 8 << 20, "the preallocation is counted"


def _tar_size(src: Path, out: Path) -> int:
    harness.run("tar", "-S", "--xattrs", "-cf", out, "-C", src, ".")
    return out.stat().st_size


def test_tar_and_rsync_sparse_store_only_the_data(image, tmp_path: Path) -> None:
    img, _kernel = image
    with harness.mounted(img, tmp_path / "k", read_only=True) as (_dev, kmnt):
        kernel_tar = _tar_size(kmnt / "plain", tmp_path / "kernel.tar")
    with view_mount(img, tmp_path / "v") as v:
        plain_tar = _tar_size(v.mountpoint / "plain", tmp_path / "plain.tar")
        enc_tar = _tar_size(v.mountpoint / "v2", tmp_path / "enc.tar")
        dest = tmp_path / "rsync"
        subprocess.run(
            ["rsync", "-aS", "--xattrs", f"{v.mountpoint}/", f"{dest}/"],
            check=True,
            capture_output=True,
        )
    assert kernel_tar < 16 << 20
    assert plain_tar <= kernel_tar + (64 << 10), (plain_tar, kernel_tar)
    # Ciphertext: the same holes, the data blocks rounded to whole blocks.
    assert enc_tar <= kernel_tar + (1 << 20), (enc_tar, kernel_tar)
    for sub in ("plain", "v2"):
        for p in (dest / sub).iterdir():
            st = p.lstat()
            if st.st_size == SPARSE:
                assert st.st_blocks * 512 < 4 * DATA, (sub, p.name, st.st_blocks)
