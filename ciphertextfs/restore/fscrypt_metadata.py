"""google/fscrypt metadata found in backups, and the master keys it yields.

fscrypt users hold a passphrase, a login passphrase, a recovery passphrase
or a 32-byte raw-key file, never a master key.  What turns one into the
other lives in `.fscrypt/` metadata: in the backup itself (a view rooted at
the filesystem root shows `/.fscrypt`; other views show it, with linked
login protectors, under the metadata entry of docs/FORMAT.md), or in
copies given with --fscrypt-metadata.  Keys are unlocked when the restore
first needs them, so that a passphrase is asked only for keys the backup
uses and every failure is explained per protector.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ciphertextfs.fscrypt.errors import FscryptError
from ciphertextfs.fscrypt.keysetup import MasterKey
from ciphertextfs.fscrypt.policy import FSCRYPT_CONTEXT_V1, FscryptContext, parse_context
from ciphertextfs.fscrypt.protector import (
    DEFAULT_ARGON2_MAX_MEMORY_KIB,
    INTERNAL_KEY_LEN,
    MAX_METADATA_FILE_SIZE,
    SOURCE_PAM,
    ArgonCostError,
    BadAuthError,
    MetadataError,
    PolicyData,
    ProtectorData,
    parse_link,
    parse_policy,
    parse_protector,
    passphrase_from_bytes,
    unlock_policy_key,
    unlock_protector,
    wrapping_key,
)
from ciphertextfs.viewformat import (
    FSCRYPT_DIR_NAME,
    META_DIR_NAME,
    META_LINKED,
    META_MARK_VALUE,
    META_POLICIES,
    META_PROTECTORS,
    SYMLINK_PREFIX,
    XATTR_FSCRYPT_CONTEXT,
    XATTR_META_MARK,
    FormatError,
    decode_symlink_inline,
)

from .backup import Backup, BackupError, Entry, Kind, Path_, TreeProblem, open_backup, show_path
from .keys import KeyFileError, key_label

__all__ = [
    "Metadata",
    "NeededKey",
    "Secrets",
    "Unlocker",
    "WithoutMetadataEntry",
    "load_metadata",
    "load_passphrase_file",
    "load_protector_key",
    "needed_keys",
    "save_key",
]


@dataclass
class Metadata:
    """Every metadata file found, by descriptor; one descriptor may be found in several places."""

    policies: dict[str, list[tuple[PolicyData, str]]] = field(default_factory=dict)
    protectors: dict[str, list[tuple[ProtectorData, str]]] = field(default_factory=dict)
    links: dict[str, list[tuple[dict[str, str], str]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add(self, subdir: bytes, name: bytes, data: bytes, where: str) -> None:
        if where in self.seen:
            return
        self.seen.add(where)
        text = os.fsdecode(name)
        try:
            if subdir == META_POLICIES:
                pol = parse_policy(data)
                if pol.key_descriptor != text:
                    raise MetadataError(f"holds policy {pol.key_descriptor}")
                self.policies.setdefault(text, []).append((pol, where))
            elif text.endswith(".link"):
                self.links.setdefault(text[: -len(".link")], []).append((parse_link(data), where))
            else:
                prot = parse_protector(data)
                if prot.descriptor != text:
                    raise MetadataError(f"holds protector {prot.descriptor}")
                self.protectors.setdefault(text, []).append((prot, where))
        except MetadataError as e:
            self.problems.append(f"{where}: not a valid fscrypt metadata file: {e}")

    def policies_for(self, ctx: FscryptContext) -> list[tuple[PolicyData, str]]:
        version = 1 if ctx.version == FSCRYPT_CONTEXT_V1 else 2
        found = self.policies.get(ctx.key_spec.hex(), [])
        return [(p, w) for p, w in found if p.policy_version == version]


def _metadata_path(path: Path_, anywhere: bool) -> tuple[bytes, bytes] | None:
    """(subdir, file name) when a backup path is a metadata file we read."""
    if len(path) < 2:
        return None
    sub, name = path[-2], path[-1]
    parent = path[:-2]
    if sub not in (META_POLICIES, META_PROTECTORS, META_LINKED) or name.startswith(b"."):
        return None  # fscrypt's own temporary files start with ".tmp"
    if sub == META_LINKED:
        ok = parent[-1:] == (META_DIR_NAME,)
        sub = META_PROTECTORS
    else:
        ok = parent[-1:] in ((FSCRYPT_DIR_NAME,), (META_DIR_NAME,)) or (anywhere and not parent)
    if not ok or (not anywhere and len(parent) != 1):
        return None
    return sub, name


def _read_small(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(21, "not a regular file")
        data = os.read(fd, MAX_METADATA_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_METADATA_FILE_SIZE:
        raise OSError(27, "larger than any fscrypt metadata file")
    return data


def _scan_dir(meta: Metadata, base: bytes, label: str, anywhere: bool) -> None:
    """A directory: a .fscrypt itself, a root holding one, or a tree backup of either."""
    candidates = [
        ((FSCRYPT_DIR_NAME,), META_POLICIES),
        ((FSCRYPT_DIR_NAME,), META_PROTECTORS),
        ((META_DIR_NAME,), META_POLICIES),
        ((META_DIR_NAME,), META_PROTECTORS),
        ((META_DIR_NAME,), META_LINKED),
    ]
    if anywhere:
        candidates += [((), META_POLICIES), ((), META_PROTECTORS)]
    for parent, sub in candidates:
        d = os.path.join(base, *parent, sub)
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        except OSError as e:
            meta.problems.append(f"{label}: cannot list {os.fsdecode(d)}: {e.strerror}")
            continue
        for name in names:
            if name.startswith(b"."):
                continue
            p = os.path.join(d, name)
            where = f"{label}:{show_path((*parent, sub, name))}"
            try:
                data = _read_small(p)
            except OSError as e:
                meta.problems.append(f"{where}: cannot read: {e.strerror}")
                continue
            meta.add(META_PROTECTORS if sub == META_LINKED else sub, name, data, where)


def _scan_backup(meta: Metadata, backup: Backup, label: str, anywhere: bool) -> None:
    for e in backup.entries():
        if isinstance(e, TreeProblem) or e.kind is not Kind.REG or e.open is None:
            continue
        hit = _metadata_path(e.path, anywhere)
        if hit is None:
            continue
        where = f"{label}:{show_path(e.path)}"
        if e.size > MAX_METADATA_FILE_SIZE:
            meta.problems.append(f"{where}: larger than any fscrypt metadata file")
            continue
        try:
            with e.open() as f:
                data = f.read(MAX_METADATA_FILE_SIZE + 1)
        except OSError as err:
            meta.problems.append(f"{where}: cannot read: {err.strerror or err}")
            continue
        meta.add(hit[0], hit[1], data, where)


def load_metadata(source: str, extra: list[str]) -> Metadata:
    """The metadata inside SOURCE (at its root) and in each --fscrypt-metadata PATH."""
    meta = Metadata()
    for path, anywhere, label in [(source, False, "SOURCE")] + [(p, True, p) for p in extra]:
        meta.searched.append(path)
        if os.path.isdir(path):
            _scan_dir(meta, os.fsencode(path), label, anywhere)
            continue
        if path == "-":
            continue
        try:
            backup = open_backup(path)
        except BackupError as e:
            if anywhere:
                raise KeyFileError(f"--fscrypt-metadata {e}") from None
            continue
        with backup:
            _scan_backup(meta, backup, label, anywhere)
    return meta


# -- secrets ------------------------------------------------------------------


def load_passphrase_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_METADATA_FILE_SIZE)
    except OSError as e:
        raise KeyFileError(f"passphrase file {path}: {e.strerror}") from None
    try:
        return passphrase_from_bytes(data)
    except FscryptError as e:
        raise KeyFileError(f"passphrase file {path}: {e}") from None


def load_protector_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(INTERNAL_KEY_LEN + 1)
    except OSError as e:
        raise KeyFileError(f"protector key file {path}: {e.strerror}") from None
    if len(raw) != INTERNAL_KEY_LEN:
        n = len(raw) if len(raw) <= INTERNAL_KEY_LEN else "over 32"
        raise KeyFileError(
            f"protector key file {path}: {n} bytes, expected the 32 bytes of an fscrypt "
            "raw_key protector file (a 64-byte master key goes to --key)"
        )
    return raw


@dataclass
class Secrets:
    passphrases: list[tuple[bytes, str]] = field(default_factory=list)
    protector_keys: list[tuple[bytes, str]] = field(default_factory=list)
    ask: Callable[[str], bytes | None] | None = None
    max_memory_kib: int = DEFAULT_ARGON2_MAX_MEMORY_KIB

    @property
    def any(self) -> bool:
        return bool(self.passphrases or self.protector_keys or self.ask)


def save_key(directory: str, key: MasterKey, ctx: FscryptContext) -> str:
    """Write a recovered master key as DIR/<identifier or descriptor>, mode 0600."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, ctx.key_spec.hex())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.raw)
    finally:
        os.close(fd)
    return path


# -- unlocking -------------------------------------------------------------------


def _link_text(link: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(link.items(), reverse=True))


@dataclass
class Unlocker:
    """Master keys from metadata and secrets, one context's key at a time.

    `note` receives what the user should read: per protector why a key
    could not be opened, and which protector opened it.
    """

    meta: Metadata
    secrets: Secrets
    note: Callable[[str], None]
    save_dir: str | None = None
    verbose: bool = True
    _protector_keys: dict[tuple[str, str], bytes | None] = field(default_factory=dict)
    _why: dict[tuple[str, str], str] = field(default_factory=dict)
    _asked: dict[str, bytes | None] = field(default_factory=dict)

    def __call__(self, ctx: FscryptContext) -> MasterKey | None:
        label = key_label(ctx)
        policies = self.meta.policies_for(ctx)
        if not policies:
            self.note(
                f"{label}: no fscrypt policy file for it in the backup or in --fscrypt-metadata "
                "(run 'ciphertextfs keys SOURCE' for what is missing)"
            )
            return None
        reasons: list[str] = []
        for policy, _where in policies:
            for entry in policy.wrapped_keys:
                key, why = self._via(policy, entry.protector_descriptor)
                if key is not None:
                    self._opened(ctx, key, why)
                    return key
                reasons.append(why)
        self.note(f"cannot open {label}:")
        for why in dict.fromkeys(reasons):
            self.note(f"  {why}")
        return None

    def _opened(self, ctx: FscryptContext, key: MasterKey, how: str) -> None:
        if self.verbose:
            self.note(f"{key_label(ctx)}: opened with {how}")
        if self.save_dir is not None:
            path = save_key(self.save_dir, key, ctx)
            self.note(f"{key_label(ctx)}: saved to {path}")

    def _via(self, policy: PolicyData, desc: str) -> tuple[MasterKey | None, str]:
        found = self.meta.protectors.get(desc, [])
        if not found:
            links = self.meta.links.get(desc)
            if links:
                link, where = links[0]
                return None, (
                    f"protector {desc} ({where}) is a link to another filesystem "
                    f"({_link_text(link)}) whose protector file is not in the backup: add "
                    "--fscrypt-metadata with that filesystem's .fscrypt (or a backup of it), "
                    "or use another protector of this policy, such as its recovery passphrase"
                )
            return None, (
                f"protector {desc}: its file is missing from the backup and --fscrypt-metadata"
            )
        whys = []
        for prot, where in found:
            pkey = self._protector_key(prot, where)
            if pkey is None:
                whys.append(self._why[(prot.descriptor, where)])
                continue
            try:
                key = unlock_policy_key(policy, pkey, desc)
            except MetadataError as e:
                whys.append(f"{prot.label()} ({desc}, policy {policy.key_descriptor}): {e}")
                continue
            return key, f"{prot.label()} ({where})"
        return None, "; ".join(whys)

    def _protector_key(self, prot: ProtectorData, where: str) -> bytes | None:
        ck = (prot.descriptor, where)
        if ck in self._protector_keys:
            return self._protector_keys[ck]
        name = f"{prot.label()} ({where})"
        result, why = None, ""
        try:
            result, why = self._try_secrets(prot, name)
        except ArgonCostError as e:
            why = f"{name}: {e}"
        except MetadataError as e:
            why = f"{name}: {e}"
        self._protector_keys[ck] = result
        self._why[ck] = why
        return result

    def _unlock(self, prot: ProtectorData, secret: bytes) -> bytes | None:
        try:
            return unlock_protector(prot, wrapping_key(prot, secret, self.secrets.max_memory_kib))
        except BadAuthError:
            return None

    def _try_secrets(self, prot: ProtectorData, name: str) -> tuple[bytes | None, str]:
        if prot.needs_passphrase:
            secrets = [s for s, _src in self.secrets.passphrases]
            what = "passphrase"
        else:
            secrets = [s for s, _src in self.secrets.protector_keys]
            what = "protector key file"
        for secret in secrets:
            key = self._unlock(prot, secret)
            if key is not None:
                return key, ""
        tried = len(secrets)
        if prot.needs_passphrase and self.secrets.ask is not None:
            if prot.descriptor not in self._asked:
                kind = "login passphrase" if prot.source == SOURCE_PAM else "passphrase"
                prompt = f"Enter {kind} for {prot.label()}: "
                self._asked[prot.descriptor] = self.secrets.ask(prompt)
            asked = self._asked[prot.descriptor]
            if asked:
                tried += 1
                key = self._unlock(prot, asked)
                if key is not None:
                    return key, ""
        if tried == 0:
            hint = (
                "--passphrase-file or --ask-passphrase"
                if prot.needs_passphrase
                else "--protector-key FILE (its 32-byte key file)"
            )
            return None, f"{name}: needs a {what}: give {hint}"
        given = f"the {what} given" if tried == 1 else f"each of the {tried} {what}s given"
        return None, f"{name}: wrong {what} (the HMAC check failed) for {given}"


# -- what a backup needs ------------------------------------------------------------


@dataclass
class NeededKey:
    ctx: FscryptContext
    entries: int = 0
    example: Path_ = ()


def _entry_context(e: Entry) -> FscryptContext | None:
    raw = e.xattrs.get(XATTR_FSCRYPT_CONTEXT)
    if raw is not None:
        return parse_context(raw)
    if e.kind is Kind.SYMLINK and e.target is not None and e.target.startswith(SYMLINK_PREFIX):
        try:
            return decode_symlink_inline(e.target).context
        except FormatError:
            return None
    return None


def needed_keys(
    backup: Backup, meta: Metadata | None = None
) -> tuple[dict[tuple[int, bytes], NeededKey], int]:
    """Keys the encrypted entries of a backup name, and how many entries had a bad context.

    With `meta`, metadata files met on the way are added to it (a stream is read once).
    """
    keys: dict[tuple[int, bytes], NeededKey] = {}
    bad = 0
    for e in WithoutMetadataEntry(backup, meta=meta).entries():
        if isinstance(e, TreeProblem):
            continue
        try:
            ctx = _entry_context(e)
        except FscryptError:
            bad += 1
            continue
        if ctx is None:
            continue
        k = keys.get((ctx.version, ctx.key_spec))
        if k is None:
            k = keys[(ctx.version, ctx.key_spec)] = NeededKey(ctx, example=e.path)
        k.entries += 1
    return keys, bad


class WithoutMetadataEntry(Backup):
    """A backup minus the view's metadata entry, which is read for keys, never restored.

    With `meta`, the metadata files at the backup's root are also read as
    they pass: a tar stream cannot be scanned beforehand, and the view lists
    its metadata entry first so that it precedes the encrypted trees.
    """

    def __init__(
        self,
        inner: Backup,
        note: Callable[[str], None] | None = None,
        meta: Metadata | None = None,
    ) -> None:
        self.inner = inner
        self.description = inner.description
        self._note = note
        self._meta = meta

    def _observe(self, e: Entry) -> None:
        if self._meta is None or e.kind is not Kind.REG or e.open is None:
            return
        hit = _metadata_path(e.path, False)
        if hit is None or e.size > MAX_METADATA_FILE_SIZE:
            return
        where = f"SOURCE:{show_path(e.path)}"
        if where in self._meta.seen:
            return
        try:
            with e.open() as f:
                data = f.read(MAX_METADATA_FILE_SIZE + 1)
        except OSError:
            return
        self._meta.add(hit[0], hit[1], data, where)

    def entries(self) -> Iterator[Entry | TreeProblem]:  # type: ignore[override]
        skipping = False
        for e in self.inner.entries():
            p = e.path
            if isinstance(e, TreeProblem):
                if not (skipping and p[:1] == (META_DIR_NAME,)):
                    yield e
                continue
            self._observe(e)
            if len(p) == 1 and p[0] == META_DIR_NAME:
                skipping = e.kind is Kind.DIR and e.xattrs.get(XATTR_META_MARK) == META_MARK_VALUE
                if skipping:
                    if self._note is not None:
                        self._note(
                            f"{show_path(p)}: fscrypt metadata added by the view, read for the "
                            "keys and not restored"
                        )
                    continue
            elif skipping and len(p) > 1 and p[0] == META_DIR_NAME:
                continue
            yield e

    def side_file(self, dir_path: Path_) -> bytes | None:
        return self.inner.side_file(dir_path)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
