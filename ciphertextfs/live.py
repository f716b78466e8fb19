"""What changed in a mounted filesystem: fanotify filesystem marks, parsed.

A view over a live source used to forget everything every second, so a
listing that took longer than that was never finished.  With a fanotify
mark on the whole filesystem (FAN_MARK_FILESYSTEM) the kernel reports every
change instead, and the view forgets exactly what changed.  The group
reports file identifiers, not open descriptors (FAN_REPORT_FID and
FAN_REPORT_DFID_NAME, with FAN_REPORT_TARGET_FID where the kernel has it):
ext4's handle is FILEID_INO32_GEN, the inode number and generation, so an
event names the ext4 inode directly and nothing is ever opened by handle.
Names the kernel reports are the dentry names, which in an unlocked
encrypted directory are plaintext: the view matches those by inode number.

The parsing is pure functions over the bytes read(2) returns; everything
is bounds-checked, and a buffer that cannot be parsed to its end counts as
a lost event: the caller must then forget everything, as on FAN_Q_OVERFLOW.
`ChangeWatcher` is the I/O edge: the two syscalls through libc and
non-blocking reads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

# fanotify_init(2) flags
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark(2) flags
FAN_MARK_ADD = 0x01
FAN_MARK_FILESYSTEM = 0x100

# event mask bits
FAN_MODIFY = 0x02
FAN_ATTRIB = 0x04
FAN_CLOSE_WRITE = 0x08
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000

#: Everything that changes what the view shows of an inode or a directory.
WATCH_MASK = (
    FAN_MODIFY
    | FAN_ATTRIB
    | FAN_CLOSE_WRITE
    | FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_DELETE_SELF
    | FAN_MOVE_SELF
    | FAN_ONDIR
    | FAN_EVENT_ON_CHILD
)

#: Events that add, remove or replace a name in a directory.
DIRENT_EVENTS = FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_RENAME

# struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
# metadata_len u16, mask u64 (aligned), fd s32, pid s32.
_METADATA = struct.Struct("<IBBHQii")
FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1

# struct fanotify_event_info_header: info_type u8, pad u8, len u16.
_INFO_HEADER = struct.Struct("<BBH")
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12
_NAMED_INFO = (
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
    FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
)
_DIR_INFO = (FAN_EVENT_INFO_TYPE_DFID, *_NAMED_INFO)

# struct fanotify_event_info_fid after its header: __kernel_fsid_t (two
# s32), then struct file_handle: handle_bytes u32, handle_type s32, f_handle.
_FID = struct.Struct("<iiIi")

# exportfs handle types (include/linux/exportfs.h)
FILEID_INO32_GEN = 1
FILEID_INO32_GEN_PARENT = 2
FILEID_INO64_GEN = 0x81
FILEID_INO64_GEN_PARENT = 0x82


class BadEvents(ValueError):
    """The event buffer cannot be parsed to its end: events were lost."""


@dataclass(frozen=True, slots=True)
class Event:
    """One fanotify event: what happened (`mask`), to which inodes, under which names.

    `ino`: the object's inode (FAN_EVENT_INFO_TYPE_FID), when reported;
    `names`: (directory inode, name) of each DFID_NAME-like record, the name
    None for a bare DFID record; `fd` is FAN_NOFD in a FID group.
    """

    mask: int
    ino: int | None = None
    names: tuple[tuple[int, bytes | None], ...] = ()
    fd: int = FAN_NOFD


def handle_ino(handle_type: int, f_handle: bytes) -> int:
    """The inode number in an exportfs file handle; BadEvents for any other encoding."""
    if handle_type in (FILEID_INO32_GEN, FILEID_INO32_GEN_PARENT) and len(f_handle) >= 8:
        return struct.unpack_from("<I", f_handle, 0)[0]
    if handle_type in (FILEID_INO64_GEN, FILEID_INO64_GEN_PARENT) and len(f_handle) >= 12:
        return struct.unpack_from("<Q", f_handle, 0)[0]
    raise BadEvents(f"file handle type {handle_type:#x} of {len(f_handle)} bytes")


def parse_fid_info(record: bytes, named: bool) -> tuple[int, bytes | None]:
    """(inode, name) of one fanotify_event_info_fid record, header included."""
    body = _INFO_HEADER.size
    if len(record) < body + _FID.size:
        raise BadEvents("fid record shorter than its fixed part")
    _fsid0, _fsid1, handle_bytes, handle_type = _FID.unpack_from(record, body)
    start = body + _FID.size
    if handle_bytes > len(record) - start:
        raise BadEvents("file handle runs past its record")
    ino = handle_ino(handle_type, record[start : start + handle_bytes])
    if not named:
        return ino, None
    rest = record[start + handle_bytes :]
    end = rest.find(b"\0")
    if end <= 0:
        raise BadEvents("name not terminated in its record" if end < 0 else "empty name")
    return ino, rest[:end]


def parse_event(buf: bytes, off: int) -> tuple[Event, int]:
    """The event at `off` and the offset of the next one."""
    if len(buf) - off < _METADATA.size:
        raise BadEvents("event metadata truncated")
    event_len, vers, _reserved, metadata_len, mask, fd, _pid = _METADATA.unpack_from(buf, off)
    if vers != FANOTIFY_METADATA_VERSION:
        raise BadEvents(f"fanotify metadata version {vers}")
    if metadata_len < _METADATA.size or event_len < metadata_len:
        raise BadEvents("event lengths inconsistent")
    end = off + event_len
    if end > len(buf):
        raise BadEvents("event runs past the buffer")
    ino: int | None = None
    names: list[tuple[int, bytes | None]] = []
    pos = off + metadata_len
    while pos < end:
        if end - pos < _INFO_HEADER.size:
            raise BadEvents("info header truncated")
        info_type, _pad, length = _INFO_HEADER.unpack_from(buf, pos)
        if length < _INFO_HEADER.size or pos + length > end:
            raise BadEvents("info record length out of bounds")
        record = buf[pos : pos + length]
        if info_type == FAN_EVENT_INFO_TYPE_FID:
            ino = parse_fid_info(record, named=False)[0]
        elif info_type in _DIR_INFO:
            names.append(parse_fid_info(record, named=info_type in _NAMED_INFO))
        pos += length
    return Event(mask, ino, tuple(names), fd), end


def parse_events(buf: bytes) -> list[Event]:
    """Every event of one read(2) of a fanotify group; BadEvents when any is damaged."""
    events = []
    off = 0
    while off < len(buf):
        event, off = parse_event(buf, off)
        events.append(event)
    return events


@dataclass
class Changes:
    """A batch of events folded into what the view must forget.

    `inodes`: inodes whose attributes, xattrs or contents may have changed
    (every object an event names, and every directory whose entries
    changed); `names`: directory inode -> the names added, removed or
    replaced there, as the kernel reported them; `everything`: events were
    lost (queue overflow, a buffer that did not parse): forget it all.
    """

    inodes: set[int] = field(default_factory=set)
    names: dict[int, set[bytes]] = field(default_factory=dict)
    everything: bool = False

    def add(self, event: Event) -> None:
        if event.mask & FAN_Q_OVERFLOW:
            self.everything = True
            return
        if event.ino is not None:
            self.inodes.add(event.ino)
        dirent = bool(event.mask & DIRENT_EVENTS)
        for dir_ino, name in event.names:
            if dirent:
                self.inodes.add(dir_ino)
                got = self.names.setdefault(dir_ino, set())
                if name is not None and name != b".":
                    got.add(name)
            elif event.ino is None:
                if name == b".":
                    # An event on a directory itself is reported so.
                    self.inodes.add(dir_ino)
                else:
                    # A child named but not identified: no way to tell which.
                    self.everything = True
        if event.ino is None and not event.names:
            self.everything = True

    def __bool__(self) -> bool:
        return self.everything or bool(self.inodes) or bool(self.names)


def fold(events: Iterable[Event], into: Changes | None = None) -> Changes:
    changes = into if into is not None else Changes()
    for event in events:
        changes.add(event)
    return changes


class WatchUnavailable(OSError):
    """fanotify cannot watch this filesystem; the message says why."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int

_AT_FDCWD = -100
_READ_SIZE = 1 << 16

#: What fanotify_init is asked for, best first: the target's identifier in
#: directory events, then without it (older kernels); an unlimited queue
#: needs CAP_SYS_ADMIN, which marking a filesystem needs anyway.
_INIT_FLAGS = (
    FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID | FAN_UNLIMITED_QUEUE,
    FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_UNLIMITED_QUEUE,
    FAN_REPORT_DFID_NAME | FAN_REPORT_FID,
)


class ChangeWatcher:
    """A fanotify group with one filesystem mark: the filesystem holding `path`."""

    def __init__(self, fd: int, flags: int) -> None:
        self._fd = fd
        self.flags = flags

    @classmethod
    def open(cls, path: str) -> ChangeWatcher:
        """Watch the filesystem of `path`; WatchUnavailable with the reason otherwise."""
        fd = -1
        err = 0
        for flags in _INIT_FLAGS:
            fd = _libc.fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | flags, os.O_RDONLY
            )
            if fd >= 0:
                break
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.EPERM):
                break
        if fd < 0:
            raise WatchUnavailable(err, f"fanotify_init: {os.strerror(err)}")
        if _libc.fanotify_mark(
            fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, WATCH_MASK, _AT_FDCWD, os.fsencode(path)
        ):
            err = ctypes.get_errno()
            os.close(fd)
            raise WatchUnavailable(err, f"fanotify_mark of {path}: {os.strerror(err)}")
        return cls(fd, flags)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> Changes:
        """Everything queued now, folded; empty when nothing is."""
        changes = Changes()
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return changes
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                return changes
            try:
                events = parse_events(buf)
            except BadEvents:
                changes.everything = True
                return changes
            for event in events:
                if event.fd >= 0:
                    os.close(event.fd)
            fold(events, changes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
