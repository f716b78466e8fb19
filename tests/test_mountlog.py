"""Where the background view's warnings go: syslog, the kernel log, --log FILE, -f.

The damaged images are made with debugfs (extent headers of some files
zeroed), mounted with the real `ciphertextfs mount`; the syslog side is a
unix datagram socket of the test's own, named by CIPHERTEXTFS_SYSLOG_SOCKET.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciphertextfs.commands.mountlog import BURST, KMSG, Limiter
from tests import harness
from tests.harness_view import CLI, daemon_pids, is_mounted, stop_view, wait_gone

DAMAGED = BURST + 15


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with DAMAGED files whose extent header is zeroed, and one healthy file."""
    harness.require_fuse()
    base = tmp_path_factory.mktemp("mountlog")
    tree = base / "tree"
    (tree / "dmg").mkdir(parents=True)
    for i in range(DAMAGED):
        (tree / "dmg" / f"f{i}").write_bytes(os.urandom(8192))
    (tree / "ok").write_text("fine\n")
    img = base / "damaged.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    harness.run("mkfs.ext4", "-q", "-F", "-d", tree, img)
    script = base / "damage.debugfs"
    script.write_text("".join(f"sif /dmg/f{i} block[0] 0\n" for i in range(DAMAGED)))
    harness.run("debugfs", "-w", "-f", script, img)
    return img


@contextlib.contextmanager
def listener(path: Path) -> Iterator[list[str]]:
    """A syslog daemon of our own: the datagrams received, as they arrive."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    lines: list[str] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                lines.append(s.recv(65536).decode().rstrip("\0"))

    s.bind(os.fspath(path))
    s.settimeout(0.05)
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        time.sleep(0.2)
        stop.set()
        thread.join()
        s.close()
        path.unlink(missing_ok=True)


def mount_read_unmount(
    image: Path, mnt: Path, env: dict[str, str], *args: str, files: int = DAMAGED
) -> int:
    """Mount in the background, read every damaged file twice and the healthy one, unmount.

    Returns the pid that served the view, gone by then.
    """
    mnt.mkdir()
    proc = subprocess.run(
        [*CLI, "mount", *args, image, mnt], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    pid = daemon_pids(mnt)[0]
    try:
        for _ in range(2):
            for i in range(files):
                with pytest.raises(OSError) as e:
                    (mnt / "dmg" / f"f{i}").read_bytes()
                assert e.value.errno == 5
        assert (mnt / "ok").read_text() == "fine\n"
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        assert wait_gone(pid, 30)
    finally:
        stop_view(mnt, pid)
    assert not is_mounted(mnt)
    return pid


def test_background_warnings_go_to_syslog_rate_limited(damaged: Path, tmp_path: Path) -> None:
    sock = tmp_path / "log.sock"
    with listener(sock) as lines:
        env = dict(os.environ, CIPHERTEXTFS_SYSLOG_SOCKET=os.fspath(sock))
        pid = mount_read_unmount(damaged, tmp_path / "v", env)
    prefix = f"ciphertextfs[{pid}]: "
    assert lines, "nothing reached the syslog socket"
    for line in lines:
        assert re.match(r"<\d+>", line), line
        assert line.split(">", 1)[1].startswith(prefix), line
    # daemon facility (3): warning is priority 28, info 30.
    damage = [ln for ln in lines if ln.startswith("<28>") and "bad extent header" in ln]
    assert len(damage) == BURST, lines
    # One line per damaged object although each was read twice.
    assert len(set(damage)) == len(damage)
    suppressed = [ln for ln in lines if "more warnings suppressed" in ln]
    assert len(suppressed) == 1, lines
    assert int(suppressed[0].split(prefix)[1].split()[0]) == DAMAGED - BURST
    summary = [ln for ln in lines if ln.startswith("<30>") and " unmounted: " in ln]
    assert len(summary) == 1, lines
    errors = int(re.search(r"(\d+) errors", summary[0]).group(1))
    assert errors >= 2 * DAMAGED
    assert re.search(r"\b5 bytes read", summary[0]), summary[0]
    assert int(re.search(r"(\d+) lookups", summary[0]).group(1)) >= DAMAGED + 2
    assert len(lines) == BURST + 2


def test_without_syslog_warnings_reach_the_kernel_log(damaged: Path, tmp_path: Path) -> None:
    """No /dev/log (no syslog daemon): warnings go to /dev/kmsg, the summary does not."""
    fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        env = dict(os.environ, CIPHERTEXTFS_SYSLOG_SOCKET=os.fspath(tmp_path / "absent"))
        pid = mount_read_unmount(damaged, tmp_path / "v", env, files=2)
        records = []
        with contextlib.suppress(BlockingIOError):
            while True:
                records.append(os.read(fd, 8192).decode(errors="replace"))
    finally:
        os.close(fd)
    ours = [r.split(";", 1)[1] for r in records if f"ciphertextfs[{pid}]: " in r]
    assert len(ours) == 2, records
    assert all("bad extent header" in r for r in ours), ours
    assert not any("unmounted" in r for r in ours)


def test_log_file_keeps_the_warnings_and_the_summary(damaged: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "view.log"
    sock = tmp_path / "log.sock"
    with listener(sock) as received:
        env = dict(os.environ, CIPHERTEXTFS_SYSLOG_SOCKET=os.fspath(sock))
        mount_read_unmount(damaged, tmp_path / "v", env, "--log", os.fspath(log_file), files=3)
    assert received == []
    lines = log_file.read_text().splitlines()
    assert sum("bad extent header" in ln for ln in lines) == 3, lines
    assert sum(" unmounted: " in ln for ln in lines) == 1, lines


def test_foreground_logs_to_stderr(damaged: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "v"
    mnt.mkdir()
    proc = subprocess.Popen(
        [*CLI, "mount", "-f", damaged, mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        with pytest.raises(OSError):
            (mnt / "dmg" / "f0").read_bytes()
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_view(mnt)
    text = err.decode()
    assert "bad extent header" in text
    assert " unmounted: " in text


# -- the limiter alone, with a clock of the test's own -------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def test_limiter_windows_repetitions_and_info() -> None:
    now = [0.0]
    target = Collect()
    limiter = Limiter(target, burst=3, interval=10, clock=lambda: now[0])
    log = logging.getLogger("ciphertextfs.test-limiter")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(limiter)
    try:
        for i in range(5):
            log.warning("inode %d: damaged", i)
        log.warning("inode %d: damaged", 0)
        log.info("summary")
        assert [m for _, m in target.messages] == [
            "inode 0: damaged",
            "inode 1: damaged",
            "inode 2: damaged",
            "summary",
        ]
        now[0] = 10.5
        log.error("inode %d: damaged", 7)
        assert target.messages[4:] == [
            (logging.WARNING, "2 more warnings suppressed (at most 3 per 10 s are logged)"),
            (logging.ERROR, "inode 7: damaged"),
        ]
        for i in range(10, 14):
            log.warning("inode %d: damaged", i)
        limiter.close()
        assert target.messages[-1][1].startswith("2 more warnings suppressed")
        assert len(target.messages) == 9
    finally:
        log.removeHandler(limiter)


def test_a_syslog_daemon_that_does_not_keep_up_never_blocks_the_view(
    damaged: Path, tmp_path: Path
) -> None:
    """A full syslog queue (nobody reads the socket) drops messages instead of hanging."""
    sock = tmp_path / "stuck.sock"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(os.fspath(sock))
    mnt = tmp_path / "v"
    mnt.mkdir()
    pid = None
    try:
        env = dict(os.environ, CIPHERTEXTFS_SYSLOG_SOCKET=os.fspath(sock))
        proc = subprocess.run(
            [*CLI, "mount", damaged, mnt], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        pid = daemon_pids(mnt)[0]
        files = [os.fspath(mnt / "dmg" / f"f{i}") for i in range(DAMAGED)]
        # cat in a child with a timeout: a hung view must fail the test, not hang it.
        cat = subprocess.run(["cat", *files], capture_output=True, timeout=30, check=False)
        assert cat.returncode != 0
        assert cat.stderr.count(b"Input/output error") == DAMAGED
        assert (mnt / "ok").read_text() == "fine\n"
    finally:
        stop_view(mnt, pid)
        stuck.close()
