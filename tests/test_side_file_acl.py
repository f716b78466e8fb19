"""The long-name side file grants exactly what its directory's ACL grants."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ciphertextfs.viewformat import SIDE_FILE_NAME
from tests import harness, trees
from tests.harness_view import view_mount

BARRED, NAMED, OTHER = 4321, 4322, 4323


def as_user(uid: int, *argv: str | Path) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run([*prefix, *map(str, argv)], capture_output=True, text=True)


def test_side_file_takes_its_directorys_acl(ext4, tmp_path: Path) -> None:
    with ext4() as (image, _dev, mnt):
        enc = mnt / "enc"
        enc.mkdir()
        with trees.keys_added(mnt) as keys:
            trees.POLICY["v2"].apply(enc, keys)
            (enc / ("L" * 200)).write_bytes(b"x")  # a ciphertext name over 149 bytes
            trees.lock(mnt, keys)
        enc.chmod(0o755)
        harness.run("setfacl", "-m", f"u:{BARRED}:--x,u:{NAMED}:r-x,m::r-x", enc)
    # pytest's temporary directories are private to root: mount where others can reach.
    top = Path(tempfile.mkdtemp(prefix="ctfs-rsafe-acl-", dir="/tmp"))
    top.chmod(0o755)
    try:
        with view_mount(image, top / "v", options=["allow_other"]) as v:
            d = v.mountpoint / "enc"
            side = d / SIDE_FILE_NAME.decode()
            assert side.read_bytes()  # the side file exists and holds the long name
            barred_ls = as_user(BARRED, "ls", d)
            assert barred_ls.returncode != 0 and "Permission denied" in barred_ls.stderr
            barred = as_user(BARRED, "cat", side)
            assert barred.returncode != 0 and "Permission denied" in barred.stderr, barred
            for uid in (NAMED, OTHER):
                listed = as_user(uid, "ls", "-a", d)
                assert listed.returncode == 0 and SIDE_FILE_NAME.decode() in listed.stdout
                read = as_user(uid, "cat", side)
                assert read.returncode == 0 and read.stdout.encode() == side.read_bytes()
    finally:
        shutil.rmtree(top, ignore_errors=True)
