"""The README's demo and the scripts in examples/ work as documented.

They are what an admin copies into cron, so they run here exactly as
shipped: real kernel-made encrypted tree, real `ciphertextfs` on PATH,
real tar and rsync, then a restore with the key that must give back the
original tree.
"""

from __future__ import annotations

import os
import re
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
    stamp_mtimes,
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
            stamp_mtimes(mnt)
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


# -- the systemd units and the script they run ---------------------------------

BACKUP_SCRIPT = "/usr/local/sbin/ciphertextfs-backup"


def _run_backup(env_vars: dict[str, str], *args: str | os.PathLike[str]):
    env = _env()
    env.update(env_vars)
    return subprocess.run(
        [BACKUP_SCRIPT, *map(os.fspath, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _nothing_left(name: str) -> None:
    """No view, no mount point and no serving process left by the run named `name`."""
    mounts = Path("/proc/self/mounts").read_text()
    assert f"/run/ciphertextfs-backup/{name}." not in mounts
    run_dir = Path("/run/ciphertextfs-backup")
    if run_dir.exists():
        assert [p for p in run_dir.iterdir() if p.name.startswith(f"{name}.")] == []


@pytest.fixture
def backup_name(request) -> str:
    """A name of this test's own for the script's mount point; swept up however it ends."""
    name = f"ctfs-admin-{os.getpid()}-{request.node.name[-20:]}".replace("[", "-").replace("]", "")
    yield name
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mnt = line.split()[1]
        if f"/run/ciphertextfs-backup/{name}." in mnt:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    run_dir = Path("/run/ciphertextfs-backup")
    if run_dir.exists():
        for p in run_dir.iterdir():
            if p.name.startswith(f"{name}."):
                p.rmdir()


def test_backup_script_is_installed_for_the_units() -> None:
    assert os.path.realpath(BACKUP_SCRIPT) == os.fspath(EXAMPLES / "ciphertextfs-backup"), (
        f"{BACKUP_SCRIPT} is not this checkout's script: run 'bash .ci/install'"
    )


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify: keys, the unit name of the mount, ExecStart executable."""
    test_backup_script_is_installed_for_the_units()
    units = tmp_path / "units"
    units.mkdir()
    for template, instance in (
        ("ciphertextfs-backup@.service", "ciphertextfs-backup@home.service"),
        ("ciphertextfs-backup@.timer", "ciphertextfs-backup@home.timer"),
        ("srv-ciphertextfs-home.mount", "srv-ciphertextfs-home.mount"),
    ):
        (units / instance).write_text((EXAMPLES / template).read_text())
    mount = (units / "srv-ciphertextfs-home.mount").read_text()
    where = next(ln.split("=", 1)[1] for ln in mount.splitlines() if ln.startswith("Where="))
    escaped = harness.run("systemd-escape", "-p", "--suffix=mount", where).strip()
    assert escaped == "srv-ciphertextfs-home.mount"
    assert "Type=fuse.ciphertextfs" in mount
    proc = subprocess.run(
        ["systemd-analyze", "verify", *sorted(units.iterdir())],
        capture_output=True,
        text=True,
        cwd=units,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    service = (units / "ciphertextfs-backup@home.service").read_text()
    assert f"ExecStart={BACKUP_SCRIPT} /etc/ciphertextfs/backup/%i.conf" in service


def test_backup_service_script_rsync_from_a_device(source, tmp_path, backup_name):
    """The device-as-given path (this kernel has no device mapper for LVM snapshots)."""
    image, original, key_args = source
    dest = tmp_path / "dest"
    dest.mkdir()
    with harness.loop_device(image, read_only=True) as dev:
        for _ in range(2):
            proc = _run_backup(
                {"SOURCE": dev, "DEST": os.fspath(dest), "METHOD": "rsync", "NAME": backup_name}
            )
            assert proc.returncode == 0, proc.stderr
            assert "done" in proc.stderr
            _nothing_left(backup_name)
    _restore_equals_original(dest, tmp_path / "restored", original, key_args)


def test_backup_service_script_tar_with_a_config_file(source, tmp_path, backup_name):
    image, original, key_args = source
    dest = tmp_path / "dest"
    dest.mkdir()
    config = tmp_path / "home.conf"
    config.write_text(f"SOURCE={image}\nMETHOD=tar\nDEST={dest}\nNAME={backup_name}\n")
    proc = _run_backup({}, config)
    assert proc.returncode == 0, proc.stderr
    _nothing_left(backup_name)
    archives = list(dest.iterdir())
    assert len(archives) == 1 and archives[0].name.endswith(".tar"), archives
    _restore_equals_original(archives[0], tmp_path / "restored", original, key_args)


def test_backup_service_script_fails_and_cleans_up(source, tmp_path, backup_name):
    """A destination that fills up fails the run (exit 1), and the view is gone."""
    image, _, _ = source
    dest = tmp_path / "small"
    dest.mkdir()
    harness.run("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dest)
    try:
        proc = _run_backup(
            {"SOURCE": os.fspath(image), "DEST": os.fspath(dest), "NAME": backup_name}
        )
        assert proc.returncode == 1, proc.stderr
        assert "rsync into" in proc.stderr and "FAILED" in proc.stderr
        _nothing_left(backup_name)
        harness.run("find", dest, "-mindepth", "1", "-delete")
        proc = _run_backup(
            {
                "SOURCE": os.fspath(image),
                "DEST": os.fspath(dest),
                "NAME": backup_name,
                "METHOD": "tar",
            }
        )
        assert proc.returncode == 1, proc.stderr
        assert list(dest.iterdir()) == []
        _nothing_left(backup_name)
    finally:
        harness.unmount(dest)


def test_backup_service_script_refuses_bad_settings(tmp_path, backup_name):
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    base = {"SOURCE": os.fspath(zeros), "DEST": os.fspath(tmp_path), "NAME": backup_name}
    proc = _run_backup({**base, "METHOD": "ftp"})
    assert proc.returncode == 2 and "METHOD=ftp" in proc.stderr
    proc = _run_backup({**base, "DEST": os.fspath(tmp_path / "absent")})
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    proc = _run_backup({**base, "SNAPSHOT_SIZE": "1G"})
    assert proc.returncode == 2 and re.search("not an LVM logical volume|lvm2", proc.stderr)
    proc = _run_backup(base)
    assert proc.returncode == 1 and "not an ext4 filesystem" in proc.stderr
    _nothing_left(backup_name)
