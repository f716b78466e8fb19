"""google/fscrypt's metadata: protectors, policies, and the path from a secret to a master key.

The `fscrypt` tool never hands its users a master key.  It keeps each
policy's 64-byte key wrapped once per protector in `.fscrypt/policies/`,
and each protector's own 32-byte key wrapped by a secret in
`.fscrypt/protectors/`: a passphrase (custom or login) stretched with
Argon2id, or the 32 bytes of a raw-key file.  Both files are proto3
messages (metadata/metadata.proto of google/fscrypt); the few fields we
need are decoded here with a minimal wire-format reader instead of a
protobuf dependency.

Every step is authenticated (HMAC-SHA256 over IV and ciphertext), and
every key is checked against the descriptor that names it, so a wrong
secret and tampered metadata are told apart and neither yields a key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import FscryptError
from .keysetup import MasterKey
from .policy import FSCRYPT_MAX_KEY_SIZE

__all__ = [
    "ArgonCostError",
    "BadAuthError",
    "HashingCosts",
    "INTERNAL_KEY_LEN",
    "MAX_METADATA_FILE_SIZE",
    "MetadataError",
    "PolicyData",
    "ProtectorData",
    "SOURCE_CUSTOM",
    "SOURCE_PAM",
    "SOURCE_RAW",
    "WrappedKey",
    "WrappedPolicyKey",
    "argon2_limits",
    "parse_link",
    "parse_policy",
    "parse_protector",
    "passphrase_from_bytes",
    "protector_descriptor",
    "unlock_policy_key",
    "unlock_protector",
    "unwrap",
    "wrapping_key",
]

INTERNAL_KEY_LEN = 32
"""fscrypt's protector keys, wrapping keys and raw-key files: 32 bytes."""
IV_LEN = 16
SALT_LEN = 16
MAX_METADATA_FILE_SIZE = 16384
"""fscrypt itself refuses larger metadata files; so do we."""

SOURCE_DEFAULT, SOURCE_PAM, SOURCE_CUSTOM, SOURCE_RAW = 0, 1, 2, 3
_SOURCE_NAMES = {
    SOURCE_PAM: "pam_passphrase",
    SOURCE_CUSTOM: "custom_passphrase",
    SOURCE_RAW: "raw_key",
}

DEFAULT_ARGON2_MAX_MEMORY_KIB = 1024 * 1024
"""8 times what fscrypt ever chooses (128 MiB); a protector asking more is refused."""
ARGON2_MAX_TIME = 4096
"""fscrypt raises the time cost only after the memory cost reaches its limit,
to reach about a second; thousands of passes mean a crafted protector."""
ARGON2_MAX_PARALLELISM = 255


class MetadataError(FscryptError):
    """A metadata file that is not a valid fscrypt protector, policy or link."""


class BadAuthError(FscryptError):
    """The HMAC of a wrapped key does not verify: wrong secret, or tampered data."""


class ArgonCostError(FscryptError):
    """A protector's hashing costs beyond what we agree to spend."""


# -- proto3 wire format -------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise MetadataError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise MetadataError("varint longer than 10 bytes")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MetadataError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            n, pos = _varint(data, pos)
            if n > len(data) - pos:
                raise MetadataError("length-delimited field overruns the message")
            out.append((number, data[pos : pos + n]))
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise MetadataError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise MetadataError("fixed-size field overruns the message")
    return out


def _int64(v: int | bytes) -> int:
    if not isinstance(v, int):
        raise MetadataError("expected a varint")
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _bytes(v: int | bytes) -> bytes:
    if not isinstance(v, bytes):
        raise MetadataError("expected a length-delimited field")
    return v


def _text(v: int | bytes) -> str:
    try:
        return _bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        raise MetadataError("string field is not UTF-8") from None


# -- messages -------------------------------------------------------------------


@dataclass(frozen=True)
class HashingCosts:
    time: int = 0
    memory_kib: int = 0
    parallelism: int = 0
    truncation_fixed: bool = False


@dataclass(frozen=True)
class WrappedKey:
    iv: bytes = b""
    encrypted_key: bytes = b""
    hmac: bytes = b""


@dataclass(frozen=True)
class ProtectorData:
    descriptor: str
    source: int
    name: str = ""
    costs: HashingCosts = field(default_factory=HashingCosts)
    salt: bytes = b""
    uid: int = -1
    wrapped_key: WrappedKey = field(default_factory=WrappedKey)

    @property
    def source_name(self) -> str:
        return _SOURCE_NAMES.get(self.source, f"unknown source {self.source}")

    def label(self) -> str:
        """How prompts and messages name the protector, in fscrypt's terms."""
        if self.source == SOURCE_PAM:
            return f"login protector of uid {self.uid}"
        if self.source == SOURCE_CUSTOM:
            return f'custom protector "{self.name}"'
        if self.source == SOURCE_RAW:
            return f'raw key protector "{self.name}"'
        return f"protector {self.descriptor} ({self.source_name})"

    @property
    def needs_passphrase(self) -> bool:
        return self.source in (SOURCE_PAM, SOURCE_CUSTOM)


@dataclass(frozen=True)
class WrappedPolicyKey:
    protector_descriptor: str
    wrapped_key: WrappedKey


@dataclass(frozen=True)
class PolicyData:
    key_descriptor: str
    policy_version: int
    contents_mode: int
    filenames_mode: int
    padding: int
    wrapped_keys: tuple[WrappedPolicyKey, ...]

    @property
    def key_spec(self) -> bytes:
        return bytes.fromhex(self.key_descriptor)


def _costs(data: bytes) -> HashingCosts:
    v = {n: x for n, x in _fields(data)}
    return HashingCosts(
        time=_int64(v.get(2, 0)),
        memory_kib=_int64(v.get(3, 0)),
        parallelism=_int64(v.get(4, 0)),
        truncation_fixed=bool(_int64(v.get(5, 0))),
    )


def _wrapped(data: bytes) -> WrappedKey:
    v = {n: x for n, x in _fields(data)}
    w = WrappedKey(
        iv=_bytes(v.get(1, b"")), encrypted_key=_bytes(v.get(2, b"")), hmac=_bytes(v.get(3, b""))
    )
    if len(w.iv) != IV_LEN or len(w.hmac) != 32:
        raise MetadataError("wrapped key: IV or HMAC of the wrong length")
    if not w.encrypted_key or len(w.encrypted_key) > FSCRYPT_MAX_KEY_SIZE:
        raise MetadataError(f"wrapped key of {len(w.encrypted_key)} bytes")
    return w


def _hex_descriptor(text: str, lengths: tuple[int, ...], what: str) -> str:
    if len(text) not in lengths or any(c not in "0123456789abcdef" for c in text):
        n = " or ".join(map(str, lengths))
        raise MetadataError(f"{what} {text[:40]!r} is not {n} lowercase hex digits")
    return text


def parse_protector(data: bytes) -> ProtectorData:
    """A `.fscrypt/protectors/<descriptor>` file."""
    if len(data) > MAX_METADATA_FILE_SIZE:
        raise MetadataError("larger than any fscrypt metadata file")
    v = {n: x for n, x in _fields(data)}
    if 7 not in v:
        raise MetadataError("protector without a wrapped key")
    p = ProtectorData(
        descriptor=_hex_descriptor(_text(v.get(1, b"")), (16,), "protector descriptor"),
        source=_int64(v.get(2, 0)),
        name=_text(v.get(3, b"")),
        costs=_costs(_bytes(v[4])) if 4 in v else HashingCosts(),
        salt=_bytes(v.get(5, b"")),
        uid=_int64(v.get(6, 0)),
        wrapped_key=_wrapped(_bytes(v[7])),
    )
    if p.source not in _SOURCE_NAMES:
        raise MetadataError(f"protector of unknown source type {p.source}")
    if len(p.wrapped_key.encrypted_key) != INTERNAL_KEY_LEN:
        raise MetadataError("protector key is not 32 bytes")
    if p.needs_passphrase and len(p.salt) != SALT_LEN:
        raise MetadataError("passphrase protector without a 16-byte salt")
    return p


def parse_policy(data: bytes) -> PolicyData:
    """A `.fscrypt/policies/<key descriptor>` file."""
    if len(data) > MAX_METADATA_FILE_SIZE:
        raise MetadataError("larger than any fscrypt metadata file")
    desc = ""
    opts: dict[int, int | bytes] = {}
    keys: list[WrappedPolicyKey] = []
    for number, value in _fields(data):
        if number == 1:
            desc = _text(value)
        elif number == 2:
            opts = {n: x for n, x in _fields(_bytes(value))}
        elif number == 3:
            w = {n: x for n, x in _fields(_bytes(value))}
            if 2 not in w:
                raise MetadataError("policy key entry without a wrapped key")
            keys.append(
                WrappedPolicyKey(
                    _hex_descriptor(_text(w.get(1, b"")), (16,), "protector descriptor"),
                    _wrapped(_bytes(w[2])),
                )
            )
    version = _int64(opts.get(4, 0)) or 1
    if version not in (1, 2):
        raise MetadataError(f"policy version {version}")
    _hex_descriptor(desc, (16 if version == 1 else 32,), f"v{version} key descriptor")
    return PolicyData(
        key_descriptor=desc,
        policy_version=version,
        contents_mode=_int64(opts.get(2, 0)),
        filenames_mode=_int64(opts.get(3, 0)),
        padding=_int64(opts.get(1, 0)),
        wrapped_keys=tuple(keys),
    )


def parse_link(data: bytes) -> dict[str, str]:
    """A `<descriptor>.link` file: `UUID=...` and/or `PATH=...` lines naming a filesystem."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        token, sep, value = line.strip().partition("=")
        if sep and token in ("UUID", "PATH") and "=" not in value:
            out[token] = value
    if not out:
        raise MetadataError("not a filesystem link (no UUID= or PATH= line)")
    return out


# -- the derivation ---------------------------------------------------------------


def protector_descriptor(key: bytes) -> str:
    """What names a protector key (and a v1 key): SHA-512 twice, first 8 bytes, hex."""
    return hashlib.sha512(hashlib.sha512(key).digest()).digest()[:8].hex()


def unwrap(wrapping: bytes, w: WrappedKey) -> bytes:
    """fscrypt's authenticated unwrap: HKDF-SHA256 into AES-256-CTR and HMAC-SHA256 keys."""
    if len(wrapping) != INTERNAL_KEY_LEN:
        raise FscryptError("wrapping key is not 32 bytes")
    stretched = HKDF(hashes.SHA256(), 2 * INTERNAL_KEY_LEN, salt=None, info=b"").derive(wrapping)
    enc_key, auth_key = stretched[:INTERNAL_KEY_LEN], stretched[INTERNAL_KEY_LEN:]
    tag = hmac.new(auth_key, w.iv + w.encrypted_key, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, w.hmac):
        raise BadAuthError("HMAC check failed")
    dec = Cipher(algorithms.AES(enc_key), modes.CTR(w.iv)).decryptor()
    return dec.update(w.encrypted_key) + dec.finalize()


def argon2_limits(costs: HashingCosts, max_memory_kib: int) -> tuple[int, int, int]:
    """(time, memory KiB, lanes) as fscrypt uses them, or ArgonCostError.

    fscrypt passes the parallelism through an 8-bit cast; old protectors
    may rely on that truncation, newer ones set truncation_fixed.
    """
    lanes = costs.parallelism & 0xFF
    if lanes == 0 or (costs.truncation_fixed and not 1 <= costs.parallelism <= 255):
        raise ArgonCostError(f"parallelism cost {costs.parallelism} out of range")
    if not 1 <= costs.time <= ARGON2_MAX_TIME:
        raise ArgonCostError(f"time cost {costs.time} is not from 1 to {ARGON2_MAX_TIME}; refused")
    if costs.memory_kib < 8 * lanes:
        raise ArgonCostError(f"memory cost {costs.memory_kib} KiB below 8 KiB per lane")
    if costs.memory_kib > max_memory_kib:
        raise ArgonCostError(
            f"memory cost {costs.memory_kib // 1024} MiB exceeds the limit of "
            f"{max_memory_kib // 1024} MiB (raise it with --argon2-max-memory if this "
            "protector is genuine)"
        )
    return costs.time, costs.memory_kib, lanes


def wrapping_key(
    p: ProtectorData, secret: bytes, max_memory_kib: int = DEFAULT_ARGON2_MAX_MEMORY_KIB
) -> bytes:
    """The key that unwraps a protector: Argon2id of a passphrase, or the raw key itself."""
    if p.source == SOURCE_RAW:
        if len(secret) != INTERNAL_KEY_LEN:
            raise FscryptError(f"raw protector key of {len(secret)} bytes, expected 32")
        return secret
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    time_cost, memory, lanes = argon2_limits(p.costs, max_memory_kib)
    return Argon2id(
        salt=p.salt, length=INTERNAL_KEY_LEN, iterations=time_cost, lanes=lanes, memory_cost=memory
    ).derive(secret)


def unlock_protector(p: ProtectorData, wrapping: bytes) -> bytes:
    """The protector key; BadAuthError for a wrong secret, MetadataError for tampering."""
    key = unwrap(wrapping, p.wrapped_key)
    if protector_descriptor(key) != p.descriptor:
        raise MetadataError("protector key does not match its descriptor (tampered metadata)")
    return key


def unlock_policy_key(policy: PolicyData, protector_key: bytes, protector_desc: str) -> MasterKey:
    """The master key from a policy's entry for one unlocked protector."""
    for entry in policy.wrapped_keys:
        if entry.protector_descriptor != protector_desc:
            continue
        try:
            raw = unwrap(protector_key, entry.wrapped_key)
        except BadAuthError:
            raise MetadataError(
                "the policy's wrapped key fails its HMAC check with the right protector key "
                "(tampered metadata)"
            ) from None
        if len(raw) != FSCRYPT_MAX_KEY_SIZE:
            raise MetadataError(f"policy key of {len(raw)} bytes, expected 64")
        key = MasterKey(raw)
        got = key.descriptor if policy.policy_version == 1 else key.identifier
        if got.hex() != policy.key_descriptor:
            raise MetadataError("policy key does not match its key descriptor (tampered metadata)")
        return key
    raise MetadataError(f"policy has no key for protector {protector_desc}")


def passphrase_from_bytes(data: bytes) -> bytes:
    """A passphrase as fscrypt reads one from its input: up to the first CR or LF,
    with backspace (BS, DEL) taking back the byte before it."""
    out = bytearray()
    for b in data:
        if b in (0x0A, 0x0D):
            break
        if b in (3, 4):
            raise FscryptError("holds Ctrl-C or Ctrl-D, which fscrypt takes as cancel")
        if b in (8, 127):
            if out:
                out.pop()
            continue
        out.append(b)
    return bytes(out)
