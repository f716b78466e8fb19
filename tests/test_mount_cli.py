"""`ciphertextfs mount`: validation before forking, readiness, and how the daemon ends."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import harness
from tests.harness_view import (
    CLI,
    daemon_pids,
    is_mounted,
    run_cli,
    stop_view,
    view_mount,
    wait_gone,
)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    harness.require_fuse()
    base = tmp_path_factory.mktemp("mountcli")
    img = harness.mkfs(base / "src.img", size_mb=16)
    with harness.mounted(img, base / "src.mnt") as (_dev, m):
        (m / "hello").write_text("world\n")
        (m / "sub").mkdir()
    return img


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ciphertextfs: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_mount_is_ready_when_the_command_returns(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "v"
    mnt.mkdir()
    proc = run_cli("mount", image, mnt)
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        assert sorted(os.listdir(mnt)) == ["hello", "lost+found", "sub"]
        assert (mnt / "hello").read_text() == "world\n"
        line = next(
            ln for ln in Path("/proc/self/mounts").read_text().splitlines() if f" {mnt} " in ln
        )
        fsname, _, fstype, opts = line.split()[:4]
        assert fsname == f"ciphertextfs:{image}"
        assert fstype == "fuse.ciphertextfs"
        assert {"ro", "default_permissions"} <= set(opts.split(","))
        assert len(daemon_pids(mnt)) == 1
    finally:
        stop_view(mnt)
    assert not is_mounted(mnt)


def test_fusermount_ends_the_daemon(image: Path, tmp_path: Path) -> None:
    with view_mount(image, tmp_path / "v") as v:
        subprocess.run(["fusermount3", "-u", v.mountpoint], check=True)
        assert wait_gone(v.pid, 30)
        assert not is_mounted(v.mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(image: Path, tmp_path: Path, sig: signal.Signals) -> None:
    with view_mount(image, tmp_path / "v") as v:
        os.kill(v.pid, sig)
        assert wait_gone(v.pid, 30)
        assert not is_mounted(v.mountpoint)
        assert daemon_pids(v.mountpoint) == []


def test_sigkill_leaves_a_dead_mount_not_a_hang(image: Path, tmp_path: Path) -> None:
    with view_mount(image, tmp_path / "v") as v:
        os.kill(v.pid, signal.SIGKILL)
        assert wait_gone(v.pid, 30)
        ls = subprocess.run(["ls", v.mountpoint], capture_output=True, text=True, timeout=10)
        assert ls.returncode != 0
        assert "Transport endpoint is not connected" in ls.stderr
        with pytest.raises(OSError) as e:
            (v.mountpoint / "hello").read_text()
        assert e.value.errno == errno.ENOTCONN
        subprocess.run(["fusermount3", "-u", "-z", v.mountpoint], check=True, timeout=10)
        assert not is_mounted(v.mountpoint)


def test_foreground_mode_serves_until_interrupted(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "v"
    mnt.mkdir()
    proc = subprocess.Popen(
        [*CLI, "mount", "-f", image, mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (mnt / "hello").read_text() == "world\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_view(mnt)


def test_directory_of_a_mounted_ext4_with_fresh_data(ext4, tmp_path: Path) -> None:
    with ext4(size_mb=32) as (_image, _dev, m):
        sub = m / "home"
        sub.mkdir()
        (sub / "old").write_text("old\n")
        os.sync()
        # Written moments before mounting: only the source's syncfs puts it on disk.
        (sub / "fresh").write_bytes(b"fresh data\n" * 1000)
        (sub / "dir").mkdir()
        with view_mount(sub, tmp_path / "v") as v:
            assert sorted(os.listdir(v.mountpoint)) == ["dir", "fresh", "old"]
            assert (v.mountpoint / "fresh").read_bytes() == b"fresh data\n" * 1000
            assert os.stat(v.mountpoint / "fresh").st_ino == os.stat(sub / "fresh").st_ino
            assert os.statvfs(v.mountpoint).f_bfree == os.statvfs(m).f_bfree


# -- errors: one line, exit 2 (fatal or usage), nothing mounted --------------


def test_missing_source(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    proc = run_cli("mount", tmp_path / "nope.img", tmp_path / "v")
    assert_one_line_error(proc, 2, "nope.img", "no such file")
    assert not is_mounted(tmp_path / "v")


def test_source_not_ext4(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(4 << 20))
    (tmp_path / "v").mkdir()
    proc = run_cli("mount", zeros, tmp_path / "v")
    assert_one_line_error(proc, 2, "zeros.img", "not an ext4 filesystem")
    assert not is_mounted(tmp_path / "v")


def test_source_unreadable(image: Path, tmp_path: Path) -> None:
    """Root without CAP_DAC_OVERRIDE is an ordinary user to file modes."""
    private = tmp_path / "private.img"
    harness.run("cp", "--sparse=always", image, private)
    os.chown(private, 65534, 65534)
    private.chmod(0o600)
    (tmp_path / "v").mkdir()
    proc = run_cli(
        "mount",
        private,
        tmp_path / "v",
        prefix=["setpriv", "--bounding-set", "-dac_override,-dac_read_search"],
    )
    assert_one_line_error(proc, 2, "private.img", "ermission denied")
    assert not is_mounted(tmp_path / "v")


def test_directory_on_a_non_ext4_filesystem(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    proc = run_cli("mount", "/proc/self", tmp_path / "v")
    assert_one_line_error(proc, 2, "proc", "not ext4")


def test_mountpoint_missing(image: Path, tmp_path: Path) -> None:
    proc = run_cli("mount", image, tmp_path / "absent")
    assert_one_line_error(proc, 2, "absent", "does not exist")


def test_mountpoint_not_a_directory(image: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = run_cli("mount", image, tmp_path / "file")
    assert_one_line_error(proc, 2, "file", "not a directory")


def test_mountpoint_busy(image: Path, tmp_path: Path) -> None:
    with view_mount(image, tmp_path / "v") as v:
        proc = run_cli("mount", image, v.mountpoint)
        assert_one_line_error(proc, 2, "busy")
        assert len(daemon_pids(v.mountpoint)) == 1


def test_unknown_option_is_a_usage_error(image: Path, tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    proc = run_cli("mount", "-o", "allow_other,frobnicate", image, tmp_path / "v")
    assert_one_line_error(proc, 2, "frobnicate")
    proc = run_cli("mount", "-o", "rw", image, tmp_path / "v")
    assert_one_line_error(proc, 2, "read-only")
    assert not is_mounted(tmp_path / "v")


def test_no_dev_fuse(image: Path, tmp_path: Path) -> None:
    """An empty /dev in a private mount namespace: FUSE is unavailable there."""
    mnt = tmp_path / "v"
    mnt.mkdir()
    script = 'mount -t tmpfs none /dev && exec "$@"'
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            *CLI,
            "mount",
            os.fspath(image),
            os.fspath(mnt),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(proc, 2, "/dev/fuse")
    assert not is_mounted(mnt)


def test_help_has_description_and_examples() -> None:
    proc = run_cli("mount", "--help")
    assert proc.returncode == 0
    for words in ("SOURCE", "MOUNTPOINT", "examples:", "allow_other", "fusermount3 -u"):
        assert words in proc.stdout
    proc = run_cli("mount")
    assert proc.returncode == 2
