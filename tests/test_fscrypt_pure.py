"""fscrypt layer checks that need no kernel: formats, KDF building blocks, round trips.

The authoritative checks against the kernel live in test_fscrypt_kernel.py;
these pin down formats against independent implementations (Python's
base64, published SipHash vectors) and hostile input handling.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ciphertextfs.fscrypt import crypto, fname, keysetup, nokey, policy
from ciphertextfs.fscrypt.errors import FscryptError, KeyMissingError, UnknownPolicyError
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_MODE_ADIANTUM,
    FSCRYPT_MODE_AES_128_CBC,
    FSCRYPT_MODE_AES_128_CTS,
    FSCRYPT_MODE_AES_256_CTS,
    FSCRYPT_MODE_AES_256_HCTR2,
    FSCRYPT_MODE_AES_256_XTS,
    FSCRYPT_MODE_SM4_CTS,
    FSCRYPT_MODE_SM4_XTS,
    FSCRYPT_POLICY_FLAG_DIRECT_KEY,
    FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32,
    FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64,
    build_context,
    parse_context,
)

RNG = random.Random(1234)


def rbytes(n: int) -> bytes:
    return RNG.randbytes(n)


# ---------------------------------------------------------------- policy


def test_context_round_trip_v1_v2() -> None:
    for pad in range(4):
        v1 = build_context(1, rbytes(8), rbytes(16), flags=pad)
        raw = v1.to_bytes()
        assert len(raw) == 28 and raw[0] == 1
        assert parse_context(raw) == v1
        assert v1.filename_padding == 4 << pad
        for flags in (pad, pad | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64, pad | 0x10):
            for du in (0, 9, 10, 12):
                v2 = build_context(2, rbytes(16), rbytes(16), flags=flags, log2_data_unit_size=du)
                raw = v2.to_bytes()
                assert len(raw) == 40 and raw[0] == 2 and raw[4] == du
                assert parse_context(raw) == v2


def test_context_field_offsets() -> None:
    raw = bytes([2, 1, 4, 2, 9, 0, 0, 0]) + bytes(range(16)) + bytes(range(100, 116))
    ctx = parse_context(raw)
    assert ctx.master_key_identifier == bytes(range(16))
    assert ctx.nonce == bytes(range(100, 116))
    assert ctx.data_unit_size(4096) == 512
    assert ctx.filename_padding == 16
    raw1 = bytes([1, 1, 4, 0]) + bytes(range(8)) + bytes(range(50, 66))
    ctx1 = parse_context(raw1)
    assert ctx1.master_key_descriptor == bytes(range(8)) and ctx1.nonce == bytes(range(50, 66))
    assert ctx1.data_unit_size(1024) == 1024 and ctx1.filename_padding == 4
    assert "AES-256-XTS" in ctx1.describe() and ctx1.to_json()["master_key_descriptor"]


@pytest.mark.parametrize(
    "raw, err",
    [
        (b"", FscryptError),
        (bytes([1, 1, 4, 0]) + bytes(23), FscryptError),  # short v1
        (bytes([2, 1, 4, 0]) + bytes(37), FscryptError),  # short v2
        (bytes([2, 1, 4, 0]) + bytes(37) + b"\0\0", FscryptError),  # long v2
        (bytes([3]) + bytes(39), UnknownPolicyError),
        (bytes([0]) + bytes(27), UnknownPolicyError),
        (bytes([1, 2, 4, 0]) + bytes(24), UnknownPolicyError),  # mode 2 never existed
        (bytes([1, 1, 6, 0]) + bytes(24), UnknownPolicyError),  # mismatched pair
        (bytes([1, 7, 8, 0]) + bytes(24), UnknownPolicyError),  # SM4 is v2-only
        (bytes([1, 1, 4, 0x08]) + bytes(24), UnknownPolicyError),  # LBLK flags v2-only
        (bytes([2, 1, 4, 0x20]) + bytes(36), UnknownPolicyError),  # unknown flag
        (bytes([2, 1, 4, 0x18]) + bytes(36), UnknownPolicyError),  # exclusive flags
        (bytes([2, 1, 4, 0x04]) + bytes(36), UnknownPolicyError),  # DIRECT_KEY with XTS
        (bytes([2, 5, 6, 0x08]) + bytes(36), UnknownPolicyError),  # LBLK needs XTS
        (bytes([2, 1, 4, 0, 8]) + bytes(35), UnknownPolicyError),  # data unit 256
        (bytes([2, 1, 4, 0, 12, 1]) + bytes(34), UnknownPolicyError),  # reserved
    ],
)
def test_context_rejects(raw: bytes, err: type[Exception]) -> None:
    with pytest.raises(err):
        parse_context(raw)


def test_context_accepts_every_kernel_mode_pair() -> None:
    pairs = [
        (1, FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_CTS),
        (1, FSCRYPT_MODE_AES_128_CBC, FSCRYPT_MODE_AES_128_CTS),
        (1, FSCRYPT_MODE_ADIANTUM, FSCRYPT_MODE_ADIANTUM),
        (2, FSCRYPT_MODE_AES_256_XTS, FSCRYPT_MODE_AES_256_HCTR2),
        (2, FSCRYPT_MODE_SM4_XTS, FSCRYPT_MODE_SM4_CTS),
    ]
    for version, c, f in pairs:
        n = 8 if version == 1 else 16
        ctx = build_context(version, rbytes(n), rbytes(16), contents_mode=c, filenames_mode=f)
        assert parse_context(ctx.to_bytes()) == ctx
    direct = build_context(
        2,
        rbytes(16),
        rbytes(16),
        contents_mode=FSCRYPT_MODE_ADIANTUM,
        filenames_mode=FSCRYPT_MODE_ADIANTUM,
        flags=FSCRYPT_POLICY_FLAG_DIRECT_KEY,
    )
    assert direct.direct_key and not direct.needs_inode_number


def test_ciphertext_size() -> None:
    xts = build_context(2, rbytes(16), rbytes(16))
    adi = build_context(
        2, rbytes(16), rbytes(16), contents_mode=9, filenames_mode=9, log2_data_unit_size=10
    )
    for size in (0, 1, 15, 16, 17, 4095, 4096, 4097):
        assert xts.ciphertext_size(size, 4096) == -(-size // 16) * 16
        assert adi.ciphertext_size(size, 4096) == -(-size // 1024) * 1024
    assert (
        build_context(1, rbytes(8), rbytes(16), contents_mode=9, filenames_mode=9).ciphertext_size(
            1, 2048
        )
        == 2048
    )


# ---------------------------------------------------------------- base64url / no-key names


def test_base64url_matches_python() -> None:
    for n in range(0, 200):
        data = rbytes(n)
        want = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert nokey.base64url_encode(data) == want
        assert nokey.base64url_decode(want) == data


@pytest.mark.parametrize("bad", ["A", "AAAAA", "ab+c", "ab/c", "abc=", "ab c", "é", "AB", "AAB"])
def test_base64url_rejects(bad: str) -> None:
    # "AB" and "AAB" carry nonzero leftover bits: no encoder produces them.
    with pytest.raises(FscryptError):
        nokey.base64url_decode(bad)


def test_nokey_name_short_and_long() -> None:
    for n in (16, 17, 32, 148, 149):
        ct = rbytes(n)
        name = nokey.nokey_name(ct, 0x12345678, 0x9ABCDEF0)
        raw = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))
        assert raw == bytes.fromhex("78563412f0debc9a") + ct
        parsed = nokey.parse_nokey_name(name)
        assert parsed == nokey.NokeyName(0x12345678, 0x9ABCDEF0, ct, None)
        assert parsed.matches(ct) and not parsed.matches(ct + b"x")
        assert not nokey.is_long(n)
    for n in (150, 200, 255):
        ct = rbytes(n)
        name = nokey.nokey_name(ct)
        assert len(name) == 252 <= 255
        raw = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))
        assert len(raw) == nokey.FSCRYPT_NOKEY_NAME_MAX == 189
        assert raw[:8] == bytes(8) and raw[8:157] == ct[:149]
        assert raw[157:] == hashlib.sha256(ct[149:]).digest()
        parsed = nokey.parse_nokey_name(name)
        assert parsed.sha256 is not None and parsed.matches(ct)
        assert not parsed.matches(ct[:-1] + bytes([ct[-1] ^ 1]))
        assert nokey.is_long(n)


def test_parse_nokey_name_rejects() -> None:
    for n in (0, 8, 158, 188, 190):
        with pytest.raises(FscryptError):
            nokey.parse_nokey_name(nokey.base64url_encode(bytes(n)))
    with pytest.raises(FscryptError):
        nokey.parse_nokey_name(".fscrypt-longnames")
    with pytest.raises(FscryptError):
        nokey.parse_nokey_name("A" * 300)


# ---------------------------------------------------------------- key derivation


def test_siphash_reference_vectors() -> None:
    # Aumasson & Bernstein, "SipHash: a fast short-input PRF" (2012), Appendix A,
    # and the reference implementation's vectors.h (key 00..0f, message 00..n-1).
    key = bytes(range(16))
    assert keysetup.siphash24(key, bytes(range(15))) == 0xA129CA6149BE45E5
    expected = {
        0: 0x726FDB47DD0E0E31,
        1: 0x74F839C593DC67FD,
        7: 0xAB0200F58B01D137,
        8: 0x93F5F5799A932462,
    }
    for n, want in expected.items():
        assert keysetup.siphash24(key, bytes(range(n))) == want


def test_hkdf_agrees_with_rfc5869_implementation() -> None:
    ikm = rbytes(64)
    info = b"fscrypt\0\x02" + rbytes(16)
    want = HKDF(hashes.SHA512(), 64, salt=bytes(64), info=info).derive(ikm)
    assert keysetup.hkdf_sha512(ikm, info, 64) == want
    mk = keysetup.MasterKey(ikm)
    assert mk.hkdf(2, info[9:], 64) == want


def test_v1_descriptor_is_double_sha512() -> None:
    raw = rbytes(64)
    assert keysetup.v1_descriptor(raw) == hashlib.sha512(hashlib.sha512(raw).digest()).digest()[:8]


def test_master_key_sizes() -> None:
    for n in (0, 15, 65):
        with pytest.raises(FscryptError):
            keysetup.MasterKey(bytes(n))
    short = keysetup.MasterKey(rbytes(32))
    ctx = build_context(1, rbytes(8), rbytes(16))
    with pytest.raises(KeyMissingError):  # AES-256-XTS needs 64 bytes
        keysetup.derive_file_key(short, ctx, for_filenames=False, block_size=4096)
    fk = keysetup.derive_file_key(short, ctx, for_filenames=True)  # AES-256-CTS needs 32
    assert len(fk.key) == 32


def test_v2_identifier_mismatch_is_key_missing() -> None:
    mk = keysetup.MasterKey(rbytes(64))
    ctx = build_context(2, rbytes(16), rbytes(16))
    with pytest.raises(KeyMissingError):
        keysetup.derive_file_key(mk, ctx, for_filenames=True)


def test_iv_ino_lblk_requirements() -> None:
    mk = keysetup.MasterKey(rbytes(64))
    ctx = build_context(2, mk.identifier, rbytes(16), flags=FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64)
    with pytest.raises(KeyMissingError):
        keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    with pytest.raises(FscryptError):
        keysetup.derive_file_key(mk, ctx, for_filenames=True, ino=1 << 32, fs_uuid=bytes(16))
    du = build_context(
        2,
        mk.identifier,
        rbytes(16),
        flags=FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32,
        log2_data_unit_size=9,
    )
    with pytest.raises(UnknownPolicyError):
        keysetup.derive_file_key(
            mk, du, ino=12, fs_uuid=bytes(16), for_filenames=False, block_size=4096
        )


# ---------------------------------------------------------------- IVs


def _key(
    flags: int = 0, mode_pair=(1, 4), **kw
) -> tuple[keysetup.MasterKey, policy.FscryptContext]:
    mk = keysetup.MasterKey(rbytes(64))
    ctx = build_context(
        2,
        mk.identifier,
        rbytes(16),
        contents_mode=mode_pair[0],
        filenames_mode=mode_pair[1],
        flags=flags,
        **kw,
    )
    return mk, ctx


def test_generate_iv_rules() -> None:
    mk, ctx = _key()
    fk = keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    assert crypto.generate_iv(fk, 0x0102030405) == bytes.fromhex("0504030201000000") + bytes(8)
    mk, ctx = _key(FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64)
    fk = keysetup.derive_file_key(
        mk, ctx, ino=0x11223344, fs_uuid=bytes(16), for_filenames=False, block_size=4096
    )
    assert crypto.generate_iv(fk, 7) == bytes.fromhex("0700000044332211") + bytes(8)
    with pytest.raises(FscryptError):
        crypto.generate_iv(fk, 1 << 32)
    mk, ctx = _key(FSCRYPT_POLICY_FLAG_IV_INO_LBLK_32)
    fk = keysetup.derive_file_key(
        mk, ctx, ino=99, fs_uuid=bytes(16), for_filenames=False, block_size=4096
    )
    assert fk.hashed_ino == mk.hashed_ino(99)
    want = (fk.hashed_ino + 0xFFFFFFFF) & 0xFFFFFFFF
    assert crypto.generate_iv(fk, 0xFFFFFFFF) == want.to_bytes(8, "little") + bytes(8)
    mk, ctx = _key(FSCRYPT_POLICY_FLAG_DIRECT_KEY, (9, 9))
    fk = keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    iv = crypto.generate_iv(fk, 3)
    assert iv == bytes([3]) + bytes(7) + ctx.nonce + bytes(8) and len(iv) == 32


# ---------------------------------------------------------------- contents and names


def _has_sm4() -> bool:
    from ciphertextfs.fscrypt.ciphers import CipherUnavailable, sm4_xts_encrypt

    try:
        sm4_xts_encrypt(bytes(range(32)), bytes(16), bytes(16))
    except CipherUnavailable:
        return False
    return True


CONTENT_MODES = [(1, 4), (5, 6), (9, 9), (7, 8)]


@pytest.mark.parametrize("pair", CONTENT_MODES)
def test_contents_round_trip(pair: tuple[int, int]) -> None:
    if pair[0] == 7 and not _has_sm4():
        pytest.skip("this OpenSSL lacks SM4")  # an OpenSSL property, not a kernel one
    mk, ctx = _key(mode_pair=pair, log2_data_unit_size=10)
    fk = keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    assert fk.data_unit_size == 1024
    plain = rbytes(4 * 1024)
    ct = crypto.encrypt_contents(fk, plain, 5)
    assert ct != plain and len(ct) == len(plain)
    assert crypto.decrypt_contents(fk, ct, 5) == plain
    # Each unit depends on its index, and decrypts alone.
    assert crypto.decrypt_data_unit(fk, 7, ct[2048:3072]) == plain[2048:3072]
    assert crypto.decrypt_contents(fk, ct, 6)[:1024] != plain[:1024]
    # A hole (all-zero unit) reads as zeros.
    holed = ct[:1024] + bytes(1024) + ct[2048:]
    out = crypto.decrypt_contents(fk, holed, 5)
    assert out[1024:2048] == bytes(1024) and out[2048:] == plain[2048:]
    if pair[0] != FSCRYPT_MODE_ADIANTUM:
        # Block-wise modes: a 16-byte-multiple prefix of the last unit decrypts alone.
        assert crypto.decrypt_contents(fk, ct[: 3072 + 48], 5) == plain[: 3072 + 48]
        with pytest.raises(FscryptError):
            crypto.decrypt_contents(fk, ct[:1030], 5)
    else:
        with pytest.raises(FscryptError):
            crypto.decrypt_contents(fk, ct[:1040], 5)


def test_xts_matches_cryptography_per_unit() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    mk, ctx = _key()
    fk = keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    plain = rbytes(3 * 4096)
    ct = crypto.encrypt_contents(fk, plain, 10)
    for i in range(3):
        enc = Cipher(algorithms.AES(fk.key), modes.XTS((10 + i).to_bytes(16, "little"))).encryptor()
        assert ct[i * 4096 : (i + 1) * 4096] == enc.update(plain[i * 4096 : (i + 1) * 4096])


FNAME_MODES = [(1, 4), (5, 6), (9, 9), (1, 10), (7, 8)]


@pytest.mark.parametrize("pair", FNAME_MODES)
def test_filename_round_trip_and_padding(pair: tuple[int, int]) -> None:
    if pair[1] == FSCRYPT_MODE_SM4_CTS and not _has_sm4():
        pytest.skip("this OpenSSL lacks SM4")
    for pad in range(4):
        mk, ctx = _key(pad, pair)
        dk = keysetup.derive_file_key(mk, ctx, for_filenames=True)
        for n in (1, 3, 15, 16, 17, 31, 32, 33, 100, 149, 150, 254, 255):
            name = bytes(RNG.choice(b"abcXYZ019._-") for _ in range(n))
            ct = fname.encrypt_filename(dk, name)
            assert len(ct) == min(max(-(-max(n, 16) // (4 << pad)) * (4 << pad), 16), 255)
            assert fname.decrypt_filename(dk, ct) == name


def test_filename_rejects() -> None:
    mk, ctx = _key()
    dk = keysetup.derive_file_key(mk, ctx, for_filenames=True)
    for bad in (b"", b"a\0b", b"x" * 256):
        with pytest.raises(FscryptError):
            fname.encrypt_filename(dk, bad)
    with pytest.raises(FscryptError):
        fname.decrypt_filename(dk, rbytes(15))
    with pytest.raises(FscryptError):  # all-NUL plaintext: an empty name
        fname.decrypt_filename(dk, fname._crypt(dk, bytes(16), True))


def test_symlink_body() -> None:
    mk, ctx = _key(1)
    sk = keysetup.derive_file_key(mk, ctx, for_filenames=True)
    target = "/some/where/é".encode()
    ct = fname.encrypt_symlink(sk, target, 4096)
    body = fname.symlink_body(ct)
    assert body[:2] == len(ct).to_bytes(2, "little")
    assert fname.parse_symlink_body(body + b"\0") == ct
    assert fname.decrypt_symlink(sk, fname.parse_symlink_body(body)) == target
    # The whole target plus length and NUL fit in a block.
    long_ct = fname.encrypt_symlink(sk, b"a" * 4093, 4096)
    assert len(long_ct) == 4093
    with pytest.raises(FscryptError):
        fname.encrypt_symlink(sk, b"a" * 4094, 4096)
    for bad in (b"", b"\x01", b"\x00\x00xx", b"\x10\x00" + bytes(15)):
        with pytest.raises(FscryptError):
            fname.parse_symlink_body(bad)


def test_wrong_key_length_inputs_raise_fscrypt_error() -> None:
    mk, ctx = _key()
    fk = keysetup.derive_file_key(mk, ctx, for_filenames=False, block_size=4096)
    for n in (1, 15, 4097):
        with pytest.raises(FscryptError):
            crypto.decrypt_contents(fk, os.urandom(n))
    dk = keysetup.derive_file_key(mk, ctx, for_filenames=True)
    with pytest.raises(FscryptError):
        crypto.decrypt_contents(dk, bytes(4096))
