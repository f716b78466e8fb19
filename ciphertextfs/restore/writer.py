"""Everything a restore does to DEST, and nothing else.

DEST is a directory fd, never a path: a user who can rename things in or
above DEST (its parent's owner, or DEST's own when it existed) must not
steer a restore running as root anywhere else.  Every directory below DEST
is reached from DEST's fd one component at a time with O_NOFOLLOW, and is
checked to be the very directory this restore created; every file is
created with O_EXCL | O_NOFOLLOW in such a directory and given its metadata
through its own fd; symlinks and special files get theirs with the
AT_SYMLINK_NOFOLLOW variants.

The same interface with `dry=True` is the verify mode: the restore
decrypts and checks everything but this class writes nothing.  Directory
modes, times and attributes are set last (deepest first): a default ACL set
early would be inherited by what is restored inside, a read-only mode would
stop the restore, and creating entries would bump the times.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import resource
import stat
from collections import Counter
from dataclasses import dataclass, field

from .backup import Entry, Kind

__all__ = ["DestWriter", "DestError", "Privileges", "Where", "PRIVILEGED_XATTRS"]

O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SETID_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

#: xattr namespaces that grant privilege (file capabilities, LSM labels,
#: trusted.* which only root reads and writes).
PRIVILEGED_XATTRS = (b"security.", b"trusted.")

Where = tuple[bytes, ...]
"""A place below DEST: the names from DEST down, () being DEST itself."""


class DestError(Exception):
    """DEST itself is unusable (fatal for the whole run)."""


def _err(e: OSError, what: str) -> str:
    return f"{what}: {e.strerror or e}"


@dataclass
class Privileges:
    """Which privilege-granting attributes a restore gives back.

    None means "the default": on when running as root into a DEST owned
    by root, off otherwise (see `resolve`).  Include patterns name xattrs
    to restore (all when empty); a privileged xattr an include pattern names
    is restored even when the privileged namespaces are off.
    """

    owner: bool | None = None
    setid: bool | None = None
    devices: bool | None = None
    privileged_xattrs: bool | None = None
    xattrs_include: list[str] = field(default_factory=list)
    xattrs_exclude: list[str] = field(default_factory=list)

    def resolve(self, privileged: bool) -> Privileges:
        pick = lambda v: privileged if v is None else v  # noqa: E731
        return Privileges(
            pick(self.owner),
            pick(self.setid),
            pick(self.devices),
            pick(self.privileged_xattrs),
            list(self.xattrs_include),
            list(self.xattrs_exclude),
        )

    def xattr_wanted(self, name: bytes) -> bool:
        text = os.fsdecode(name)
        if any(fnmatch.fnmatchcase(text, p) for p in self.xattrs_exclude):
            return False
        named = any(fnmatch.fnmatchcase(text, p) for p in self.xattrs_include)
        if self.xattrs_include and not named:
            return False
        if name.startswith(PRIVILEGED_XATTRS):
            return bool(self.privileged_xattrs) or named
        return True


class DestWriter:
    """Creates the restored tree below `dest`."""

    def __init__(
        self, dest: str | os.PathLike[str], *, dry: bool, privileges: Privileges | None = None
    ) -> None:
        self.dest_path = os.fsencode(os.fspath(dest))
        self.dest: Where = ()
        self.dry = dry
        self.root = os.geteuid() == 0
        self.requested = privileges or Privileges()
        self.privileges = self.requested.resolve(self.root)
        self.dest_owner: int | None = None
        self.left_out: Counter[str] = Counter()
        self._dirs: list[tuple[Where, Entry]] = []
        self._ids: dict[Where, tuple[int, int]] = {}
        # Open directory fds from DEST down to the directory used last:
        # entries come depth first, so this is nearly always a hit.
        self._chain: list[tuple[bytes, int]] = []
        self._root_fd: int | None = None
        self._pending: tuple[Where, int] | None = None

    # -- DEST itself --------------------------------------------------------

    def prepare(self) -> None:
        """DEST must be absent or an empty directory: a restore never merges."""
        if self.dry:
            return
        _raise_fd_limit()
        show = os.fsdecode(self.dest_path)
        head, name = os.path.split(self.dest_path.rstrip(b"/") or b"/")
        try:
            if name in (b"", b".", b".."):
                fd = os.open(self.dest_path, O_DIR & ~os.O_NOFOLLOW)
            else:
                pfd = os.open(head or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    parent_owner = os.fstat(pfd).st_uid
                    created = True
                    try:
                        os.mkdir(name, 0o700, dir_fd=pfd)
                    except FileExistsError:
                        created = False
                    try:
                        fd = os.open(name, O_DIR, dir_fd=pfd)
                    except OSError as e:
                        if e.errno in (errno.ELOOP, errno.ENOTDIR):
                            raise DestError(f"{show} exists and is not a directory") from None
                        raise
                finally:
                    os.close(pfd)
                if created:
                    self.dest_owner = parent_owner
        except OSError as e:
            raise DestError(_err(e, f"cannot open {show}")) from None
        if os.listdir(fd):
            os.close(fd)
            raise DestError(f"{show} is not empty")
        st = os.fstat(fd)
        if self.dest_owner is None:
            self.dest_owner = st.st_uid
        self._root_fd = fd
        self._ids[()] = (st.st_dev, st.st_ino)
        self.privileges = self.requested.resolve(self.root and self.dest_owner == 0)

    def close_all(self) -> None:
        self._drop_pending()
        for _, fd in self._chain:
            os.close(fd)
        self._chain.clear()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # -- directory fds --------------------------------------------------------

    def _dir_fd(self, where: Where) -> int:
        """An fd of the directory `where`, reached without following symlinks."""
        assert self._root_fd is not None
        keep = 0
        while keep < len(self._chain) and keep < len(where) and self._chain[keep][0] == where[keep]:
            keep += 1
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]
        for depth in range(keep, len(where)):
            parent = self._chain[-1][1] if self._chain else self._root_fd
            fd = _open_checked(parent, where[depth], self._ids.get(where[: depth + 1]))
            self._chain.append((where[depth], fd))
        return self._chain[-1][1] if where else self._root_fd

    def _parent(self, where: Where) -> tuple[int, bytes]:
        return self._dir_fd(where[:-1]), where[-1]

    def path(self, parent: Where, name: bytes) -> Where:
        return parent + (name,)

    # -- creating -----------------------------------------------------------

    def mkdir(self, where: Where, entry: Entry) -> None:
        if not self.dry and where:
            pfd, name = self._parent(where)
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = _open_checked(pfd, name, None)
            st = os.fstat(fd)
            self._ids[where] = (st.st_dev, st.st_ino)
            self._chain.append((name, fd))
        self._dirs.append((where, entry))

    def create(self, where: Where) -> int | None:
        """An empty regular file open for writing (None when dry)."""
        if self.dry:
            return None
        self._drop_pending()
        pfd, name = self._parent(where)
        return os.open(name, O_FLAGS, 0o600, dir_fd=pfd)

    def write_at(self, fd: int | None, offset: int, data: bytes | memoryview) -> None:
        if fd is None:
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def close(self, fd: int | None, size: int, *, ok: bool, path: Where) -> None:
        """Give the file its final size (holes at the end stay holes), or remove it.

        A complete file stays open until `metadata` has set its owner, mode
        and attributes through the same fd.
        """
        if fd is None:
            return
        try:
            if ok:
                os.ftruncate(fd, size)
                self._pending = (path, fd)
                return
        except BaseException:
            ok = False
            raise
        finally:
            if not ok:
                os.close(fd)
                try:
                    pfd, name = self._parent(path)
                    os.unlink(name, dir_fd=pfd)
                except OSError:
                    pass

    def _drop_pending(self) -> None:
        if self._pending is not None:
            os.close(self._pending[1])
            self._pending = None

    def symlink(self, target: bytes, where: Where) -> None:
        if not self.dry:
            pfd, name = self._parent(where)
            os.symlink(target, name, dir_fd=pfd)

    def special(self, entry: Entry, where: Where) -> bool:
        """Fifos, sockets and (as root) device nodes; False when left out by choice."""
        if entry.kind in (Kind.CHR, Kind.BLK):
            if not self.privileges.devices:
                self.left_out["device nodes"] += 1
                return False
            if not self.root:
                raise PermissionError(1, "device nodes can only be restored by root")
        if self.dry:
            return True
        pfd, name = self._parent(where)
        if entry.kind is Kind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
            return True
        fmt = {Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK, Kind.SOCK: stat.S_IFSOCK}[entry.kind]
        os.mknod(name, fmt | 0o600, os.makedev(*entry.rdev), dir_fd=pfd)
        return True

    def link(self, existing: Where, where: Where) -> None:
        if self.dry:
            return
        src = _walk(self._root_fd, existing[:-1], self._ids)  # type: ignore[arg-type]
        try:
            pfd, name = self._parent(where)
            os.link(existing[-1], name, src_dir_fd=src, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if src != self._root_fd:
                os.close(src)

    # -- metadata -------------------------------------------------------------

    def metadata(self, where: Where, entry: Entry, xattrs: dict[bytes, bytes]) -> list[str]:
        """Owner, attributes, mode and times of a non-directory; the failures as text."""
        if entry.kind is Kind.DIR or self.dry:
            return []
        if entry.kind is Kind.REG:
            pending, self._pending = self._pending, None
            if pending is None or pending[0] != where:
                if pending is not None:
                    os.close(pending[1])
                return ["contents: file not open"]
            try:
                return self._metadata(_Fd(pending[1]), entry, xattrs)
            finally:
                os.close(pending[1])
        pfd, name = self._parent(where)
        return self._metadata(_At(pfd, name), entry, xattrs)

    def _metadata(self, obj: _Fd | _At, entry: Entry, xattrs: dict[bytes, bytes]) -> list[str]:
        failures: list[str] = []
        link = entry.kind is Kind.SYMLINK
        priv = self.privileges
        if self.root and priv.owner:
            try:
                obj.chown(entry.uid, entry.gid)
            except OSError as e:
                failures.append(_err(e, "owner"))
        elif (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
            self.left_out["owners"] += 1
        for name, value in xattrs.items():
            if not priv.xattr_wanted(name):
                self.left_out["xattrs"] += 1
                continue
            try:
                obj.setxattr(name, value)
            except OSError as e:
                failures.append(_err(e, f"xattr {os.fsdecode(name)}"))
        if not link:
            mode = entry.mode
            if mode & SETID_BITS and not priv.setid:
                mode &= ~SETID_BITS
                self.left_out["set-id/sticky modes"] += 1
            try:
                obj.chmod(mode)
            except OSError as e:
                failures.append(_err(e, "mode"))
        atime = entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns
        try:
            obj.utime(atime, entry.mtime_ns)
        except OSError as e:
            failures.append(_err(e, "times"))
        return failures

    def finish_dirs(self, xattrs_of: dict[Where, dict[bytes, bytes]]) -> list[tuple[Entry, str]]:
        """Directory metadata, deepest first; the failures per entry."""
        out: list[tuple[Entry, str]] = []
        if self.dry:
            self._dirs.clear()
            return out
        self._drop_pending()
        for where, entry in reversed(self._dirs):
            try:
                fd = self._dir_fd(where)
            except OSError as e:
                out.append((entry, _err(e, "metadata")))
                continue
            for failure in self._metadata(_Fd(fd), entry, xattrs_of.get(where, {})):
                out.append((entry, failure))
        self._dirs.clear()
        return out


class _Fd:
    """Metadata calls on an open file or directory."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def chown(self, uid: int, gid: int) -> None:
        os.fchown(self.fd, uid, gid)

    def setxattr(self, name: bytes, value: bytes) -> None:
        os.setxattr(self.fd, name, value)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    def utime(self, atime: int, mtime: int) -> None:
        os.utime(self.fd, ns=(atime, mtime))


class _At:
    """Metadata calls on a name in a directory fd, never following a symlink."""

    def __init__(self, dir_fd: int, name: bytes) -> None:
        self.dir_fd, self.name = dir_fd, name

    def chown(self, uid: int, gid: int) -> None:
        os.chown(self.name, uid, gid, dir_fd=self.dir_fd, follow_symlinks=False)

    def setxattr(self, name: bytes, value: bytes) -> None:
        # No l*xattrat in Python: the directory is reached through its fd's
        # /proc link, and the last component is never followed.
        path = b"/proc/self/fd/%d/%s" % (self.dir_fd, self.name)
        os.setxattr(path, name, value, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        os.chmod(self.name, mode, dir_fd=self.dir_fd, follow_symlinks=False)

    def utime(self, atime: int, mtime: int) -> None:
        os.utime(self.name, ns=(atime, mtime), dir_fd=self.dir_fd, follow_symlinks=False)


def _open_checked(parent: int, name: bytes, expect: tuple[int, int] | None) -> int:
    """Open a directory below `parent`, refusing symlinks and strangers."""
    fd = os.open(name, O_DIR, dir_fd=parent)
    if expect is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != expect:
            os.close(fd)
            raise OSError(errno.ESTALE, "directory was replaced during the restore")
    return fd


def _walk(root_fd: int, where: Where, ids: dict[Where, tuple[int, int]]) -> int:
    """A fresh fd of `where` (root_fd itself for ()), opened component by component."""
    fd = root_fd
    for depth in range(len(where)):
        try:
            nfd = _open_checked(fd, where[depth], ids.get(where[: depth + 1]))
        finally:
            if fd != root_fd:
                os.close(fd)
        fd = nfd
    return fd


def _raise_fd_limit() -> None:
    """One fd per level of the tree is held open: allow deep trees."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
