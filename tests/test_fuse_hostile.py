"""Damaged images through the real mount: one bad inode costs that inode only.

A backup run over a damaged disk must end (no hang), report the damaged
entries (tar says "Input/output error" and exits non-zero), and leave the
daemon serving: after the walk, the mount still answers and the daemon is
alive.  Images from e2fsprogs' test suite with bad encryption contexts,
directories, symlinks, extent trees and xattrs.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess

import pytest

from tests import harness
from tests.harness_view import daemon_pids, run_cli, view_mount
from tests.test_corpus import CORPUS

IMAGES = [
    "f_bad_encryption.img.gz",
    "f_baddir.img.gz",
    "f_badsymlinks.img.gz",
    "f_extent_too_deep.img.gz",
    "f_extent_leaf_bad_magic.img.gz",
    "f_ea_value_crash.img.gz",
    "f_dir_bad_csum.img.gz",
    "f_ea_inode_self_ref.img.gz",
]


@pytest.mark.parametrize("name", IMAGES)
def test_damaged_image_is_served(name, tmp_path):
    harness.require_fuse()
    image = tmp_path / "image"
    with gzip.open(CORPUS / name, "rb") as src, open(image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    before = harness.run("sha256sum", image)
    with view_mount(image, tmp_path / "view") as vm:
        tar = subprocess.run(
            "set -o pipefail; "
            f"tar --xattrs --xattrs-include='*' -cf - -C {vm.mountpoint} . | cat >/dev/null",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # tar ends, and each problem it meets is an entry answering EIO.
        for line in tar.stderr.splitlines():
            assert "Input/output error" in line or "Exiting with failure status" in line, line
        assert tar.returncode in (0, 2), tar.stderr
        assert os.listdir(vm.mountpoint) is not None
        assert daemon_pids(vm.mountpoint) == [vm.pid]
    assert harness.run("sha256sum", image) == before


def test_damaged_encryption_answers_eio(tmp_path):
    """f_bad_encryption holds inodes whose fscrypt contexts are damaged."""
    harness.require_fuse()
    image = tmp_path / "image"
    with gzip.open(CORPUS / "f_bad_encryption.img.gz", "rb") as src, open(image, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with view_mount(image, tmp_path / "view") as vm:
        errors = 0
        for dirpath, dirnames, filenames in os.walk(vm.mountpoint):
            for name in dirnames + filenames:
                try:
                    os.lstat(os.path.join(dirpath, name))
                except OSError as e:
                    assert e.errno == 5, e  # EIO, nothing else
                    errors += 1
        assert errors > 0
        assert run_cli("inspect", vm.mountpoint).returncode in (0, 1)
