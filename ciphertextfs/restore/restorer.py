"""The restore driver: backup entries in, decrypted tree (or a verdict) out.

Entries arrive parents first.  Each directory remembers what its children
need (DEST path, filenames key, block size, side file); a directory that
cannot be restored takes its whole subtree with it, counted under its own
message.

The backup is read in one pass.  A side file that comes before the entries
needing it (format 2 puts it first in every directory) is read from the
stream; otherwise (format 1 archives) it is asked of the backup, which finds
it in a tree or a seekable archive.  Only the side files of the directories
on the current path are kept, so memory does not grow with their number.

A backup that lost its user.fscrypt.* xattrs cannot be restored, and is
recognised by what remains: no-key names, side files and `fscrypt:`
symlinks without any such xattr, or an entry without a context inside an
encrypted directory.  Every such entry is counted as not restored.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field

from ciphertextfs.fscrypt.crypto import decrypt_contents
from ciphertextfs.fscrypt.errors import FscryptError, KeyMissingError
from ciphertextfs.fscrypt.fname import decrypt_filename, decrypt_symlink, encrypt_filename
from ciphertextfs.fscrypt.keysetup import FileKey, derive_file_key
from ciphertextfs.fscrypt.policy import FscryptContext
from ciphertextfs.restore import DEFAULT_BLOCK_SIZE
from ciphertextfs.viewformat import (
    SIDE_FILE_HEADER,
    SIDE_FILE_MAX,
    SIDE_FILE_NAME,
    XATTR_FSCRYPT_CONTEXT,
    FormatError,
    FscryptAttrs,
    SideFile,
    decode_side_file,
    decode_symlink,
    decode_xattrs,
    has_fscrypt_xattrs,
    is_encrypted_symlink_target,
    original_xattrs,
)

from .backup import ArchiveDamage, Backup, Entry, Kind, Path_, TreeProblem, show_path
from .keys import KeyRing, key_label
from .plan import RestoreProblem, check_plain_name, ciphertext_name, looks_nokey
from .report import Report
from .tarstream import read_up_to
from .writer import DestWriter, Where

__all__ = ["Restorer", "Interrupted", "CHUNK"]

CHUNK = 4 * 1024 * 1024  # bytes read and decrypted at a time: many data units
_ZERO = bytes(65536)
COPY_HOLE_UNIT = 4096
"""All-zero runs of an unencrypted file this long become holes: a common block
size of DEST (shorter runs could not be holes there anyway)."""

_SIDE_WITHOUT_CONTEXT = (
    "a side file with long names, but its directory has no user.fscrypt.context: "
    "the directory's xattrs were lost (copied without rsync -X or tar --xattrs?)"
)
LOST_XATTRS = (
    "this backup has lost its xattrs: was it made with rsync -a without -X, "
    "or tar without --xattrs (at create or at extract), or cpio?"
)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop reading the backup, finish what was restored."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _MissingKey(Exception):
    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


@dataclass
class _Dir:
    """What the children of one backup directory need."""

    dest: Where | None = None
    name_key: FileKey | None = None
    encrypted: bool = False
    side: SideFile | None = None
    side_loaded: bool = False
    block_size: int | None = None
    # Why the children cannot be restored: ("key", label) or ("problem", index).
    failed: tuple[str, object] | None = None


@dataclass
class _DirProblem:
    path: Path_
    reason: str
    below: int = 0


@dataclass
class Restorer:
    backup: Backup
    writer: DestWriter
    keys: KeyRing
    report: Report
    block_size: int = DEFAULT_BLOCK_SIZE
    _dirs: dict[Path_, _Dir] = field(default_factory=dict)
    _links: dict[object, Where] = field(default_factory=dict)
    _dir_problems: list[_DirProblem] = field(default_factory=list)
    _dir_xattrs: dict[Where, dict[bytes, bytes]] = field(default_factory=dict)
    _with_side: set[Path_] = field(default_factory=set)
    _fscrypt_seen: bool = False
    _evidence: int = 0
    _nokey_restored: list[Path_] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    """Signals received (appended by a handler): the run stops at the next
    entry or chunk, where nothing is left half done."""

    def _check_stop(self) -> None:
        if self.signals:
            raise Interrupted(self.signals[0])

    def run(self, *, verify: bool) -> int:
        self.writer.prepare()
        interrupted: Interrupted | None = None
        try:
            try:
                for item in self.backup.entries():
                    self._check_stop()
                    if isinstance(item, ArchiveDamage):
                        self.report.damage(item.reason)
                        continue
                    if isinstance(item, TreeProblem):
                        self._fail_path(item.path, item.reason)
                        continue
                    self._forget_sides(item.path[:-1])
                    if has_fscrypt_xattrs(item.xattrs):
                        self._fscrypt_seen = True
                    self._entry(item)
                self._lost_xattrs_verdict()
            except Interrupted as sig:
                # What was restored keeps its directory metadata; the rest
                # of the backup is not read, and the summary says so.
                interrupted = sig
            finally:
                # Every directory restored gets its metadata, however reading ended.
                for entry, failure in self.writer.finish_dirs(self._dir_xattrs):
                    self.report.problem(entry.path, f"restored without its {failure}")
        finally:
            self.writer.close_all()
        for p in self._dir_problems:
            self.report.problem(p.path, p.reason, p.below)
        self.report.left_out(self.writer.left_out, self.writer.dest_owner)
        unused = [
            f"key {src} (v2 identifier {k.identifier.hex()}, v1 descriptor "
            f"{k.descriptor.hex()}) matched no entry"
            for src, k in self.keys.unused()
        ]
        if interrupted is not None:
            self.report.interrupted(interrupted.signum)
        return self.report.finish(verify=verify, unused_keys=unused)

    # -- bookkeeping ------------------------------------------------------

    def _forget_sides(self, parent: Path_) -> None:
        """Drop the side files of directories the walk has left."""
        if not self._with_side:
            return
        for p in [p for p in self._with_side if parent[: len(p)] != p]:
            state = self._dirs.get(p)
            if state is not None:
                state.side = None
                state.side_loaded = False
            self._with_side.discard(p)

    def _lost_xattrs_verdict(self) -> None:
        """A tree that looks encrypted but has no user.fscrypt.* xattr at all."""
        if self._fscrypt_seen or not (self._evidence or self._nokey_restored):
            return
        n = len(self._nokey_restored)
        what = f"{n} entr{'y' if n == 1 else 'ies'} with no-key names copied as ciphertext"
        self.report.problem((), f"{LOST_XATTRS} ({what}, counted as not restored)")
        # Those entries were counted as restored when they went by.
        self.report.restored -= n
        self.report.failed += max(n - 1, 0)

    def _fail_path(self, path: Path_, reason: str) -> None:
        parent = self._dirs.get(path[:-1]) if path else None
        if parent is not None and parent.failed is not None:
            self._count_under(parent, path)
        else:
            self.report.problem(path, reason)

    def _count_under(self, parent: _Dir, path: Path_) -> None:
        kind, what = parent.failed  # type: ignore[misc]
        if kind == "key":
            self.report.missing_key(str(what), path)
        else:
            self._dir_problems[what].below += 1  # type: ignore[index]

    def _fail_dir(self, path: Path_, state: _Dir, reason: str) -> None:
        state.failed = ("problem", len(self._dir_problems))
        self._dir_problems.append(_DirProblem(path, reason))

    # -- one entry --------------------------------------------------------

    def _entry(self, e: Entry) -> None:
        parent = self._dirs.get(e.path[:-1]) if e.path else None
        if e.path and parent is None:
            if e.kind is Kind.DIR:
                self._dirs[e.path] = _Dir(encrypted=_encrypted(e))
                self._dirs[e.path].failed = ("problem", len(self._dir_problems))
                self._dir_problems.append(
                    _DirProblem(e.path, "its parent directory is missing from the backup")
                )
            else:
                self.report.problem(e.path, "its parent directory is missing from the backup")
            return
        if parent is not None and parent.failed is not None:
            if e.kind is Kind.DIR:
                self._dirs[e.path] = _Dir(failed=parent.failed, encrypted=_encrypted(e))
            if not (parent.encrypted and e.name == SIDE_FILE_NAME):
                self._count_under(parent, e.path)
            return
        if parent is not None and e.name == SIDE_FILE_NAME and e.kind is Kind.REG:
            try:
                e = self._side_entry(e, parent)
            except (RestoreProblem, FormatError) as err:
                self.report.problem(e.path, str(err))
                return
            except OSError as err:
                self.report.problem(e.path, f"side file unreadable: {err.strerror or err}")
                return
            if e is None:
                return  # the side file is read with its directory, never restored
        try:
            self._check_not_lost(e, parent)
            dest = self._dest_path(e, parent)
            if e.kind is Kind.DIR:
                self._directory(e, dest)
            else:
                self._non_directory(e, dest)
        except _MissingKey as mk:
            if e.kind is Kind.DIR:
                self._dirs[e.path] = _Dir(failed=("key", mk.label), encrypted=_encrypted(e))
            self.report.missing_key(mk.label, e.path)
        except (RestoreProblem, FscryptError, FormatError) as err:
            self._problem(e, str(err))
        except OSError as err:
            self._problem(e, f"{err.strerror or err}")

    def _check_not_lost(self, e: Entry, parent: _Dir | None) -> None:
        """Refuse what lost its context, and note what looks encrypted without one."""
        if parent is None:
            return
        if e.kind is Kind.REG and e.open is None and e.link_key is not None:
            return  # a tar hard link member: the context travels with the first name
        has_ctx = XATTR_FSCRYPT_CONTEXT in e.xattrs
        if parent.encrypted:
            if not has_ctx and e.kind in (Kind.REG, Kind.DIR):
                raise RestoreProblem(
                    "no user.fscrypt.context inside an encrypted directory: its xattrs "
                    "were lost (copied without rsync -X or tar --xattrs?)"
                )
            return
        if e.kind is Kind.SYMLINK and e.target and is_encrypted_symlink_target(e.target):
            self._evidence += 1
        if looks_nokey(e.name):
            if has_ctx:
                raise RestoreProblem(
                    "a no-key name in a directory without user.fscrypt.context: the "
                    "directory's xattrs were lost (copied without rsync -X or tar --xattrs?)"
                )
            self._nokey_restored.append(e.path)

    def _side_entry(self, e: Entry, parent: _Dir) -> Entry | None:
        """Read a side file from the stream; None when it is one, else the entry to restore.

        In an unencrypted directory the name is an ordinary user file unless
        it starts with the format-2 header (long symlinks renamed out of
        their directory); a format-1 side file there means the directory
        lost its context.
        """
        if e.size > SIDE_FILE_MAX:
            raise RestoreProblem(f"side file of {e.size} bytes is too large")
        assert e.open is not None
        src = e.open()
        try:
            head = read_up_to(src, len(SIDE_FILE_HEADER))
            if not parent.encrypted and head != SIDE_FILE_HEADER:
                if e.size > 65536:
                    keep, src = src, None
                    return dataclasses.replace(e, open=lambda: _Prefixed(head, keep))
                data = head + src.read(SIDE_FILE_MAX)
                side = decode_side_file(data)
                if side.names and not side.damaged:
                    self._evidence += 1
                    raise RestoreProblem(_SIDE_WITHOUT_CONTEXT)
                return dataclasses.replace(e, open=lambda: io.BytesIO(data))
            data = head + src.read(SIDE_FILE_MAX + 1 - len(head))
        finally:
            if src is not None:
                src.close()
        side = decode_side_file(data)
        if not parent.side_loaded or parent.side is None:
            parent.side = side
            parent.side_loaded = True
            self._with_side.add(e.path[:-1])
        if not parent.encrypted:
            self._evidence += 1
            if side.names:
                raise RestoreProblem(_SIDE_WITHOUT_CONTEXT)
        if side.damaged:
            raise RestoreProblem(
                f"damaged side file: {side.damaged} unreadable line"
                f"{'' if side.damaged == 1 else 's'}; the entries that need them are "
                "reported on their own"
            )
        return None

    def _side(self, path: Path_, state: _Dir) -> SideFile | None:
        """The side file of a directory: from the stream, else asked of the backup."""
        if not state.side_loaded:
            state.side_loaded = True
            data = self.backup.side_file(path)
            state.side = decode_side_file(data) if data is not None else None
            self._with_side.add(path)
        return state.side

    def _problem(self, e: Entry, reason: str) -> None:
        if e.kind is Kind.DIR:
            state = self._dirs.setdefault(e.path, _Dir(encrypted=_encrypted(e)))
            self._fail_dir(e.path, state, reason)
        else:
            self.report.problem(e.path, reason)

    def _dest_path(self, e: Entry, parent: _Dir | None) -> Where:
        if parent is None:
            return self.writer.dest
        assert parent.dest is not None
        if not parent.encrypted:
            return self.writer.path(parent.dest, e.name)
        ct = _long_name(e.name, lambda: self._side(e.path[:-1], parent))
        assert parent.name_key is not None
        try:
            plain = decrypt_filename(parent.name_key, ct)
        except FscryptError as err:
            raise RestoreProblem(f"name does not decrypt: {err}") from None
        check_plain_name(plain)
        # CTS names carry no MAC; re-encrypting at least catches plaintexts
        # whose NUL padding the kernel could never have written.
        if encrypt_filename(parent.name_key, plain) != ct:
            raise RestoreProblem(
                f"name decrypts to {plain[:64]!r}, whose padding does not re-encrypt "
                "to the stored name (tampered name or wrong key)"
            )
        return self.writer.path(parent.dest, plain)

    def _master(self, ctx: FscryptContext):
        master = self.keys.lookup(ctx)
        if master is None:
            raise _MissingKey(key_label(ctx))
        return master

    def _key(
        self,
        ctx: FscryptContext,
        *,
        ino: int | None,
        fs_uuid: bytes | None,
        names: bool,
        block_size: int | None = None,
    ) -> FileKey:
        master = self._master(ctx)
        try:
            return derive_file_key(
                master, ctx, ino=ino, fs_uuid=fs_uuid, for_filenames=names, block_size=block_size
            )
        except KeyMissingError as err:
            raise RestoreProblem(f"{key_label(ctx)}: {err}") from None

    def _directory(self, e: Entry, dest: Where) -> None:
        attrs = decode_xattrs(e.xattrs, regular=False)
        parent = self._dirs.get(e.path[:-1]) if e.path else None
        inherited = parent.block_size if parent is not None else None
        state = _Dir(dest=dest, block_size=attrs.block_size or inherited)
        if attrs.context is not None:
            state.encrypted = True
            state.name_key = self._key(
                attrs.context, ino=attrs.ino, fs_uuid=attrs.fs_uuid, names=True
            )
        self.writer.mkdir(dest, e)
        self._dirs[e.path] = state
        self._dir_xattrs[dest] = original_xattrs(e.xattrs)
        self.report.done()

    def _non_directory(self, e: Entry, dest: Where) -> None:
        if e.link_key is not None and e.link_key in self._links:
            self.writer.link(self._links[e.link_key], dest)
            self.report.done()
            return
        if e.kind is Kind.REG and e.open is None:
            target = show_path(e.link_key[1]) if isinstance(e.link_key, tuple) else "?"
            raise RestoreProblem(f"hard link to {target}, which was not restored")
        if e.kind is Kind.REG:
            self._regular(e, dest)
        elif e.kind is Kind.SYMLINK:
            self.writer.symlink(self._symlink_target(e), dest)
        elif not self.writer.special(e, dest):
            return  # left out by choice, counted by the writer
        failures = self.writer.metadata(dest, e, original_xattrs(e.xattrs))
        if e.link_key is not None:
            self._links[e.link_key] = dest
        if failures:
            self.report.problem(e.path, "restored without its " + "; ".join(failures))
            return
        self.report.done()

    def _symlink_target(self, e: Entry) -> bytes:
        assert e.target is not None
        parent = self._dirs.get(e.path[:-1])
        inside = parent is not None and parent.encrypted
        if not is_encrypted_symlink_target(e.target) and not inside:
            return e.target
        try:
            side = self._side(e.path[:-1], parent) if parent is not None else None
            link = decode_symlink(e.target, side)
        except FormatError as err:
            if not inside:
                # An encrypted symlink can be renamed out of its directory; a
                # plain target that merely looks like the format keeps its text.
                return e.target
            raise RestoreProblem(f"encrypted symlink: {err}") from None
        key = self._key(link.context, ino=link.ino, fs_uuid=link.fs_uuid, names=True)
        try:
            target = decrypt_symlink(key, link.ciphertext)
        except FscryptError as err:
            raise RestoreProblem(f"symlink target does not decrypt: {err}") from None
        if b"\0" in target or not target:
            raise RestoreProblem("symlink target decrypts to an impossible target")
        return target

    def _regular(self, e: Entry, dest: Where) -> None:
        """Write a regular file's contents; its bytes are counted as they are written."""
        attrs = decode_xattrs(e.xattrs, regular=True)
        if attrs.context is None:
            self._copy(e, dest)
        else:
            self._decrypt(e, dest, attrs)

    def _copy(self, e: Entry, dest: Where) -> None:
        """An unencrypted file: copied, with all-zero blocks left as holes."""
        assert e.open is not None
        fd = self.writer.create(dest)
        ok = False
        try:
            with e.open() as src:
                offset = 0
                while True:
                    self._check_stop()
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    self._write_sparse(fd, offset, chunk, COPY_HOLE_UNIT)
                    offset += len(chunk)
                    self.report.add_bytes(len(chunk))
            ok = True
        finally:
            self.writer.close(fd, offset if ok else 0, ok=ok, path=dest)

    def _write_sparse(self, fd: int | None, offset: int, data: bytes, unit: int) -> None:
        mv = memoryview(data)
        zero = _ZERO[:unit]
        start = None
        for off in range(0, len(mv), unit):
            piece = mv[off : off + unit]
            if piece == zero[: len(piece)]:
                if start is not None:
                    self.writer.write_at(fd, offset + start, mv[start:off])
                    start = None
            elif start is None:
                start = off
        if start is not None:
            self.writer.write_at(fd, offset + start, mv[start:])

    def _decrypt(self, e: Entry, dest: Where, attrs: FscryptAttrs) -> None:
        """Stream the ciphertext through the file key; all-zero units stay holes."""
        assert e.open is not None and attrs.size is not None and attrs.context is not None
        ctx = attrs.context
        parent = self._dirs.get(e.path[:-1])
        block_size = attrs.block_size or (parent and parent.block_size) or self.block_size
        size = attrs.size
        try:
            need = ctx.ciphertext_size(size, block_size)
        except FscryptError as err:
            raise RestoreProblem(str(err)) from None
        if e.size < need:
            raise RestoreProblem(
                f"truncated: {e.size} bytes of ciphertext in the backup, size {size} needs {need}"
            )
        key = self._key(
            ctx, ino=attrs.ino, fs_uuid=attrs.fs_uuid, names=False, block_size=block_size
        )
        dus = ctx.data_unit_size(block_size)
        chunk_size = max(CHUNK // dus, 1) * dus
        zero = _ZERO[:dus]
        fd = self.writer.create(dest)
        ok = False
        try:
            with e.open() as src:
                offset = 0
                while offset < need:
                    self._check_stop()
                    chunk = src.read(min(chunk_size, need - offset))
                    if not chunk:
                        raise RestoreProblem(f"backup file ended after {offset} bytes")
                    if len(chunk) < min(chunk_size, need - offset):
                        chunk += _read_exact(src, min(chunk_size, need - offset) - len(chunk))
                    self._decrypt_chunk(fd, key, offset, chunk, dus, zero, size)
                    offset += len(chunk)
                    self.report.add_bytes(min(len(chunk), max(size - (offset - len(chunk)), 0)))
            ok = True
        finally:
            self.writer.close(fd, size, ok=ok, path=dest)

    def _decrypt_chunk(
        self,
        fd: int | None,
        key: FileKey,
        offset: int,
        chunk: bytes,
        dus: int,
        zero: bytes,
        size: int,
    ) -> None:
        mv = memoryview(chunk)
        first = offset // dus
        start = None
        n = len(mv)
        for off in [*range(0, n, dus), n]:
            piece = mv[off : off + dus] if off < n else None
            if piece is None or piece == zero[: len(piece)]:
                if start is not None:
                    end = min(offset + off, size)
                    if end > offset + start:
                        plain = decrypt_contents(
                            key, mv[start:off], first + start // dus, holes=False
                        )
                        self.writer.write_at(
                            fd, offset + start, memoryview(plain)[: end - offset - start]
                        )
                    start = None
            elif start is None:
                start = off


def _encrypted(e: Entry) -> bool:
    """Whether the children of a directory entry have no-key names."""
    return XATTR_FSCRYPT_CONTEXT in e.xattrs


def _read_exact(src, n: int) -> bytes:
    data = read_up_to(src, n)
    if len(data) < n:
        raise RestoreProblem("backup file shorter than its size")
    return data


def _long_name(name: bytes, side) -> bytes:
    """The ciphertext of a no-key name; the side file is fetched only for a long one."""
    try:
        return ciphertext_name(name, None)
    except RestoreProblem:
        loaded = side()
        if loaded is None:
            raise
        return ciphertext_name(name, loaded)


class _Prefixed:
    """A reader that gives back bytes already read, then the rest of `src`."""

    def __init__(self, head: bytes, src) -> None:
        self.head, self.src = head, src

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head[:n] if n >= 0 else self.head, b""
            if n >= 0 and len(out) < n:
                out += self.src.read(n - len(out))
            elif n < 0:
                out += self.src.read()
            return out
        return self.src.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        close = getattr(self.src, "close", None)
        if close is not None:
            close()
