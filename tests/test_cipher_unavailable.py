"""A restore on a machine whose OpenSSL lacks a cipher the backup needs.

SM4 is an optional algorithm in OpenSSL builds.  Its absence must cost the
entries that need it (reported, exit status 1), never the whole restore nor
a traceback, and never output computed some other way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm

from ciphertextfs import cli
from ciphertextfs.fscrypt.ciphers import blockcipher
from ciphertextfs.fscrypt.crypto import encrypt_contents
from ciphertextfs.fscrypt.keysetup import derive_file_key
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_MODE_SM4_CTS,
    FSCRYPT_MODE_SM4_XTS,
    build_context,
)
from tests.trees import MASTER_KEYS, TEST_KEY_V2

PLAIN_SM4 = os.urandom(5000)
PLAIN_CLEAR = b"not encrypted\n"


def _backup(root: Path) -> None:
    """A format-1 tree backup: one SM4-XTS file beside one unencrypted file."""
    master = MASTER_KEYS[2]
    ctx = build_context(
        2,
        master.identifier,
        bytes(range(16)),
        contents_mode=FSCRYPT_MODE_SM4_XTS,
        filenames_mode=FSCRYPT_MODE_SM4_CTS,
    )
    key = derive_file_key(master, ctx, for_filenames=False, block_size=4096)
    padded = PLAIN_SM4 + bytes(-len(PLAIN_SM4) % 16)
    root.mkdir()
    sm4 = root / "sm4file"
    sm4.write_bytes(encrypt_contents(key, padded))
    os.setxattr(sm4, "user.fscrypt.context", ctx.to_bytes())
    os.setxattr(sm4, "user.fscrypt.size", str(len(PLAIN_SM4)).encode())
    os.setxattr(sm4, "user.fscrypt.block_size", b"4096")
    (root / "clear").write_bytes(PLAIN_CLEAR)


def _restore(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> tuple[int, str]:
    dest = tmp_path / name
    rc = cli.main(["decrypt", "-q", "--key", str(tmp_path / "k"), str(tmp_path / "b"), str(dest)])
    return rc, capsys.readouterr().err


def test_missing_cipher_costs_only_its_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _backup(tmp_path / "b")
    (tmp_path / "k").write_bytes(TEST_KEY_V2)

    # With SM4 present the same backup restores: the case below is not vacuous.
    rc, err = _restore(tmp_path, capsys, "with")
    assert (rc, err) == (0, "")
    assert (tmp_path / "with" / "sm4file").read_bytes() == PLAIN_SM4

    real = blockcipher.algorithms.SM4

    def no_sm4(key: bytes) -> object:
        raise UnsupportedAlgorithm("SM4 is not supported by this backend")

    monkeypatch.setattr(blockcipher.algorithms, "SM4", no_sm4)
    rc, err = _restore(tmp_path, capsys, "without")
    monkeypatch.setattr(blockcipher.algorithms, "SM4", real)
    assert rc == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "sm4file" in line]
    assert len(lines) == 1 and "not available" in lines[0], err
    assert (tmp_path / "without" / "clear").read_bytes() == PLAIN_CLEAR
    assert not (tmp_path / "without" / "sm4file").exists()
