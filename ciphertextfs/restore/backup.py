"""A copy of the view, read as one stream of entries whatever its container.

A backup arrives either as a directory tree (`tar --xattrs -x`, `rsync
-aHAX`) or as the tar archive itself.  Both are turned into the same
`Entry` records so that the restore logic never knows which one it reads.
Entries come parents first; the side files of long names are available
before any entry of their directory needs them.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ciphertextfs.view.format import SIDE_FILE_NAME

__all__ = [
    "BackupError",
    "Kind",
    "Entry",
    "Backup",
    "TreeBackup",
    "TarBackup",
    "open_backup",
    "show_path",
]


# A side file holds one line of about 450 bytes per long name; anything far
# larger than a directory could ever need is refused instead of read.
SIDE_FILE_MAX = 256 * 1024 * 1024

Path_ = tuple[bytes, ...]


class BackupError(Exception):
    """The backup as a whole cannot be read (not a directory or tar archive)."""


class Kind(enum.Enum):
    DIR = "directory"
    REG = "regular file"
    SYMLINK = "symlink"
    FIFO = "fifo"
    CHR = "character device"
    BLK = "block device"
    SOCK = "socket"


@dataclass
class Entry:
    """One object of the backup.

    `path` is relative to the backup's root, `()` being the root itself.
    `link_key` identifies the inode for hard links: entries sharing a
    link_key are names of the same file.  `open` returns a fresh binary
    reader of the contents of a regular file.
    """

    path: Path_
    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int | None = None
    size: int = 0
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes | None = None
    link_key: object | None = None
    open: Callable[[], BinaryIO] | None = None

    @property
    def name(self) -> bytes:
        return self.path[-1] if self.path else b""


def show_path(path: Path_) -> str:
    """A path for messages: printable, unambiguous, one line."""
    if not path:
        return "."
    text = os.fsdecode(b"/".join(path))
    out = []
    for ch in text:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class Backup:
    """Common interface of the two containers."""

    description: str

    def entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def side_file(self, dir_path: Path_) -> bytes | None:
        """Contents of the long-name side file of a directory, None if it has none."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind_of(st_mode: int) -> Kind | None:
    for test, kind in (
        (stat.S_ISDIR, Kind.DIR),
        (stat.S_ISREG, Kind.REG),
        (stat.S_ISLNK, Kind.SYMLINK),
        (stat.S_ISFIFO, Kind.FIFO),
        (stat.S_ISCHR, Kind.CHR),
        (stat.S_ISBLK, Kind.BLK),
        (stat.S_ISSOCK, Kind.SOCK),
    ):
        if test(st_mode):
            return kind
    return None


def _read_xattrs(target: bytes | int) -> dict[bytes, bytes]:
    """All xattrs of an open fd, or of a path whose last component is not followed."""
    follow = isinstance(target, int)
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENODATA):
            return out
        raise
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENODATA:  # vanished between list and get
                continue
            raise
    return out


class TreeProblem(Exception):
    """An object of a tree backup that could not be read (path, reason)."""

    def __init__(self, path: Path_, reason: str, below: int = 0) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason
        self.below = below


O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _what(st_mode: int) -> str:
    kind = _kind_of(st_mode)
    return kind.value if kind is not None else f"file type {stat.S_IFMT(st_mode):o}"


def open_listed(dir_fd: int, name: bytes, listed: os.stat_result, *, directory: bool) -> int:
    """Open `name` below `dir_fd` only if it is still the object that was listed.

    Someone who can write the backup tree may swap a file for a symlink (to
    a file only root reads) or a FIFO (which would block a plain open):
    O_NOFOLLOW refuses the first, O_NONBLOCK defuses the second, and the
    fstat check catches whatever else took the listed name's place.
    """
    fd = os.open(name, O_DIR if directory else O_FILE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        want = stat.S_IFDIR if directory else stat.S_IFREG
        if stat.S_IFMT(st.st_mode) != want or (st.st_dev, st.st_ino) != (
            listed.st_dev,
            listed.st_ino,
        ):
            raise OSError(
                errno.ESTALE,
                f"changed since it was listed (now a {_what(st.st_mode)}, "
                f"inode {st.st_ino} instead of {listed.st_ino})",
            )
        if not directory:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class TreeBackup(Backup):
    """A directory holding an extracted copy of the view.

    The tree is read through directory fds opened without following
    symlinks, and every file is opened by fd and checked against what was
    listed: whoever owns the backup tree cannot make a restore running as
    root read anything outside it, nor make it hang.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fsencode(os.fspath(root))
        self.description = f"directory {os.fsdecode(self.root)}"
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise BackupError(f"{os.fsdecode(self.root)}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise BackupError(f"{os.fsdecode(self.root)}: not a directory")
        # The directories being walked, root first: (path, fd).
        self._open: list[tuple[Path_, int]] = []
        self._dir_stats: dict[Path_, os.stat_result] = {}

    def _dir_fd(self, path: Path_) -> int | None:
        for p, fd in reversed(self._open):
            if p == path:
                return fd
        return None

    def side_file(self, dir_path: Path_) -> bytes | None:
        dfd = self._dir_fd(dir_path)
        if dfd is None:
            return None
        try:
            st = os.stat(SIDE_FILE_NAME, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > SIDE_FILE_MAX:
            raise OSError(errno.EFBIG, "side file too large")
        with os.fdopen(open_listed(dfd, SIDE_FILE_NAME, st, directory=False), "rb") as f:
            return f.read(SIDE_FILE_MAX + 1)

    def _entry(
        self, path: Path_, dfd: int, name: bytes, st: os.stat_result, own: int | None
    ) -> Entry:
        """The entry of `name` in `dfd`; `own` is the open fd of a directory."""
        kind = _kind_of(st.st_mode)
        assert kind is not None
        e = Entry(
            path=path,
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            atime_ns=st.st_atime_ns,
            size=st.st_size if kind is Kind.REG else 0,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)),
        )
        if kind is Kind.SYMLINK:
            e.target = os.readlink(name, dir_fd=dfd)
        if own is not None:
            e.xattrs = _read_xattrs(own)
        elif kind is Kind.REG:
            fd = open_listed(dfd, name, st, directory=False)
            try:
                e.xattrs = _read_xattrs(fd)
            finally:
                os.close(fd)
            e.open = lambda: os.fdopen(self._open_file(path, st), "rb")
        else:
            e.xattrs = _read_xattrs(b"/proc/self/fd/%d/%s" % (dfd, name))
        if kind is not Kind.DIR and st.st_nlink > 1:
            e.link_key = (st.st_dev, st.st_ino)
        return e

    def _open_file(self, path: Path_, st: os.stat_result) -> int:
        """Open a listed file: through its directory's fd while the walk is
        in it, else from the root again, every directory checked on the way."""
        dfd = self._dir_fd(path[:-1])
        if dfd is not None:
            return open_listed(dfd, path[-1], st, directory=False)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth in range(len(path) - 1):
                listed = self._dir_stats.get(path[: depth + 1])
                if listed is None:
                    raise OSError(errno.ENOENT, "directory not listed")
                nfd = open_listed(fd, path[depth], listed, directory=True)
                os.close(fd)
                fd = nfd
            return open_listed(fd, path[-1], st, directory=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        for _, fd in self._open:
            os.close(fd)
        self._open.clear()

    def entries(self) -> Iterator[Entry | TreeProblem]:  # type: ignore[override]
        """Walk depth-first in name order, yielding a TreeProblem for unreadable objects."""
        try:
            top = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(top)
        except OSError as err:
            raise BackupError(f"{os.fsdecode(self.root)}: {err.strerror}") from None
        # Each frame: a directory's path and fd (also in self._open) and the
        # names in it still to visit, last first.
        stack: list[tuple[Path_, int, list[bytes]]] = []
        try:
            yield from self._visit((), top, b".", stack, st=st, own=top)
            while stack:
                path, dfd, names = stack[-1]
                if not names:
                    stack.pop()
                    self._open.pop()
                    os.close(dfd)
                    continue
                name = names.pop()
                yield from self._visit(path + (name,), dfd, name, stack)
        finally:
            self.close()

    def _visit(
        self,
        path: Path_,
        dfd: int,
        name: bytes,
        stack: list[tuple[Path_, int, list[bytes]]],
        *,
        st: os.stat_result | None = None,
        own: int | None = None,
    ) -> Iterator[Entry | TreeProblem]:
        try:
            if st is None:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if _kind_of(st.st_mode) is None:
                if own is not None:
                    os.close(own)
                yield TreeProblem(path, f"unknown file type {stat.S_IFMT(st.st_mode):o}")
                return
            if own is None and stat.S_ISDIR(st.st_mode):
                own = open_listed(dfd, name, st, directory=True)
            if own is not None:
                self._open.append((path, own))
                self._dir_stats[path] = st
            e = self._entry(path, dfd, name, st, own)
        except OSError as err:
            if own is not None:
                self._open.pop()
                os.close(own)
            yield TreeProblem(path, f"cannot read from the backup: {err.strerror or err}")
            return
        yield e
        if own is None:
            return
        try:
            names = sorted(map(os.fsencode, os.listdir(own)), reverse=True)
        except OSError as err:
            self._open.pop()
            os.close(own)
            yield TreeProblem(path, f"cannot list in the backup: {err.strerror or err}")
            return
        stack.append((path, own, names))


def _pax_name(keyword: str) -> bytes:
    """Undo GNU tar's escaping of '=' and '%' in xattr names within pax keywords."""
    raw = keyword.encode("utf-8", "surrogateescape")
    return raw.replace(b"%3D", b"=").replace(b"%25", b"%")


def _pct_decode(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and i + 3 <= len(raw):
            try:
                out.append(int(raw[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return bytes(out)


def tar_xattrs(pax: dict[str, str]) -> dict[bytes, bytes]:
    """Extended attributes of a member from its pax records.

    GNU tar writes `SCHILY.xattr.<name>` with the raw value; bsdtar writes
    `LIBARCHIVE.xattr.<url-encoded name>` with the value in base64.  The
    archive is opened with utf-8/surrogateescape, so encoding a value back
    the same way gives its exact bytes even when it is not UTF-8.
    """
    import base64

    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_pax_name(key[len("SCHILY.xattr.") :])] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = _pct_decode(key[len("LIBARCHIVE.xattr.") :].encode("utf-8", "surrogateescape"))
            try:
                out.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
            except ValueError:
                continue
    return out


def _tar_path(name: str) -> Path_ | None:
    """Split a member name into components; None for names escaping the root."""
    raw = name.encode("utf-8", "surrogateescape")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        return None
    return tuple(parts)


class TarBackup(Backup):
    """A tar archive made from the view, read without extracting it.

    The archive is read twice: once for the headers (tarfile keeps them) and
    the side files, once in archive order for the contents.  Random access
    lets a hard link be restored from its target member's data whatever the
    order, and a directory's side file be known before its first entry.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.description = f"tar archive {self.path}"
        try:
            self.tar = tarfile.open(self.path, "r:*", encoding="utf-8", errors="surrogateescape")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BackupError(f"{self.path}: not a readable tar archive: {e}") from None
        self.problems: list[TreeProblem] = []
        try:
            self.members = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            self.problems.append(
                TreeProblem((), f"archive damaged after {len(self.tar.members)} members: {e}")
            )
            self.members = list(self.tar.members)
        self._side: dict[Path_, tarfile.TarInfo] = {}
        self._by_path: dict[Path_, tarfile.TarInfo] = {}
        for m in self.members:
            p = _tar_path(m.name)
            if p is None:
                continue
            self._by_path[p] = m
            if p and p[-1] == SIDE_FILE_NAME and m.isreg():
                self._side[p[:-1]] = m

    def close(self) -> None:
        self.tar.close()

    def side_file(self, dir_path: Path_) -> bytes | None:
        m = self._side.get(dir_path)
        if m is None:
            return None
        if m.size > SIDE_FILE_MAX:
            raise OSError(27, "side file too large")
        f = self.tar.extractfile(m)
        assert f is not None
        return f.read()

    def _opener(self, m: tarfile.TarInfo) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            f = self.tar.extractfile(m)
            if f is None:
                raise OSError(5, "member has no data")
            return f  # type: ignore[return-value]

        return open_member

    def entries(self) -> Iterator[Entry | TreeProblem]:  # type: ignore[override]
        seen_root = False
        for m in self.members:
            p = _tar_path(m.name)
            if p is None:
                yield TreeProblem(
                    tuple(m.name.encode("utf-8", "surrogateescape").split(b"/")),
                    "member name leaves the archive's root",
                )
                continue
            if m.islnk():
                target = _tar_path(m.linkname)
                tm = self._by_path.get(target) if target is not None else None
                if tm is None or not tm.isreg():
                    yield TreeProblem(p, "hard link to a member missing from the archive")
                    continue
                e = self._member_entry(p, tm)
                e.link_key = ("tar", target)
                yield e
                continue
            if not p and not m.isdir():
                yield TreeProblem(p, "archive root member is not a directory")
                continue
            if not p:
                seen_root = True
            elif not seen_root:
                seen_root = True
                yield Entry(path=(), kind=Kind.DIR, mode=0o755, uid=0, gid=0, mtime_ns=0)
            e = self._member_entry(p, m)
            if e is None:
                yield TreeProblem(p, f"unsupported tar member type {m.type!r}")
                continue
            if m.isreg() and m.name in self._link_targets:
                e.link_key = ("tar", p)
            yield e
        yield from self.problems

    @property
    def _link_targets(self) -> set[str]:
        cached = getattr(self, "_lt", None)
        if cached is None:
            cached = set()
            for m in self.members:
                if m.islnk():
                    t = _tar_path(m.linkname)
                    tm = self._by_path.get(t) if t is not None else None
                    if tm is not None:
                        cached.add(tm.name)
            self._lt = cached
        return cached

    def _member_entry(self, p: Path_, m: tarfile.TarInfo) -> Entry | None:
        if m.isdir():
            kind = Kind.DIR
        elif m.isreg():
            kind = Kind.REG
        elif m.issym():
            kind = Kind.SYMLINK
        elif m.isfifo():
            kind = Kind.FIFO
        elif m.ischr():
            kind = Kind.CHR
        elif m.isblk():
            kind = Kind.BLK
        else:
            return None
        pax = m.pax_headers
        atime = pax.get("atime")
        mtime = pax.get("mtime")
        e = Entry(
            path=p,
            kind=kind,
            mode=m.mode & 0o7777,
            uid=m.uid,
            gid=m.gid,
            mtime_ns=_pax_time_ns(mtime) if mtime else int(m.mtime) * 1_000_000_000,
            atime_ns=_pax_time_ns(atime) if atime else None,
            size=m.size if kind is Kind.REG else 0,
            rdev=(m.devmajor, m.devminor),
            xattrs=tar_xattrs(pax),
        )
        if kind is Kind.SYMLINK:
            e.target = m.linkname.encode("utf-8", "surrogateescape")
        if kind is Kind.REG:
            e.open = self._opener(m)
        return e


def _pax_time_ns(text: str) -> int:
    """A pax time ("1700000000.123456789", maybe negative) as integer nanoseconds."""
    neg = text.startswith("-")
    body = text[1:] if neg else text
    sec, _, frac = body.partition(".")
    try:
        ns = int(sec or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        return 0
    return -ns if neg else ns


def open_backup(path: str | os.PathLike[str]) -> Backup:
    """A directory is a tree backup; anything else must be a tar archive."""
    if os.path.isdir(path):
        return TreeBackup(path)
    if not os.path.exists(path):
        raise BackupError(f"{os.fspath(path)}: no such file or directory")
    return TarBackup(path)
