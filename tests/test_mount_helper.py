"""`mount -t fuse.ciphertextfs` and fstab lines, through the real mount(8) and mount.fuse3.

mount.fuse3 runs `ciphertextfs SOURCE MOUNTPOINT -o OPTIONS` through /bin/sh
with a fixed PATH; `.ci/install` links /usr/local/bin/ciphertextfs to the
virtualenv's entry point, and these tests check that the link is the code
under test before relying on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciphertextfs.commands import CommandError
from ciphertextfs.commands.mount import helper_argv, parse_options
from tests import harness
from tests.harness_view import is_mounted, live_processes, stop_view, wait_gone

#: The PATH mount.fuse3 gives the program it runs (libfuse util/mount.fuse.c).
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    harness.require_fuse()
    found = shutil.which("ciphertextfs", path=HELPER_PATH)
    ours = os.path.join(sys.prefix, "bin", "ciphertextfs")
    assert found is not None and os.path.realpath(found) == os.path.realpath(ours), (
        f"mount.fuse3 would run {found}, not {ours}: run 'bash .ci/install' in this checkout"
    )
    assert shutil.which("mount.fuse3"), "mount.fuse3 missing: fuse3 is in .ci/install"
    base = tmp_path_factory.mktemp("helper")
    img = harness.mkfs(base / "src.img", size_mb=16)
    with harness.mounted(img, base / "src.mnt") as (_dev, m):
        (m / "hello").write_text("world\n")
    return img


def helper_pids(mountpoint: Path) -> list[int]:
    """Processes started by mount.fuse3 for `mountpoint`: `... ciphertextfs SRC MNT -o ...`."""
    wanted = os.fspath(mountpoint).encode()
    return [
        pid
        for pid, argv in live_processes()
        if any(a.endswith(b"/ciphertextfs") for a in argv[:2]) and wanted in argv
    ]


@contextlib.contextmanager
def cleanup(mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    try:
        yield mnt
    finally:
        pids = helper_pids(mnt)
        stop_view(mnt)
        for pid in pids:
            if not wait_gone(pid, 10):
                os.kill(pid, 9)


def mount_line(mnt: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == os.fspath(mnt):
            return fields
    raise AssertionError(f"{mnt} is not mounted")


def run(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=60, check=False
    )


def assert_unmounts(mnt: Path) -> None:
    pids = helper_pids(mnt)
    assert len(pids) == 1, pids
    proc = run("umount", mnt)
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mnt)
    assert wait_gone(pids[0], 30), "the daemon outlived umount"


def test_mount_t_fuse_ciphertextfs(image: Path, tmp_path: Path) -> None:
    with cleanup(tmp_path / "v") as mnt:
        proc = run("mount", "-t", "fuse.ciphertextfs", image, mnt, "-o", "ro,allow_other")
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "hello").read_text() == "world\n"
        fsname, _, fstype, opts = mount_line(mnt)[:4]
        assert fsname == f"ciphertextfs:{image}"
        assert fstype == "fuse.ciphertextfs"
        # mount.fuse3 adds dev,suid; the view stays nodev,nosuid regardless.
        assert {"ro", "nosuid", "nodev", "allow_other", "default_permissions"} <= set(
            opts.split(",")
        )
        assert_unmounts(mnt)


def test_fstab_line_with_mount_and_systemd_options(image: Path, tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    with cleanup(tmp_path / "v") as mnt:
        opts = "defaults,ro,allow_other,noauto,nofail,_netdev,x-systemd.device-timeout=10s"
        fstab.write_text(f"# test's own fstab\n{image} {mnt} fuse.ciphertextfs {opts} 0 0\n")
        proc = run("mount", "--fstab", fstab, mnt)
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(mnt)) == ["hello", "lost+found"]
        assert mount_line(mnt)[2] == "fuse.ciphertextfs"
        assert "allow_other" in mount_line(mnt)[3].split(",")
        assert_unmounts(mnt)


def test_users_option_passes_noexec(image: Path, tmp_path: Path) -> None:
    """`users` in fstab makes mount(8) add noexec,nosuid,nodev: the view honours noexec."""
    fstab = tmp_path / "fstab"
    with cleanup(tmp_path / "v") as mnt:
        fstab.write_text(f"{image} {mnt} fuse.ciphertextfs ro,users,noauto 0 0\n")
        proc = run("mount", "--fstab", fstab, mnt)
        assert proc.returncode == 0, proc.stderr
        assert "noexec" in mount_line(mnt)[3].split(",")
        assert_unmounts(mnt)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (None, ("'rw'", "read-only")),
        ("rw", ("'rw'", "read-only")),
        ("ro,bogus_opt", ("unknown mount option 'bogus_opt'",)),
    ],
)
def test_refused_options_mount_nothing(
    image: Path, tmp_path: Path, options: str | None, words: tuple[str, ...]
) -> None:
    """mount(8) passes rw unless told ro: a read-only view refuses it, with the reason."""
    with cleanup(tmp_path / "v") as mnt:
        argv: list[str | os.PathLike[str]] = ["mount", "-t", "fuse.ciphertextfs", image, mnt]
        if options is not None:
            argv += ["-o", options]
        proc = run(*argv)
        assert proc.returncode != 0
        assert not is_mounted(mnt)
        line = proc.stderr.strip().splitlines()[0]
        assert line.startswith("ciphertextfs: error: "), proc.stderr
        for w in words:
            assert w in line, line
        assert helper_pids(mnt) == []


def test_helper_argv_form() -> None:
    commands = ("mount", "decrypt", "inspect", "demo")
    assert helper_argv(["/dev/sdb1", "/mnt", "-o", "ro"], commands) == [
        "mount",
        "/dev/sdb1",
        "/mnt",
        "-o",
        "ro",
    ]
    assert helper_argv(["decrypt", "a", "b"], commands) == ["decrypt", "a", "b"]
    assert helper_argv(["--version"], commands) == ["--version"]
    assert helper_argv([], commands) == []


def test_option_parsing() -> None:
    assert parse_options(["ro,allow_other,dev,suid", "noauto,x-systemd.automount"]) == {
        "ro",
        "allow_other",
    }
    assert parse_options(["comment=systemd.automount,nofail,_netdev,defaults"]) == set()
    assert parse_options(["users,noexec"]) == {"noexec"}
    for bad in ("rw", "fsname=x", "allow_root", "max_read=4096"):
        with pytest.raises(CommandError) as e:
            parse_options([f"ro,{bad}"])
        assert e.value.exit_code == 2
