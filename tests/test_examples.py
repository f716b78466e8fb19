"""The README's demo and the scripts in examples/ work as documented.

They are what an admin copies into cron, so they run here exactly as
shipped: real kernel-made encrypted tree, real `ciphertextfs` on PATH,
real tar and rsync, then a restore with the key that must give back the
original tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness
from tests.harness_restore import walk
from tests.trees import (
    POLICY,
    TEST_KEY_V1,
    TEST_KEY_V1_DESCRIPTOR,
    TEST_KEY_V2,
    keys_added,
    lock,
    write_tree,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env() -> dict[str, str]:
    """PATH with the `ciphertextfs` of the interpreter running the tests first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _script(name: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", EXAMPLES / name, *map(os.fspath, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A locked image and a plain copy of what it held; yields (image, original, keys)."""
    harness.require_fuse()
    tmp = tmp_path_factory.mktemp("examples")
    image = harness.mkfs(tmp / "src.img", size_mb=64)
    original = tmp / "original"
    with harness.mounted(image, tmp / "mnt") as (_, mnt):
        with keys_added(mnt) as keys:
            for name in ("v1", "v2"):
                (mnt / name).mkdir()
                POLICY[name].apply(mnt / name, keys)
                write_tree(mnt / name, 4096, small=True)
            (mnt / "plain").mkdir()
            write_tree(mnt / "plain", 4096, small=True)
            harness.run("cp", "-a", mnt, original)
            lock(mnt, keys)
    keyfiles = tmp / "v2.key", tmp / "v1.key"
    keyfiles[0].write_bytes(TEST_KEY_V2)
    keyfiles[1].write_bytes(TEST_KEY_V1)
    key_args = [
        "--key",
        os.fspath(keyfiles[0]),
        "--v1-key",
        f"{TEST_KEY_V1_DESCRIPTOR.hex()}={keyfiles[1]}",
    ]
    return image, original, key_args


def _restore_equals_original(backup: Path, dest: Path, original: Path, key_args) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "decrypt", "-q", *key_args, backup, dest],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    want = {k: v for k, v in walk(original).items() if not k.startswith("lost+found")}
    got = {k: v for k, v in walk(dest).items() if not k.startswith("lost+found")}
    assert got.keys() == want.keys()
    for rel in want:
        assert got[rel] == want[rel], rel


def test_backup_tar_script(source, tmp_path):
    image, original, key_args = source
    archive = tmp_path / "backup.tar"
    proc = _script("backup-tar.sh", image, archive)
    assert proc.returncode == 0, proc.stderr
    assert archive.stat().st_size > 0
    _restore_equals_original(archive, tmp_path / "restored", original, key_args)


def test_backup_rsync_incremental_script(source, tmp_path):
    image, original, key_args = source
    backups = tmp_path / "backups"
    for _ in range(2):
        proc = _script("backup-rsync-incremental.sh", image, backups)
        assert proc.returncode == 0, proc.stderr
    latest = backups / "latest"
    assert latest.is_symlink()
    _restore_equals_original(latest.resolve(), tmp_path / "restored", original, key_args)


def test_inspect_script(source):
    image, _, _ = source
    proc = _script("inspect-getfattr.sh", image, "v2")
    assert proc.returncode == 0, proc.stderr
    assert "user.fscrypt.context=0x02" in proc.stdout
    assert "AES-256-XTS" in proc.stdout


def test_demo():
    harness.require_fuse()
    proc = subprocess.run(
        [sys.executable, "-m", "ciphertextfs", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "The restored tree equals the original" in proc.stdout
