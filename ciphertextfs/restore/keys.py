"""The owner's master keys, and which one a context asks for.

v2 contexts name their key by the identifier the kernel derives from the
key itself, so matching is exact.  v1 contexts name it by an arbitrary
8-byte descriptor: the one given on the command line, or else the
conventional descriptor e4crypt and fscrypt derive from the key.

A key not given as a raw master key may still be unlocked from fscrypt
metadata (restore/fscrypt_metadata.py): the ring asks its `resolver` once
per key the restore needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ciphertextfs.fscrypt.keysetup import MasterKey
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_CONTEXT_V1,
    FSCRYPT_KEY_DESCRIPTOR_SIZE,
    FSCRYPT_MAX_KEY_SIZE,
    FscryptContext,
)

__all__ = ["KeyFileError", "KeyRing", "load_key_file", "parse_v1_key_arg", "key_label"]


class KeyFileError(Exception):
    """A key file or --v1-key argument that cannot be used at all."""


def load_key_file(path: str) -> MasterKey:
    """Read a raw 64-byte master key.

    The fscrypt tool never writes one (its raw_key protector files hold a
    32-byte protector key, see --protector-key); these come from e4crypt-style
    setups, `--save-keys`, or a key added with FS_IOC_ADD_ENCRYPTION_KEY.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(FSCRYPT_MAX_KEY_SIZE + 1)
    except OSError as e:
        raise KeyFileError(f"key file {path}: {e.strerror}") from None
    if len(raw) != FSCRYPT_MAX_KEY_SIZE:
        hint = ""
        if len(raw) == 32:
            hint = " (a 32-byte fscrypt raw_key protector file goes to --protector-key)"
        elif len(raw) < 32:
            hint = " (an fscrypt passphrase goes to --passphrase-file)"
        raise KeyFileError(
            f"key file {path}: {len(raw) if len(raw) <= FSCRYPT_MAX_KEY_SIZE else 'over 64'} "
            f"bytes, expected a raw {FSCRYPT_MAX_KEY_SIZE}-byte master key{hint}"
        )
    return MasterKey(raw)


def parse_v1_key_arg(arg: str) -> tuple[bytes, str]:
    """DESCRIPTOR=FILE, the descriptor as 16 hex digits."""
    desc, sep, path = arg.partition("=")
    if not sep or not path:
        raise KeyFileError(f"--v1-key {arg!r}: expected DESCRIPTOR=FILE")
    try:
        raw = bytes.fromhex(desc)
    except ValueError:
        raw = b""
    if len(raw) != FSCRYPT_KEY_DESCRIPTOR_SIZE:
        raise KeyFileError(f"--v1-key {arg!r}: the descriptor must be 16 hex digits")
    return raw, path


def key_label(ctx: FscryptContext) -> str:
    """How messages name the key a context needs."""
    if ctx.version == FSCRYPT_CONTEXT_V1:
        return f"v1 key descriptor {ctx.key_spec.hex()}"
    return f"v2 key identifier {ctx.key_spec.hex()}"


@dataclass
class KeyRing:
    """Keys by v2 identifier and by v1 descriptor; remembers which were used."""

    v2: dict[bytes, MasterKey] = field(default_factory=dict)
    v1: dict[bytes, MasterKey] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)
    resolver: Callable[[FscryptContext], MasterKey | None] | None = None
    _resolved: dict[tuple[int, bytes], MasterKey | None] = field(default_factory=dict)

    def add(self, key: MasterKey, source: str, v1_descriptor: bytes | None = None) -> None:
        """A --key file serves v2 by identifier and v1 by its conventional descriptor."""
        self.sources[id(key)] = source
        if v1_descriptor is not None:
            self.v1[v1_descriptor] = key
            return
        self.v2.setdefault(key.identifier, key)
        self.v1.setdefault(key.descriptor, key)

    @classmethod
    def from_args(cls, key_files: list[str], v1_keys: list[str]) -> KeyRing:
        ring = cls()
        for arg in v1_keys:
            desc, path = parse_v1_key_arg(arg)
            ring.add(load_key_file(path), os.fspath(path), desc)
        for path in key_files:
            ring.add(load_key_file(path), os.fspath(path))
        return ring

    def lookup(self, ctx: FscryptContext) -> MasterKey | None:
        table = self.v1 if ctx.version == FSCRYPT_CONTEXT_V1 else self.v2
        key = table.get(ctx.key_spec)
        if key is None and self.resolver is not None:
            spec = (ctx.version, ctx.key_spec)
            if spec not in self._resolved:
                self._resolved[spec] = self.resolver(ctx)
            key = self._resolved[spec]
            return key
        if key is not None:
            self.used.add(id(key))
        return key

    def unused(self) -> list[tuple[str, MasterKey]]:
        """Keys given but never matched: worth a note, a typo'd file is a common mistake."""
        seen: dict[int, MasterKey] = {}
        for k in (*self.v2.values(), *self.v1.values()):
            seen[id(k)] = k
        return [(self.sources[i], k) for i, k in seen.items() if i not in self.used]
