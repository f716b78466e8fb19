"""A tiny ustar/pax writer for crafting archives block by block in tests."""

from __future__ import annotations

from ciphertextfs.restore.tarstream import BLOCK


def octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def b256(n: int, width: int) -> bytes:
    raw = (n % (1 << (8 * width - 8))).to_bytes(width - 1, "big")
    return (b"\xff" if n < 0 else b"\x80") + raw


def header(
    name: bytes = b"f",
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    magic: bytes = b"ustar\x0000",
    raw: dict[int, bytes] | None = None,
    checksum: bool = True,
) -> bytes:
    b = bytearray(BLOCK)
    b[0 : len(name)] = name
    b[100:108] = octal(mode, 8)
    b[108:116] = octal(uid, 8)
    b[116:124] = octal(gid, 8)
    b[124:136] = octal(size, 12)
    b[136:148] = octal(mtime, 12)
    b[156:157] = typeflag
    b[157 : 157 + len(linkname)] = linkname
    b[257:265] = magic
    b[329:337] = octal(devmajor, 8)
    b[337:345] = octal(devminor, 8)
    for off, value in (raw or {}).items():
        b[off : off + len(value)] = value
    if checksum:
        b[148:156] = b" " * 8
        b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", **kw) -> bytes:
    return header(name, size=len(data), **kw) + padded(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: dict[bytes, bytes] | bytes, typeflag: bytes = b"x") -> bytes:
    data = (
        records
        if isinstance(records, bytes)
        else b"".join(pax_record(k, v) for k, v in records.items())
    )
    return header(b"PaxHeaders/f", typeflag=typeflag, size=len(data)) + padded(data)


EOF = bytes(2 * BLOCK)
