"""Mount the ciphertext view with the real `ciphertextfs mount` command.

End-to-end tests go through `view_mount` so that every view they mount is
unmounted and its serving process ended however the test ends: a leaked
FUSE daemon keeps the source image busy and a dead mount point hangs `ls`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The command line, run from the source tree with the test interpreter.
CLI: tuple[str, ...] = (sys.executable, "-m", "ciphertextfs.cli")


@dataclass(frozen=True)
class ViewMount:
    """A mounted view: where, and the pid of the process serving it."""

    mountpoint: Path
    pid: int


def run_cli(
    *args: str | os.PathLike[str], prefix: Sequence[str] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `ciphertextfs ARGS...` (optionally under `prefix`, e.g. setpriv); never raises."""
    argv = [*prefix, *CLI, *(os.fspath(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def is_mounted(mountpoint: Path) -> bool:
    """Whether anything is mounted on `mountpoint`, a dead FUSE mount included.

    os.path.ismount answers False for a dead FUSE mount (stat fails with
    ENOTCONN), which is exactly the case cleanup must not miss.
    """
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split(" ")[4].replace("\\040", " ") == target:
                return True
    return False


def live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process that is neither a zombie nor gone."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            yield int(entry), argv


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live processes serving `mountpoint`: `ciphertextfs mount ... MOUNTPOINT`."""
    wanted = os.fspath(mountpoint).encode()
    return [
        pid
        for pid, argv in live_processes()
        if len(argv) >= 2
        and b"ciphertextfs.cli" in argv
        and b"mount" in argv
        and argv[-1] == wanted
    ]


def _task_states(pid: int) -> list[bytes]:
    """The scheduler state of every thread of process `pid` (empty once it is reaped)."""
    states = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                states.append(f.read().rsplit(b")", 1)[1].split()[0])
        except OSError:
            continue
    return states


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until every thread of `pid` has exited (a zombie nobody reaps counts).

    The thread group leader turns zombie as soon as it is killed, while the
    worker threads are still exiting and the /dev/fuse descriptor they share
    is still open: only when the last thread is gone has the kernel ended
    the FUSE connection.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(state in (b"Z", b"X") for state in _task_states(pid)):
            return True
        time.sleep(0.02)
    return False


def stop_view(mountpoint: Path, pid: int | None = None) -> None:
    """Unmount (lazily if need be) and make sure the serving process is gone."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", os.fspath(mountpoint)], capture_output=True)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], capture_output=True)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", os.fspath(mountpoint)], capture_output=True)
    pids = set(daemon_pids(mountpoint))
    if pid is not None:
        pids.add(pid)
    for p in pids:
        if wait_gone(p, 5):
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
            if wait_gone(p, 5):
                break


@contextlib.contextmanager
def view_mount(
    source: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    options: Sequence[str] = (),
    extra: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[ViewMount]:
    """`ciphertextfs mount [-o OPTIONS] [EXTRA...] SOURCE MOUNTPOINT` for the duration of the block.

    Raises RuntimeError with the command's stderr when the mount fails.
    The view answers requests as soon as the block starts.
    """
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    if options:
        args += ["-o", ",".join(options)]
    proc = run_cli("mount", *args, *extra, source, mnt)
    pid = None
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"ciphertextfs mount failed ({proc.returncode}): {proc.stderr}")
        pids = daemon_pids(mnt)
        if len(pids) != 1:
            raise RuntimeError(f"expected one process serving {mnt}, found {pids}")
        pid = pids[0]
        yield ViewMount(mnt, pid)
    finally:
        stop_view(mnt, pid)
