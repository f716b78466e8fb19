"""Real ext4 images on real loop devices, for tests that need the kernel.

Every test that touches the kernel goes through these helpers so that each
loop device and mount is released however the test ends: a leaked mount
breaks the next run and CI on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class KernelUnavailable(RuntimeError):
    """The machine lacks root, loop devices, ext4 encryption or FUSE."""


def run(*argv: str | os.PathLike[str], input: bytes | None = None) -> str:
    """Run a command, raising with its stderr when it fails."""
    proc = subprocess.run(
        [os.fspath(a) for a in argv], input=input, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, proc.args, proc.stdout, proc.stderr
        ) from RuntimeError(proc.stderr.decode(errors="replace").strip())
    return proc.stdout.decode(errors="surrogateescape")


def require_kernel() -> None:
    """Raise KernelUnavailable unless loop devices and ext4 encryption are usable.

    Tests call this instead of skipping: a machine without these capabilities
    cannot test the product, and CI must say so loudly.
    """
    if os.geteuid() != 0:
        raise KernelUnavailable("kernel-backed tests need root")
    if not Path("/dev/loop-control").exists():
        raise KernelUnavailable("no /dev/loop-control: loop devices are unavailable")
    if not Path("/sys/fs/ext4/features/encryption").exists():
        raise KernelUnavailable("this kernel's ext4 lacks encryption support")


def require_fuse() -> None:
    """Raise KernelUnavailable unless FUSE mounts are possible."""
    require_kernel()
    if not Path("/dev/fuse").exists():
        raise KernelUnavailable("no /dev/fuse")


def mkfs(
    image: Path,
    *,
    size_mb: int = 32,
    block_size: int = 4096,
    features: Sequence[str] = ("encrypt",),
    fs_type: str = "ext4",
    extra: Sequence[str] = (),
) -> Path:
    """Create a fresh ext4 image file with mke2fs.

    `features` go to `-O` (prefix `^` to disable), `extra` are further
    mke2fs arguments such as `-N 4096` or `-J size=1`.
    """
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    argv: list[str] = ["mke2fs", "-q", "-F", "-t", fs_type, "-b", str(block_size)]
    if features:
        argv += ["-O", ",".join(features)]
    argv += list(extra)
    argv.append(os.fspath(image))
    run(*argv)
    return image


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = False) -> Iterator[str]:
    """Attach `image` to a free loop device for the duration of the block."""
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    dev = run(*argv, image).strip()
    try:
        yield dev
    finally:
        detach_loop(dev)


def detach_loop(dev: str) -> None:
    """Detach a loop device, waiting out a brief busy period after umount.

    While someone (udev's blkid probe, say) still has the device open,
    `losetup -d` only marks it for detaching when they close it: wait for
    the backing file to go, so that the device is really free on return.
    """
    for _ in range(50):
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        subprocess.run(["losetup", "-d", dev], check=True)
    backing = Path("/sys/block") / os.path.basename(dev) / "loop" / "backing_file"
    deadline = time.monotonic() + 10
    while backing.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def unmount(mountpoint: Path) -> None:
    """Unmount, retrying while the mount is briefly busy, then lazily."""
    for _ in range(50):
        if not os.path.ismount(mountpoint):
            return
        if subprocess.run(["umount", os.fspath(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", os.fspath(mountpoint)], check=False)


@contextlib.contextmanager
def mounted(
    image: Path,
    mountpoint: Path,
    *,
    options: str = "",
    read_only: bool = False,
) -> Iterator[tuple[str, Path]]:
    """Mount an ext4 image through a loop device; yield (device, mountpoint)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    with loop_device(image, read_only=read_only) as dev:
        argv = ["mount", "-t", "ext4"]
        opts = [o for o in (options, "ro" if read_only else "") if o]
        if opts:
            argv += ["-o", ",".join(opts)]
        run(*argv, dev, mountpoint)
        try:
            yield dev, mountpoint
        finally:
            unmount(mountpoint)


def dumpe2fs_header(image: Path) -> dict[str, str]:
    """The superblock fields `dumpe2fs -h` prints, by their names there."""
    fields = {}
    for line in run("dumpe2fs", "-h", image).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def drop_caches() -> None:
    """Write back and drop the page cache so the next reads come from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def leaked_loops(under: Path) -> list[str]:
    """Loop devices whose backing file lies below `under`."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(os.fspath(under)):
            found.append(parts[0])
    return found


def leaked_mounts(under: Path) -> list[str]:
    """Mount points below `under`, deepest first."""
    points = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(os.fspath(under)):
                points.append(mnt)
    return sorted(points, key=len, reverse=True)
