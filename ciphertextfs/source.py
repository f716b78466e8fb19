"""What to read for a SOURCE argument: a device, an image, or a directory.

A directory inside a mounted ext4 filesystem is the convenient way to back
up a live system: the view then reads the filesystem's block device
underneath the kernel, rooted at that directory's inode.  The kernel may
still hold the newest data in its page cache, so the filesystem is synced
once before the device is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass

from ciphertextfs.ext4.inode import EXT4_ROOT_INO
from ciphertextfs.mounts import MOUNTINFO, loop_devices_of, read_mountinfo


class SourceError(Exception):
    """SOURCE cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE.

    `path` is what `Filesystem.open` reads (a block device or image file),
    `root_ino` the view's root, `live` whether a mounted filesystem may
    change underneath, and `directory` the directory given, if any (its
    statvfs is current while the superblock's free counts are not).
    """

    path: str
    root_ino: int = EXT4_ROOT_INO
    live: bool = False
    directory: str | None = None


def syncfs(fd: int) -> None:
    """syncfs(2): Python's os module only offers the global sync()."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_directory(path: str) -> None:
    """Write back the whole filesystem holding `path`, so O_DIRECT reads see its data."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def _device_for(dev: tuple[int, int], mount_source: str) -> str:
    """The block device node of `dev`: the mount's source if it is that device.

    The mount source is only a string chosen at mount time ("/dev/root",
    a label, a path in another namespace); the device number is what counts.
    """
    candidates = [mount_source, f"/dev/block/{dev[0]}:{dev[1]}"]
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev:
            return path
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{dev[0]}:{dev[1]}"))
    except OSError:
        name = ""
    if name:
        path = f"/dev/{name}"
        try:
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == dev:
                return path
        except OSError:
            pass
    raise SourceError(f"{mount_source}: no block device node found for device {dev[0]}:{dev[1]}")


def _directory_source(path: str, st: os.stat_result) -> Source:
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    mounts = [m for m in read_mountinfo() if m.dev == dev]
    if not mounts:
        raise SourceError(f"{path}: cannot find its filesystem in {MOUNTINFO}")
    mount = mounts[0]
    if mount.fs_type != "ext4":
        raise SourceError(f"{path}: is on a {mount.fs_type} filesystem, not ext4")
    if dev[0] == 0:
        raise SourceError(f"{path}: its filesystem ({mount.source}) has no backing block device")
    device = _device_for(dev, mount.source)
    sync_directory(path)
    return Source(path=device, root_ino=st.st_ino, live=True, directory=path)


def _mounted_device_source(path: str, st: os.stat_result) -> Source | None:
    """A device (or an image behind a loop device) that ext4 has mounted.

    Its newest metadata then lives in the device's page cache, not on disk:
    the view must read it live, through the device, as for a directory
    source, rooted at the filesystem's root.  None when it is not mounted.
    """
    if stat.S_ISBLK(st.st_mode):
        devs = [(os.major(st.st_rdev), os.minor(st.st_rdev))]
    else:
        devs = [loop.dev for loop in loop_devices_of(path)]
    if not devs:
        return None
    for mount in read_mountinfo():
        if mount.dev in devs and mount.fs_type == "ext4":
            device = path if stat.S_ISBLK(st.st_mode) else _device_for(mount.dev, mount.source)
            sync_directory(mount.mount_point)
            return Source(path=device, live=True, directory=mount.mount_point)
    return None


def resolve_source(path: str) -> Source:
    """Classify SOURCE; raises SourceError with a one-line message.

    Only the directory case is fully checked here; whether a device or an
    image holds ext4 is for `Filesystem.open` to say.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            return _directory_source(path, st)
        except PermissionError as e:
            raise SourceError(f"{path}: {e.strerror}") from None
        except OSError as e:
            raise SourceError(f"{path}: {e.strerror or e}") from None
    if stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode):
        if not os.access(path, os.R_OK, effective_ids=True):
            raise SourceError(f"{path}: {os.strerror(errno.EACCES)}")
        return _mounted_device_source(path, st) or Source(path=path)
    raise SourceError(f"{path}: not a block device, image file or directory")
