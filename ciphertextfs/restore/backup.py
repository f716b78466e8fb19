"""A copy of the view, read as one stream of entries whatever its container.

A backup arrives either as a directory tree (`tar --xattrs -x`, `rsync
-aHAX`) or as the tar archive itself, a file or a stream on standard input.
Both are turned into the same `Entry` records so that the restore logic
never knows which one it reads.  Entries come parents first, side files
included, in the order of the container (a tar archive's own order); what
cannot be read comes among them as a `TreeProblem` (`ArchiveDamage` for a
region of an archive lost).  `Backup.side_file` gives a directory's side
file when the restore needs it before reaching it (see TarBackup for what
a stream can and cannot give).
"""

from __future__ import annotations

import enum
import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ciphertextfs.viewformat import SIDE_FILE_MAX, SIDE_FILE_NAME

from .tarstream import Damage, Member, Rejected, TarReader, decompressed

__all__ = [
    "BackupError",
    "Kind",
    "Entry",
    "Backup",
    "TreeBackup",
    "TarBackup",
    "TreeProblem",
    "ArchiveDamage",
    "open_backup",
    "show_path",
]


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
        """Entries parents first; an entry's `open()` may only work until the next one."""
        raise NotImplementedError

    def side_file(self, dir_path: Path_) -> bytes | None:
        """Contents of the long-name side file of a directory, None if it has none.

        For a tar stream, None also when the side file has not been read
        yet; TarBackup then reports it when it comes.
        """
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


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (95, 61):  # EOPNOTSUPP, ENODATA
            return out
        raise
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == 61:  # vanished between list and get
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


class TreeBackup(Backup):
    """A directory holding an extracted copy of the view."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fsencode(os.fspath(root))
        self.description = f"directory {os.fsdecode(self.root)}"
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise BackupError(f"{os.fsdecode(self.root)}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise BackupError(f"{os.fsdecode(self.root)}: not a directory")

    def _abs(self, path: Path_) -> bytes:
        return os.path.join(self.root, *path) if path else self.root

    def side_file(self, dir_path: Path_) -> bytes | None:
        p = os.path.join(self._abs(dir_path), SIDE_FILE_NAME)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > SIDE_FILE_MAX:
            raise OSError(27, "side file too large")  # EFBIG
        with open(p, "rb") as f:
            return f.read(SIDE_FILE_MAX + 1)

    def _entry(self, path: Path_, st: os.stat_result) -> Entry | None:
        kind = _kind_of(st.st_mode)
        if kind is None:
            return None
        abspath = self._abs(path)
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
            xattrs=_read_xattrs(abspath),
        )
        if kind is Kind.SYMLINK:
            e.target = os.readlink(abspath)
        if kind is Kind.REG:
            e.open = lambda p=abspath: open(p, "rb")  # type: ignore[misc]
        if kind is not Kind.DIR and st.st_nlink > 1:
            e.link_key = (st.st_dev, st.st_ino)
        return e

    def entries(self) -> Iterator[Entry | TreeProblem]:  # type: ignore[override]
        """Walk depth-first in name order, yielding a TreeProblem for unreadable objects."""
        stack: list[Path_] = [()]
        first = True
        while stack:
            path = stack.pop()
            try:
                st = os.lstat(self._abs(path))
                e = self._entry(path, st)
            except OSError as err:
                yield TreeProblem(path, f"cannot read from the backup: {err.strerror}")
                continue
            if first and e is not None and e.kind is not Kind.DIR:
                raise BackupError(f"{os.fsdecode(self.root)}: not a directory")
            first = False
            if e is None:
                yield TreeProblem(path, f"unknown file type {stat.S_IFMT(st.st_mode):o}")
                continue
            yield e
            if e.kind is Kind.DIR:
                try:
                    names = sorted(os.listdir(self._abs(path)))
                except OSError as err:
                    yield TreeProblem(path, f"cannot list in the backup: {err.strerror}")
                    continue
                stack.extend(path + (n,) for n in reversed(names))


def _tar_path(raw: bytes) -> Path_ | None:
    """Split a member name into components; None for names escaping the root."""
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        return None
    return tuple(parts)


class ArchiveDamage(TreeProblem):
    """Bytes of an archive lost to damage: not one entry, a region between offsets.

    `start` and `end` are offsets in the uncompressed archive (`end` None:
    to its end); `path` names the member the damage cut short, if any.
    """

    def __init__(self, start: int, end: int | None, reason: str, path: Path_ = ()) -> None:
        where = f"bytes {start}-{end}" if end is not None else f"from byte {start} to the end"
        member = f" (inside {show_path(path)})" if path else ""
        super().__init__(path, f"{reason}: archive {where} lost{member}")
        self.start = start
        self.end = end


_TAR_KIND = {
    b"5": Kind.DIR,
    b"D": Kind.DIR,  # GNU dumpdir: a directory whose data lists its names
    b"2": Kind.SYMLINK,
    b"3": Kind.CHR,
    b"4": Kind.BLK,
    b"6": Kind.FIFO,
}
_TAR_REGULAR = (b"0", b"\0", b"7", b"S")


class TarBackup(Backup):
    """A tar archive made from the view, read in one pass.

    The archive is a file or a stream (standard input); its compression is
    found by magic number.  Entries come in archive order, side files
    included; the `open()` of a regular file's entry reads the archive
    itself, so it works only until the next entry is asked for.  Damage is
    yielded among the entries: `TreeProblem` for a member refused,
    `ArchiveDamage` for a region of the archive lost.

    `side_file(dir)` answers from the side files already passed in the
    stream (those of the current entry's directories are kept).  For a side
    file further on (format-1 archives list it after the entries needing
    it) an archive file is read ahead by a second reader that never goes
    back, so the whole archive is read at most twice; a stream cannot be
    read ahead: side_file then answers None, and if that directory's side
    file turns up later its entry is reported as having come too late.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, stream: BinaryIO | None = None):
        self.path = os.fspath(path) if path is not None else None
        if stream is None:
            assert self.path is not None
            self.description = f"tar archive {self.path}"
            try:
                raw: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise BackupError(f"{self.path}: {e.strerror}") from None
        else:
            self.description = "tar stream on standard input"
            raw = stream
        self._raw = raw
        try:
            seekable = stream is None and raw.seekable()
            data, self.compression = decompressed(raw)
        except (OSError, EOFError) as e:
            self.close()
            raise BackupError(f"{self._name}: cannot read: {e}") from None
        self._data = data
        self._seekable = seekable
        self._reader = TarReader(data, can_seek=seekable and self.compression is None)
        # dir -> (offset of its side file's member, contents)
        self._side_seen: dict[Path_, tuple[int, bytes]] = {}
        self._side_refused: set[Path_] = set()
        self._cur_offset = -1
        self._ahead: TarReader | None = None
        self._ahead_it: Iterator[Member | Rejected | Damage] | None = None
        self._ahead_pending: Member | None = None
        self._ahead_files: list[BinaryIO] = []

    @property
    def _name(self) -> str:
        return self.path if self.path is not None else "standard input"

    def close(self) -> None:
        for f in [*self._ahead_files, getattr(self, "_data", None), self._raw]:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._ahead_files = []

    # -- side files -------------------------------------------------------

    def side_file(self, dir_path: Path_) -> bytes | None:
        if dir_path in self._side_seen:
            return self._side_seen[dir_path][1]
        if not self._seekable:
            self._side_refused.add(dir_path)
            return None
        return self._read_ahead(dir_path)

    def _read_ahead(self, d: Path_) -> bytes | None:
        """Find d's side file further on, before the reader leaves d's subtree."""
        if self._ahead_it is None:
            assert self.path is not None
            f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self._ahead_files.append(f)
            data, comp = decompressed(f)
            self._ahead_files.append(data)
            self._ahead = TarReader(data, can_seek=comp is None)
            self._ahead_it = iter(self._ahead)
        assert self._ahead is not None
        want = d + (SIDE_FILE_NAME,)
        while True:
            r = self._ahead_pending
            self._ahead_pending = None
            if r is None:
                r = next(self._ahead_it, None)  # type: ignore[arg-type]
                if r is None:
                    return None
                if not isinstance(r, Member):
                    continue
            if r.offset <= self._cur_offset:
                continue
            q = _tar_path(r.path)
            if q is None:
                continue
            if len(q) <= len(d) or q[: len(d)] != d:
                self._ahead_pending = r
                return None
            if q[-1] == SIDE_FILE_NAME and r.typeflag in _TAR_REGULAR:
                self._side_seen[q[:-1]] = (r.offset, self._side_data(self._ahead, r))
                if q == want:
                    return self._side_seen[d][1]

    @staticmethod
    def _side_data(reader: TarReader, m: Member) -> bytes:
        if m.size > SIDE_FILE_MAX:
            raise OSError(27, "side file too large")  # EFBIG
        with reader.open(m) as f:
            return f.read()

    def _forget_sides(self, p: Path_, offset: int) -> None:
        """Drop the side files of directories the reader is done with.

        A directory's subtree is contiguous in a tar archive and holds its
        side file: once the reader is past the side file and outside the
        directory, nothing later needs it.  What is kept is at most the side
        files of p's ancestors, and those read ahead but not reached yet.
        """
        done = [
            d
            for d, (at, _) in self._side_seen.items()
            if at <= offset and (len(d) >= len(p) or p[: len(d)] != d)
        ]
        for d in done:
            del self._side_seen[d]

    # -- entries ----------------------------------------------------------

    def entries(self) -> Iterator[Entry | TreeProblem]:  # type: ignore[override]
        seen_root = False
        members = 0
        damage: list[Damage] = []
        for r in self._reader:
            if isinstance(r, Damage):
                path = _tar_path(r.path) if r.path is not None else ()
                damage.append(r)
                why = r.reason + (f" ({self.compression}-decompressed)" if self.compression else "")
                yield ArchiveDamage(r.start, r.end, why, path or ())
                continue
            p = _tar_path(r.path)
            if p is None:
                yield TreeProblem(
                    tuple(r.path.split(b"/")), "member name leaves the archive's root"
                )
                continue
            if isinstance(r, Rejected):
                members += 1
                yield TreeProblem(p, f"member at byte {r.offset} refused: {r.reason}")
                continue
            members += 1
            self._cur_offset = r.offset
            self._forget_sides(p, r.offset)
            if not p and r.typeflag not in (b"5", b"D"):
                yield TreeProblem(p, "archive root member is not a directory")
                continue
            if not p:
                seen_root = True
            elif not seen_root:
                seen_root = True
                yield Entry(path=(), kind=Kind.DIR, mode=0o755, uid=0, gid=0, mtime_ns=0)
            e = self._member_entry(p, r)
            if isinstance(e, TreeProblem):
                yield e
                continue
            if e is None:
                continue
            if p and p[-1] == SIDE_FILE_NAME and e.kind is Kind.REG:
                try:
                    side = self._side_data(self._reader, r)
                except OSError as err:
                    yield TreeProblem(p, f"side file unreadable: {err.strerror or err}")
                    continue
                if p[:-1] in self._side_refused:
                    yield TreeProblem(
                        p,
                        "comes after entries of its directory that needed it, in a stream that "
                        "cannot be rewound: its long names were not restored (restore from the "
                        "archive file instead)",
                    )
                    continue
                self._side_seen[p[:-1]] = (r.offset, side)
                e.open = lambda data=side: io.BytesIO(data)  # type: ignore[misc]
            yield e
        if members == 0:
            why = f": {damage[0].reason}" if damage else ""
            raise BackupError(f"{self._name}: not a tar archive{why}")

    def _member_entry(self, p: Path_, m: Member) -> Entry | TreeProblem | None:
        if m.typeflag == b"1":
            target = _tar_path(m.linkname)
            if target is None:
                return TreeProblem(p, "hard link target leaves the archive's root")
            return Entry(
                path=p,
                kind=Kind.REG,
                mode=m.mode,
                uid=m.uid,
                gid=m.gid,
                mtime_ns=m.mtime_ns,
                xattrs=m.xattrs,
                link_key=("tar", target),
            )
        if m.typeflag in _TAR_REGULAR:
            kind = Kind.DIR if m.path.endswith(b"/") and m.typeflag == b"\0" else Kind.REG
        elif m.typeflag in _TAR_KIND:
            kind = _TAR_KIND[m.typeflag]
        elif m.typeflag == b"V":
            return None  # a volume label: no file
        else:
            return TreeProblem(p, f"unsupported tar member type {m.typeflag!r}")
        e = Entry(
            path=p,
            kind=kind,
            mode=m.mode,
            uid=m.uid,
            gid=m.gid,
            mtime_ns=m.mtime_ns,
            atime_ns=m.atime_ns,
            size=m.real_size if kind is Kind.REG else 0,
            rdev=(m.devmajor, m.devminor),
            xattrs=m.xattrs,
        )
        if kind is Kind.SYMLINK:
            e.target = m.linkname
        if kind is Kind.REG:
            e.open = lambda m=m: self._reader.open(m)  # type: ignore[misc]
            e.link_key = ("tar", p)
        return e


def open_backup(path: str | os.PathLike[str], stdin: BinaryIO | None = None) -> Backup:
    """A directory is a tree backup; "-" the tar stream on `stdin`; anything else a tar file."""
    if os.fspath(path) == "-" and stdin is not None:
        return TarBackup(None, stream=stdin)
    if os.path.isdir(path):
        return TreeBackup(path)
    if not os.path.exists(path):
        raise BackupError(f"{os.fspath(path)}: no such file or directory")
    return TarBackup(path)
