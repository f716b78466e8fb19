"""Everything a restore does to DEST, and nothing else.

The same interface with `dry=True` is the verify mode: the restore
decrypts and checks everything but this class writes nothing.  Directory
modes, times and attributes are set last (deepest first): a default ACL set
early would be inherited by what is restored inside, a read-only mode would
stop the restore, and creating entries would bump the times.
"""

from __future__ import annotations

import os
import stat

from .backup import Entry, Kind

__all__ = ["DestWriter", "DestError"]

O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class DestError(Exception):
    """DEST itself is unusable (fatal for the whole run)."""


def _err(e: OSError, what: str) -> str:
    return f"{what}: {e.strerror or e}"


class DestWriter:
    """Creates the restored tree below `dest` (bytes path)."""

    def __init__(self, dest: str | os.PathLike[str], *, dry: bool) -> None:
        self.dest = os.fsencode(os.fspath(dest))
        self.dry = dry
        self.root = os.geteuid() == 0
        self._dirs: list[tuple[bytes, Entry]] = []

    def prepare(self) -> None:
        """DEST must be absent or an empty directory: a restore never merges."""
        if self.dry:
            return
        try:
            os.mkdir(self.dest, 0o700)
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise DestError(_err(e, f"cannot create {os.fsdecode(self.dest)}")) from None
        if not os.path.isdir(self.dest) or os.path.islink(self.dest):
            raise DestError(f"{os.fsdecode(self.dest)} exists and is not a directory")
        if os.listdir(self.dest):
            raise DestError(f"{os.fsdecode(self.dest)} is not empty")

    def path(self, parent: bytes, name: bytes) -> bytes:
        return os.path.join(parent, name)

    def mkdir(self, path: bytes, entry: Entry) -> None:
        if not self.dry and path != self.dest:
            os.mkdir(path, 0o700)
        self._dirs.append((path, entry))

    def create(self, path: bytes) -> int | None:
        """An empty regular file open for writing (None when dry)."""
        if self.dry:
            return None
        return os.open(path, O_FLAGS, 0o600)

    def write_at(self, fd: int | None, offset: int, data: bytes | memoryview) -> None:
        if fd is None:
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def close(self, fd: int | None, size: int, *, ok: bool, path: bytes) -> None:
        """Give the file its final size (holes at the end stay holes), or remove it."""
        if fd is None:
            return
        try:
            if ok:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
            if not ok:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def symlink(self, target: bytes, path: bytes) -> None:
        if not self.dry:
            os.symlink(target, path)

    def special(self, entry: Entry, path: bytes) -> None:
        """Fifos, sockets and (as root) device nodes."""
        if entry.kind in (Kind.CHR, Kind.BLK) and not self.root:
            raise PermissionError(1, "device nodes can only be restored by root")
        if self.dry:
            return
        if entry.kind is Kind.FIFO:
            os.mkfifo(path, 0o600)
            return
        fmt = {Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK, Kind.SOCK: stat.S_IFSOCK}[entry.kind]
        os.mknod(path, fmt | 0o600, os.makedev(*entry.rdev))

    def link(self, existing: bytes, path: bytes) -> None:
        if not self.dry:
            os.link(existing, path, follow_symlinks=False)

    def metadata(self, path: bytes, entry: Entry, xattrs: dict[bytes, bytes]) -> list[str]:
        """Owner, attributes, mode and times of a non-directory; the failures as text."""
        if entry.kind is Kind.DIR:
            return []
        return self._metadata(path, entry, xattrs)

    def _metadata(self, path: bytes, entry: Entry, xattrs: dict[bytes, bytes]) -> list[str]:
        if self.dry:
            return []
        failures: list[str] = []
        link = entry.kind is Kind.SYMLINK
        if self.root:
            try:
                os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
            except OSError as e:
                failures.append(_err(e, "owner"))
        for name, value in xattrs.items():
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as e:
                failures.append(_err(e, f"xattr {os.fsdecode(name)}"))
        if not link:
            try:
                os.chmod(path, entry.mode)
            except OSError as e:
                failures.append(_err(e, "mode"))
        atime = entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns
        try:
            os.utime(path, ns=(atime, entry.mtime_ns), follow_symlinks=False)
        except OSError as e:
            failures.append(_err(e, "times"))
        return failures

    def finish_dirs(self, xattrs_of: dict[bytes, dict[bytes, bytes]]) -> list[tuple[Entry, str]]:
        """Directory metadata, deepest first; the failures per entry."""
        out: list[tuple[Entry, str]] = []
        for path, entry in reversed(self._dirs):
            for failure in self._metadata(path, entry, xattrs_of.get(path, {})):
                out.append((entry, failure))
        self._dirs.clear()
        return out
