"""The view format codec: what it encodes it decodes, and format 1 still decodes."""

from __future__ import annotations

import pytest

from ciphertextfs.fscrypt.nokey import base64url_encode
from ciphertextfs.fscrypt.policy import (
    FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64,
    FSCRYPT_POLICY_FLAGS_PAD_32,
    build_context,
)
from ciphertextfs.viewformat import (
    DIRHASH_ALGORITHMS,
    SIDE_FILE_HEADER,
    SYMLINK_INLINE_MAX,
    XATTR_FSCRYPT_DIRHASH,
    EncryptedSymlink,
    FormatError,
    decode_dirhash,
    decode_side_file,
    decode_symlink,
    decode_symlink_inline,
    decode_xattrs,
    encode_dir_xattrs,
    encode_inode_xattrs,
    encode_side_file,
    encode_side_file_v1,
    encode_symlink,
    encode_symlink_inline,
    original_xattrs,
    symlink_inline_bound,
)

V1 = build_context(1, bytes(8), bytes(range(16))).to_bytes()
V2 = build_context(2, bytes(16), bytes(range(16))).to_bytes()
INO64 = build_context(
    2, bytes(16), bytes(16), flags=FSCRYPT_POLICY_FLAGS_PAD_32 | FSCRYPT_POLICY_FLAG_IV_INO_LBLK_64
).to_bytes()
UUID = bytes(range(16))


@pytest.mark.parametrize("ctx", [V1, V2, INO64])
def test_file_and_directory_xattrs_round_trip(ctx: bytes) -> None:
    binding = (12, UUID) if ctx is INO64 else None
    x = encode_inode_xattrs(ctx, binding=binding, size=5000)
    a = decode_xattrs(x, regular=True)
    assert a.context is not None and a.context.to_bytes() == ctx
    assert (a.size, a.block_size) == (5000, None)
    assert (a.ino, a.fs_uuid) == (binding or (None, None))
    d = decode_xattrs(
        {**encode_inode_xattrs(ctx, binding=binding), **encode_dir_xattrs(1024)}, regular=False
    )
    assert d.block_size == 1024 and d.size is None
    assert original_xattrs({**x, b"user.keep": b"1"}) == {b"user.keep": b"1"}


def test_directory_hash_round_trips_under_the_kernel_s_numbers() -> None:
    from ciphertextfs.ext4 import dirhash

    kernel = [
        dirhash.DX_HASH_LEGACY,
        dirhash.DX_HASH_HALF_MD4,
        dirhash.DX_HASH_TEA,
        dirhash.DX_HASH_LEGACY_UNSIGNED,
        dirhash.DX_HASH_HALF_MD4_UNSIGNED,
        dirhash.DX_HASH_TEA_UNSIGNED,
    ]
    assert kernel == list(range(len(DIRHASH_ALGORITHMS)))
    for version in kernel:
        x = encode_dir_xattrs(4096, (version, UUID))
        assert decode_dirhash(x[XATTR_FSCRYPT_DIRHASH]) == (version, UUID)
    assert encode_dir_xattrs(4096, (1, UUID))[XATTR_FSCRYPT_DIRHASH] == (
        b"half_md4 000102030405060708090a0b0c0d0e0f"
    )
    assert XATTR_FSCRYPT_DIRHASH not in encode_dir_xattrs(4096, (dirhash.DX_HASH_SIPHASH, UUID))
    # decrypt and inspect read directories through decode_xattrs: the value,
    # good or bad, is neither restored nor an error there.
    for value in (b"half_md4 " + UUID.hex().encode(), b"garbage"):
        xattrs = {**encode_dir_xattrs(1024), XATTR_FSCRYPT_DIRHASH: value}
        assert decode_xattrs(xattrs, regular=False).block_size == 1024
        assert original_xattrs(xattrs) == {}


@pytest.mark.parametrize(
    "value",
    [b"", b"half_md4", b"half_md4 " + UUID.hex().upper().encode(), b"md5 " + bytes(32)],
)
def test_bad_directory_hash_raises_format_error(value: bytes) -> None:
    with pytest.raises(FormatError, match="user.fscrypt.dirhash"):
        decode_dirhash(value)


def test_format_1_file_xattrs_carry_the_block_size() -> None:
    a = decode_xattrs(encode_inode_xattrs(V2, size=1, block_size=1024), regular=True)
    assert a.block_size == 1024
    assert decode_xattrs({}, regular=True).context is None


@pytest.mark.parametrize(
    "xattrs, why",
    [
        ({b"user.fscrypt.context": V2}, "without user.fscrypt.size"),
        ({b"user.fscrypt.context": INO64, b"user.fscrypt.size": b"1"}, "IV_INO_LBLK"),
        ({b"user.fscrypt.context": V2, b"user.fscrypt.size": b"01"}, "not a decimal"),
        ({b"user.fscrypt.context": b"\x07" + bytes(39), b"user.fscrypt.size": b"1"}, "version 7"),
        ({b"user.fscrypt.block_size": b"3000"}, "impossible user.fscrypt.block_size"),
    ],
)
def test_bad_xattrs_raise_format_error(xattrs, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        decode_xattrs(xattrs, regular=True)


@pytest.mark.parametrize("ct_len", [1, 16, 17, 18, 686, 687, 700, 4094])
def test_symlink_inline_bound_is_the_longest_inline_form(ct_len: int) -> None:
    """What lets a listing skip reading a symlink whose i_size is short enough."""
    ciphertext = bytes(range(256)) * 16
    longest = EncryptedSymlink(INO64, ciphertext[:ct_len], 2**32 - 1, UUID)
    assert len(encode_symlink_inline(longest)) == symlink_inline_bound(ct_len)
    for ctx in (V1, V2):
        link = EncryptedSymlink(ctx, ciphertext[:ct_len], None, None)
        assert len(encode_symlink_inline(link)) < symlink_inline_bound(ct_len)


@pytest.mark.parametrize("ctx", [V1, V2, INO64])
@pytest.mark.parametrize("ct_len", [16, 700, 4094])
def test_symlinks_round_trip_inline_or_through_the_side_file(ctx: bytes, ct_len: int) -> None:
    binding = (7, UUID) if ctx is INO64 else (None, None)
    link = EncryptedSymlink(ctx, (bytes(range(256)) * 17)[:ct_len], *binding)
    target, inline = encode_symlink(link, 99)
    assert len(target) <= SYMLINK_INLINE_MAX
    if inline is None:
        assert target.startswith(b"fscrypt:1:")
        assert decode_symlink(target, None) == link
        assert len(encode_symlink_inline(link)) <= SYMLINK_INLINE_MAX
    else:
        assert target == b"fscrypt:2:99"
        assert len(inline) > SYMLINK_INLINE_MAX
        side = decode_side_file(encode_side_file([], {99: inline}))
        assert decode_symlink(target, side) == link
        with pytest.raises(FormatError, match="missing from the directory"):
            decode_symlink(target, None)
        with pytest.raises(FormatError, match="missing from the directory"):
            decode_symlink(b"fscrypt:2:98", side)


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"fscrypt:1:AA", "2 or 4"),
        (b"fscrypt:1:!!:AA", "invalid base64url"),
        (b"fscrypt:1:AgEE:AAAA", "context of 3 bytes"),
        (b"fscrypt:1:" + base64url_encode(V2).encode() + b":", "empty ciphertext"),
        (b"fscrypt:1:" + base64url_encode(INO64).encode() + b":AAAA", "IV_INO_LBLK"),
        (b"fscrypt:2:x", "not a decimal"),
        (b"fscrypt:3:1", "fscrypt:1: format"),
    ],
)
def test_bad_symlink_targets(bad: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        decode_symlink(bad, None)


def test_side_file_round_trip_and_format_1() -> None:
    names = [(b"N" * 40, b"\x01" * 200), (b"M" * 40, b"\x02" * 180)]
    link = encode_symlink_inline(EncryptedSymlink(V2, b"c" * 3000))
    v2 = encode_side_file(names, {5: link})
    assert v2.startswith(SIDE_FILE_HEADER)
    side = decode_side_file(v2)
    assert (side.version, side.damaged) == (2, 0)
    assert side.names == dict(names) and side.symlinks == {5: link}
    v1 = decode_side_file(encode_side_file_v1(names))
    assert (v1.version, v1.damaged, v1.names, v1.symlinks) == (1, 0, dict(names), {})
    # The format-1 text as the view wrote it, byte for byte.
    assert decode_side_file(b"abc QUJD\nbroken\nx !!\n").names == {b"abc": b"ABC"}
    assert decode_side_file(b"abc QUJD\nbroken\nx !!\n").damaged == 2


def test_damaged_side_file_lines_are_counted() -> None:
    good = encode_side_file([(b"N" * 40, b"\x01" * 200)], {})
    side = decode_side_file(good + b"n onlyname\nl 5 fscrypt:1:AA\nl x y\nz what\n")
    assert side.damaged == 4 and len(side.names) == 1 and not side.symlinks


def test_symlink_with_inline_target_in_the_side_file_is_checked() -> None:
    assert decode_symlink_inline(encode_symlink_inline(EncryptedSymlink(V1, b"a" * 16))).ino is None
