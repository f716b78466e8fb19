"""fscrypt metadata parsing and unwrapping on crafted input (the real tool is in
test_fscrypt_protectors.py): hostile files cost an error, never a crash or a huge allocation."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ciphertextfs.fscrypt import protector as P
from ciphertextfs.fscrypt.errors import FscryptError


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def fld(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def wrap(wrapping: bytes, secret: bytes) -> bytes:
    """fscrypt's Encrypt-then-MAC, written from its documentation for the test."""
    k = HKDF(hashes.SHA256(), 64, salt=None, info=b"").derive(wrapping)
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(k[:32]), modes.CTR(iv)).encryptor()
    ct = enc.update(secret) + enc.finalize()
    tag = hmac.new(k[32:], iv + ct, hashlib.sha256).digest()
    return fld(1, iv) + fld(2, ct) + fld(3, tag)


def raw_protector(wrapping: bytes, pkey: bytes, *, desc: str | None = None) -> bytes:
    desc = desc or P.protector_descriptor(pkey)
    return fld(1, desc.encode()) + fld(2, 3) + fld(3, b"rk") + fld(7, wrap(wrapping, pkey))


def pass_protector(costs: bytes, salt: bytes = b"s" * 16) -> bytes:
    pkey = os.urandom(32)
    return (
        fld(1, P.protector_descriptor(pkey).encode())
        + fld(2, 2)
        + fld(3, b"p")
        + fld(4, costs)
        + fld(5, salt)
        + fld(7, wrap(os.urandom(32), pkey))
    )


def test_raw_protector_round_trip_and_wrong_key() -> None:
    wk, pkey = os.urandom(32), os.urandom(32)
    prot = P.parse_protector(raw_protector(wk, pkey))
    assert prot.source == P.SOURCE_RAW and prot.label() == 'raw key protector "rk"'
    assert P.unlock_protector(prot, P.wrapping_key(prot, wk)) == pkey
    with pytest.raises(P.BadAuthError):
        P.unlock_protector(prot, os.urandom(32))


def test_protector_whose_key_does_not_match_its_descriptor() -> None:
    wk, pkey = os.urandom(32), os.urandom(32)
    prot = P.parse_protector(raw_protector(wk, pkey, desc="0123456789abcdef"))
    with pytest.raises(P.MetadataError, match="does not match its descriptor"):
        P.unlock_protector(prot, wk)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x0a\xff\xff\xff\xff\x0f",  # length beyond the message
        b"\x0a",  # truncated length
        b"\x08" + b"\xff" * 11,  # varint over 10 bytes
        b"\x0b\x00",  # wire type 3
        b"\x00\x00",  # field number 0
        fld(1, b"0123456789abcdef") + fld(2, 3),  # no wrapped key
        fld(1, b"XYZ") + fld(2, 3) + fld(7, wrap(os.urandom(32), os.urandom(32))),
        fld(1, b"0123456789abcdef") + fld(2, 9) + fld(7, wrap(os.urandom(32), os.urandom(32))),
        fld(1, b"0123456789abcdef") + fld(2, 3) + fld(7, fld(1, b"short")),
        b"\x0a\x01" * 9000,  # larger than any metadata file
    ],
)
def test_hostile_protector_files(blob: bytes) -> None:
    with pytest.raises(P.MetadataError):
        P.parse_protector(blob)


def test_argon2_costs_are_checked_before_any_allocation() -> None:
    huge = P.parse_protector(pass_protector(fld(2, 1) + fld(3, 100 * 1024 * 1024) + fld(4, 1)))
    with pytest.raises(P.ArgonCostError, match="exceeds the limit of 1024 MiB"):
        P.wrapping_key(huge, b"x")
    slow = P.parse_protector(pass_protector(fld(2, 1 << 40) + fld(3, 64) + fld(4, 1)))
    with pytest.raises(P.ArgonCostError, match="time cost"):
        P.wrapping_key(slow, b"x")
    no_lanes = P.parse_protector(pass_protector(fld(2, 1) + fld(3, 64) + fld(4, 256)))
    with pytest.raises(P.ArgonCostError, match="parallelism"):
        P.wrapping_key(no_lanes, b"x")
    # fscrypt's 8-bit cast: parallelism 257 runs with one lane unless truncation_fixed.
    old = P.parse_protector(pass_protector(fld(2, 1) + fld(3, 64) + fld(4, 257)))
    assert P.argon2_limits(old.costs, 1 << 20) == (1, 64, 1)
    fixed = P.parse_protector(pass_protector(fld(2, 1) + fld(3, 64) + fld(4, 257) + fld(5, 1)))
    with pytest.raises(P.ArgonCostError):
        P.argon2_limits(fixed.costs, 1 << 20)
    ok = P.parse_protector(pass_protector(fld(2, 1) + fld(3, 64) + fld(4, 1)))
    assert len(P.wrapping_key(ok, b"x", max_memory_kib=64)) == 32


def test_policy_parse_and_tampered_entry() -> None:
    from ciphertextfs.fscrypt.keysetup import MasterKey

    master = MasterKey(os.urandom(64))
    pkey = os.urandom(32)
    desc = P.protector_descriptor(pkey)
    entry = fld(1, desc.encode()) + fld(2, wrap(pkey, master.raw))
    opts = fld(1, 32) + fld(2, 1) + fld(3, 4) + fld(4, 2)
    blob = fld(1, master.identifier.hex().encode()) + fld(2, opts) + fld(3, entry)
    pol = P.parse_policy(blob)
    assert pol.policy_version == 2 and pol.wrapped_keys[0].protector_descriptor == desc
    assert P.unlock_policy_key(pol, pkey, desc).raw == master.raw
    with pytest.raises(P.MetadataError, match="tampered"):
        P.unlock_policy_key(pol, os.urandom(32), desc)
    other = MasterKey(os.urandom(64))
    forged = fld(1, master.identifier.hex().encode()) + fld(2, opts)
    forged += fld(3, fld(1, desc.encode()) + fld(2, wrap(pkey, other.raw)))
    with pytest.raises(P.MetadataError, match="does not match its key descriptor"):
        P.unlock_policy_key(P.parse_policy(forged), pkey, desc)
    with pytest.raises(P.MetadataError, match="v1 key descriptor"):
        P.parse_policy(fld(1, master.identifier.hex().encode()) + fld(2, fld(4, 1)))


def test_passphrase_as_fscrypt_reads_it() -> None:
    assert P.passphrase_from_bytes(b"secret\nsecond line\n") == b"secret"
    assert P.passphrase_from_bytes(b"sec\r\n") == b"sec"
    assert P.passphrase_from_bytes(b"sex\x7ft") == b"set"
    assert P.passphrase_from_bytes(b"  spaced  ") == b"  spaced  "
    with pytest.raises(FscryptError):
        P.passphrase_from_bytes(b"a\x03")


def test_link_files() -> None:
    assert P.parse_link(b"UUID=1234-abcd\nPATH=/\n") == {"UUID": "1234-abcd", "PATH": "/"}
    assert P.parse_link(b"PATH=/mnt\n") == {"PATH": "/mnt"}
    with pytest.raises(P.MetadataError):
        P.parse_link(b"nonsense\n")
