"""The fscrypt ciphers that `cryptography` lacks, against published vectors.

The vectors live in tests/data/fscrypt_cipher_vectors.json; every section
names its source (the Adiantum and HCTR2 reference repositories, the
kernel's crypto/testmgr.h, RFC 3962, RFC 8452, GB/T 32907).  Where
`cryptography` can compute the same thing another way (AES-XTS, CBC), it is
used as an independent oracle instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ciphertextfs.fscrypt import ciphers
from ciphertextfs.fscrypt.ciphers import (
    CipherUnavailable,
    adiantum_decrypt,
    adiantum_encrypt,
    blockcipher,
    cts_cbc_decrypt,
    cts_cbc_encrypt,
    essiv_cbc_decrypt,
    essiv_cbc_encrypt,
    hctr2_decrypt,
    hctr2_encrypt,
    sm4_xts_decrypt,
    sm4_xts_encrypt,
    xts_decrypt,
    xts_encrypt,
)
from ciphertextfs.fscrypt.ciphers.chacha import chacha_stream, hchacha, xchacha_stream
from ciphertextfs.fscrypt.ciphers.nhpoly1305 import nh, nhpoly1305, poly1305_hash
from ciphertextfs.fscrypt.ciphers.polyval import polyval

_VECTORS = json.loads((Path(__file__).parent / "data" / "fscrypt_cipher_vectors.json").read_text())


def _vectors(section: str) -> list[dict]:
    return [
        {k: (bytes.fromhex(v) if isinstance(v, str) else v) for k, v in vec.items()}
        for vec in _VECTORS[section]["vectors"]
    ]


def _ids(section: str) -> list[str]:
    return [f"{section}-{i}" for i in range(len(_VECTORS[section]["vectors"]))]


def _cbc(cipher: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    alg = algorithms.AES(key) if cipher == "aes" else algorithms.SM4(key)
    enc = Cipher(alg, modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


# --- Adiantum and its parts -------------------------------------------------


@pytest.mark.parametrize("vec", _vectors("xchacha12"), ids=_ids("xchacha12"))
def test_xchacha12_keystream(vec: dict) -> None:
    subkey = hchacha(vec["key"], vec["nonce"][:16])
    got = chacha_stream(subkey, vec["nonce"][16:], len(vec["keystream"]), 12, vec["block"])
    assert got == vec["keystream"]
    if vec["block"] == 0:
        assert xchacha_stream(vec["key"], vec["nonce"], 64) == vec["keystream"]


@pytest.mark.parametrize("vec", _vectors("nh"), ids=_ids("nh"))
def test_nh(vec: dict) -> None:
    assert nh(vec["key"], vec["message"]) == vec["hash"]


@pytest.mark.parametrize("vec", _vectors("poly1305"), ids=_ids("poly1305"))
def test_poly1305_hash_plus_mask_is_the_mac(vec: dict) -> None:
    value = poly1305_hash(vec["key"], vec["message"])
    mac = (value + int.from_bytes(vec["mask"], "little")) % (1 << 128)
    assert mac.to_bytes(16, "little") == vec["mac"]


@pytest.mark.parametrize("vec", _vectors("nhpoly1305"), ids=_ids("nhpoly1305"))
def test_nhpoly1305(vec: dict) -> None:
    assert nhpoly1305(vec["key"], vec["message"]).to_bytes(16, "little") == vec["hash"]


@pytest.mark.parametrize(
    "vec",
    _vectors("adiantum_kernel") + _vectors("adiantum_reference"),
    ids=_ids("adiantum_kernel") + _ids("adiantum_reference"),
)
def test_adiantum(vec: dict) -> None:
    assert adiantum_encrypt(vec["key"], vec["tweak"], vec["plaintext"]) == vec["ciphertext"]
    assert adiantum_decrypt(vec["key"], vec["tweak"], vec["ciphertext"]) == vec["plaintext"]


# --- HCTR2 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "vec",
    _vectors("polyval_reference") + _vectors("polyval_rfc8452"),
    ids=_ids("polyval_reference") + _ids("polyval_rfc8452"),
)
def test_polyval(vec: dict) -> None:
    assert polyval(vec["key"], vec["message"]) == vec["hash"]


@pytest.mark.parametrize(
    "vec",
    _vectors("hctr2_aes256") + _vectors("hctr2_aes128"),
    ids=_ids("hctr2_aes256") + _ids("hctr2_aes128"),
)
def test_hctr2(vec: dict) -> None:
    assert hctr2_encrypt(vec["key"], vec["tweak"], vec["plaintext"]) == vec["ciphertext"]
    assert hctr2_decrypt(vec["key"], vec["tweak"], vec["ciphertext"]) == vec["plaintext"]


# --- CBC-ESSIV and CTS-CBC --------------------------------------------------


@pytest.mark.parametrize("vec", _vectors("essiv_aes_cbc"), ids=_ids("essiv_aes_cbc"))
def test_essiv_cbc(vec: dict) -> None:
    assert essiv_cbc_encrypt(vec["key"], vec["iv"], vec["plaintext"]) == vec["ciphertext"]
    assert essiv_cbc_decrypt(vec["key"], vec["iv"], vec["ciphertext"]) == vec["plaintext"]


def test_essiv_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError):
        essiv_cbc_decrypt(bytes(16), bytes(16), bytes(20))


@pytest.mark.parametrize("vec", _vectors("cts_aes128_rfc3962"), ids=_ids("cts_aes128_rfc3962"))
def test_cts_rfc3962(vec: dict) -> None:
    section = _VECTORS["cts_aes128_rfc3962"]
    key, iv = bytes.fromhex(section["key"]), bytes.fromhex(section["iv"])
    assert cts_cbc_encrypt("aes", key, iv, vec["plaintext"]) == vec["ciphertext"]
    assert cts_cbc_decrypt("aes", key, iv, vec["ciphertext"]) == vec["plaintext"]


@pytest.mark.parametrize("cipher,klen", [("aes", 16), ("aes", 32), ("sm4", 16)])
@pytest.mark.parametrize("length", [16, 17, 31, 32, 33, 48, 63, 64, 255])
def test_cts_against_cbc(cipher: str, klen: int, length: int) -> None:
    """One block is plain CBC; whole blocks are CBC with the last two swapped (CS3)."""
    key, iv, data = os.urandom(klen), os.urandom(16), os.urandom(length)
    ct = cts_cbc_encrypt(cipher, key, iv, data)
    assert len(ct) == length
    assert cts_cbc_decrypt(cipher, key, iv, ct) == data
    if length % 16 == 0:
        cbc = _cbc(cipher, key, iv, data)
        expected = cbc if length == 16 else cbc[:-32] + cbc[-16:] + cbc[-32:-16]
        assert ct == expected
    else:
        # The ciphertext stealing prefix is ordinary CBC up to the last full block.
        head = length - 16 - length % 16
        assert ct[:head] == _cbc(cipher, key, iv, data[:head])


def test_cts_rejects_short_input() -> None:
    with pytest.raises(ValueError):
        cts_cbc_encrypt("aes", bytes(32), bytes(16), bytes(15))


# --- SM4 and XTS ------------------------------------------------------------


@pytest.mark.parametrize("vec", _vectors("sm4_ecb"), ids=_ids("sm4_ecb"))
def test_sm4_block_cipher_is_available(vec: dict) -> None:
    """SM4 comes from OpenSSL; this fails when the build lacks it."""
    assert blockcipher.ecb_encrypt("sm4", vec["key"], vec["plaintext"]) == vec["ciphertext"]


@pytest.mark.parametrize("vec", _vectors("sm4_xts"), ids=_ids("sm4_xts"))
def test_sm4_xts(vec: dict) -> None:
    assert sm4_xts_encrypt(vec["key"], vec["tweak"], vec["plaintext"]) == vec["ciphertext"]
    assert sm4_xts_decrypt(vec["key"], vec["tweak"], vec["ciphertext"]) == vec["plaintext"]


@pytest.mark.parametrize("length", [16, 17, 31, 32, 33, 47, 100, 4095, 4096])
@pytest.mark.parametrize("klen", [32, 64])
def test_generic_xts_matches_cryptography_aes_xts(length: int, klen: int) -> None:
    """The XTS code SM4 uses, run over AES, against OpenSSL's own AES-XTS."""
    key = os.urandom(klen)
    while key[: klen // 2] == key[klen // 2 :]:
        key = os.urandom(klen)
    tweak, data = os.urandom(16), os.urandom(length)
    enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    reference = enc.update(data) + enc.finalize()
    assert xts_encrypt("aes", key, tweak, data) == reference
    assert xts_decrypt("aes", key, tweak, reference) == data


@pytest.mark.parametrize("length", [16, 17, 40, 4096, 4100])
def test_sm4_xts_round_trip(length: int) -> None:
    key, tweak, data = os.urandom(32), os.urandom(16), os.urandom(length)
    ct = sm4_xts_encrypt(key, tweak, data)
    assert len(ct) == length and ct != data
    assert sm4_xts_decrypt(key, tweak, ct) == data


def test_missing_primitive_raises_cipher_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenSSL without SM4 must give CipherUnavailable, not another exception."""

    def refuse(cipher: str, key: bytes) -> None:
        raise UnsupportedAlgorithm("sm4 disabled in this build")

    monkeypatch.setattr(blockcipher, "_algorithm", refuse)
    with pytest.raises(CipherUnavailable, match="SM4"):
        sm4_xts_decrypt(bytes(32), bytes(16), bytes(32))
    with pytest.raises(CipherUnavailable, match="SM4"):
        cts_cbc_decrypt("sm4", bytes(16), bytes(16), bytes(20))


# --- properties common to the wide-block modes -------------------------------


@pytest.mark.parametrize(
    "encrypt,decrypt",
    [(adiantum_encrypt, adiantum_decrypt), (hctr2_encrypt, hctr2_decrypt)],
    ids=["adiantum", "hctr2"],
)
@pytest.mark.parametrize("length", [16, 17, 32, 33, 1000, 1024, 1040, 4096])
def test_wide_block_round_trip_and_diffusion(encrypt, decrypt, length: int) -> None:
    key, tweak, data = os.urandom(32), os.urandom(32), os.urandom(length)
    ct = encrypt(key, tweak, data)
    assert len(ct) == length
    assert decrypt(key, tweak, ct) == data
    # A wide-block cipher changes every block when one plaintext bit flips.
    flipped = bytes([data[0] ^ 1]) + data[1:]
    ct2 = encrypt(key, tweak, flipped)
    assert all(ct[i : i + 16] != ct2[i : i + 16] for i in range(0, length - 15, 16))
    other_tweak = bytes([tweak[0] ^ 1]) + tweak[1:]
    assert decrypt(key, other_tweak, ct) != data


@pytest.mark.parametrize("fn", [adiantum_encrypt, adiantum_decrypt, hctr2_encrypt, hctr2_decrypt])
def test_wide_block_length_checks(fn) -> None:
    with pytest.raises(ValueError):
        fn(bytes(32), bytes(32), bytes(15))
    with pytest.raises(ValueError):
        fn(bytes(31), bytes(32), bytes(16))


def test_public_api_is_exported() -> None:
    for name in ciphers.__all__:
        assert callable(getattr(ciphers, name))
