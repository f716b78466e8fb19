"""The restore driver: backup entries in, decrypted tree (or a verdict) out.

Entries arrive parents first.  Each directory remembers what its children
need (DEST path, filenames key, side file); a directory that cannot be
restored takes its whole subtree with it, counted under its own message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ciphertextfs.fscrypt.crypto import decrypt_contents
from ciphertextfs.fscrypt.errors import FscryptError, KeyMissingError
from ciphertextfs.fscrypt.fname import decrypt_filename, decrypt_symlink, encrypt_filename
from ciphertextfs.fscrypt.keysetup import FileKey, derive_file_key
from ciphertextfs.fscrypt.policy import FscryptContext
from ciphertextfs.view.format import SIDE_FILE_NAME, XATTR_FSCRYPT_CONTEXT, parse_side_file

from .backup import ArchiveDamage, Backup, Entry, Kind, Path_, TreeProblem, show_path
from .keys import KeyRing, key_label
from .plan import (
    FscryptAttrs,
    RestoreProblem,
    check_plain_name,
    ciphertext_name,
    fscrypt_attrs,
    original_xattrs,
    parse_symlink_target,
)
from .report import Report
from .writer import DestWriter

__all__ = ["Restorer", "DEFAULT_BLOCK_SIZE", "CHUNK"]

DEFAULT_BLOCK_SIZE = 4096
CHUNK = 4 * 1024 * 1024  # bytes read and decrypted at a time: many data units
_ZERO = bytes(65536)


class _MissingKey(Exception):
    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


@dataclass
class _Dir:
    """What the children of one backup directory need."""

    dest: bytes | None = None
    name_key: FileKey | None = None
    encrypted: bool = False
    side: dict[bytes, bytes] | None = None
    side_loaded: bool = False
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
    _links: dict[object, bytes] = field(default_factory=dict)
    _dir_problems: list[_DirProblem] = field(default_factory=list)
    _dir_xattrs: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)

    def run(self, *, verify: bool) -> int:
        self.writer.prepare()
        try:
            for item in self.backup.entries():
                if isinstance(item, ArchiveDamage):
                    self.report.damage(item.reason)
                elif isinstance(item, TreeProblem):
                    self._fail_path(item.path, item.reason)
                else:
                    self._entry(item)
        finally:
            # Every directory restored gets its metadata, however reading ended.
            for entry, failure in self.writer.finish_dirs(self._dir_xattrs):
                self.report.problem(entry.path, f"restored without its {failure}")
        for p in self._dir_problems:
            self.report.problem(p.path, p.reason, p.below)
        unused = [
            f"key {src} (v2 identifier {k.identifier.hex()}, v1 descriptor "
            f"{k.descriptor.hex()}) matched no entry"
            for src, k in self.keys.unused()
        ]
        return self.report.finish(verify=verify, unused_keys=unused)

    # -- bookkeeping ------------------------------------------------------

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
        if parent is not None and parent.encrypted and e.name == SIDE_FILE_NAME:
            return  # the side file is read with its directory, never restored
        try:
            dest = self._dest_path(e, parent)
            if e.kind is Kind.DIR:
                self._directory(e, dest)
            else:
                self._non_directory(e, dest)
        except _MissingKey as mk:
            if e.kind is Kind.DIR:
                self._dirs[e.path] = _Dir(failed=("key", mk.label), encrypted=_encrypted(e))
            self.report.missing_key(mk.label, e.path)
        except (RestoreProblem, FscryptError) as err:
            self._problem(e, str(err))
        except OSError as err:
            self._problem(e, f"{err.strerror or err}")

    def _problem(self, e: Entry, reason: str) -> None:
        if e.kind is Kind.DIR:
            state = self._dirs.setdefault(e.path, _Dir(encrypted=_encrypted(e)))
            self._fail_dir(e.path, state, reason)
        else:
            self.report.problem(e.path, reason)

    def _dest_path(self, e: Entry, parent: _Dir | None) -> bytes:
        if parent is None:
            return self.writer.dest
        assert parent.dest is not None
        if not parent.encrypted:
            return self.writer.path(parent.dest, e.name)
        if not parent.side_loaded:
            parent.side_loaded = True
            data = self.backup.side_file(e.path[:-1])
            parent.side = parse_side_file(data) if data is not None else None
        ct = ciphertext_name(e.name, parent.side)
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

    def _directory(self, e: Entry, dest: bytes) -> None:
        attrs = fscrypt_attrs(e.xattrs, regular=False)
        state = _Dir(dest=dest)
        if attrs is not None:
            state.encrypted = True
            state.name_key = self._key(
                attrs.context, ino=attrs.ino, fs_uuid=attrs.fs_uuid, names=True
            )
        self.writer.mkdir(dest, e)
        self._dirs[e.path] = state
        self._dir_xattrs[dest] = original_xattrs(e.xattrs)
        self.report.done()

    def _non_directory(self, e: Entry, dest: bytes) -> None:
        if e.link_key is not None and e.link_key in self._links:
            self.writer.link(self._links[e.link_key], dest)
            self.report.done()
            return
        if e.kind is Kind.REG and e.open is None:
            target = show_path(e.link_key[1]) if isinstance(e.link_key, tuple) else "?"
            raise RestoreProblem(f"hard link to {target}, which was not restored")
        nbytes = 0
        if e.kind is Kind.REG:
            nbytes = self._regular(e, dest)
        elif e.kind is Kind.SYMLINK:
            self.writer.symlink(self._symlink_target(e), dest)
        else:
            self.writer.special(e, dest)
        failures = self.writer.metadata(dest, e, original_xattrs(e.xattrs))
        if e.link_key is not None:
            self._links[e.link_key] = dest
        if failures:
            self.report.add_bytes(nbytes)
            self.report.problem(e.path, "restored without its " + "; ".join(failures))
            return
        self.report.done(nbytes)

    def _symlink_target(self, e: Entry) -> bytes:
        assert e.target is not None
        parent = self._dirs.get(e.path[:-1])
        inside = parent is not None and parent.encrypted
        if not inside:
            # An encrypted symlink can be renamed out of its directory; a plain
            # target that merely looks like the format keeps its text.
            try:
                link = parse_symlink_target(e.target)
            except RestoreProblem:
                return e.target
        else:
            link = parse_symlink_target(e.target)
        key = self._key(link.context, ino=link.ino, fs_uuid=link.fs_uuid, names=True)
        try:
            target = decrypt_symlink(key, link.ciphertext)
        except FscryptError as err:
            raise RestoreProblem(f"symlink target does not decrypt: {err}") from None
        if b"\0" in target or not target:
            raise RestoreProblem("symlink target decrypts to an impossible target")
        return target

    def _regular(self, e: Entry, dest: bytes) -> int:
        attrs = fscrypt_attrs(e.xattrs, regular=True)
        if attrs is None:
            return self._copy(e, dest)
        return self._decrypt(e, dest, attrs)

    def _copy(self, e: Entry, dest: bytes) -> int:
        """An unencrypted file: copied, with all-zero blocks left as holes."""
        assert e.open is not None
        fd = self.writer.create(dest)
        ok = False
        try:
            with e.open() as src:
                offset = 0
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    self._write_sparse(fd, offset, chunk, 4096)
                    offset += len(chunk)
                    self.report.add_bytes(len(chunk))
            ok = True
        finally:
            self.writer.close(fd, offset if ok else 0, ok=ok, path=dest)
        return 0

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

    def _decrypt(self, e: Entry, dest: bytes, attrs: FscryptAttrs) -> int:
        """Stream the ciphertext through the file key; all-zero units stay holes."""
        assert e.open is not None and attrs.size is not None
        ctx = attrs.context
        block_size = attrs.block_size or self.block_size
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
        return 0

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
    parts = []
    while n > 0:
        b = src.read(n)
        if not b:
            raise RestoreProblem("backup file shorter than its size")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)
