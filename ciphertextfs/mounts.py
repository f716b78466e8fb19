"""What the running system says about mounts and loop devices.

/proc/self/mountinfo and /sys/block, read the same way for the view's
SOURCE (is it mounted, and through which device) and for restore-image's
TARGET (is it in use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
SYS_BLOCK = "/sys/block"


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    dev: tuple[int, int]
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes of space, tab, newline and backslash."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Entries of /proc/self/mountinfo (see proc(5)); malformed lines are skipped."""
    result = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            result.append(
                MountInfo(
                    mount_point=_unescape(fields[4]),
                    dev=(int(major), int(minor)),
                    fs_type=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                )
            )
        except (ValueError, IndexError):
            continue
    return result


def read_mountinfo() -> list[MountInfo]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def is_mount_point(path: str) -> bool:
    """True when something is mounted exactly on `path`.

    Bind mounts of a directory of the same filesystem keep st_dev, so the
    st_dev comparison of os.path.ismount alone misses them.
    """
    real = os.path.realpath(path)
    if os.path.ismount(real):
        return True
    return any(m.mount_point == real for m in read_mountinfo())


@dataclass(frozen=True)
class LoopDevice:
    name: str
    """As in /dev and /sys/block: loop0, ..."""
    dev: tuple[int, int]


def loop_devices_of(image: str) -> list[LoopDevice]:
    """The loop devices whose backing file is `image`."""
    real = os.path.realpath(image)
    found = []
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return found
    for name in names:
        try:
            with open(f"{SYS_BLOCK}/{name}/loop/backing_file") as f:
                backing = f.read().strip()
            with open(f"{SYS_BLOCK}/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
        except (OSError, ValueError):
            continue
        if os.path.realpath(backing) == real:
            found.append(LoopDevice(name, (int(major), int(minor))))
    return found
