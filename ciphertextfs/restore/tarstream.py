"""A one-pass tar reader that survives damage: 512-byte blocks in, members out.

Python's tarfile takes the first bad header for the end of the archive and
needs to seek; a backup read from a pipe, or one with a flipped bit, needs
neither.  This reader parses POSIX ustar, pax extended and global headers
(`SCHILY.xattr.*` with raw binary values, libarchive's base64
`LIBARCHIVE.xattr.*`), GNU long names and links ('L', 'K'), GNU sparse
members (old 'S' headers and pax sparse 0.0, 0.1 and 1.0), base-256
numbers, and v7 headers.  Everything read from the archive is checked
before use, and what goes wrong is yielded as a record instead of raised:

- `Rejected`: a member whose headers are sound as blocks but whose fields
  are not (a uid of -5, an mtime of 10^20, a NUL in a name, a pax record
  that does not parse, an absurd long name); its data is skipped and
  reading goes on at the next header.
- `Damage`: bytes of the archive lost: a block that is not a header, after
  which the reader skips block by block to the next valid header (GNU tar
  says "Skipping to next header"), an archive that ends inside a member or
  without its end-of-archive blocks, compressed data that cannot be
  decompressed.

The compression is recognised by its magic number, never by a file name:
gzip, bzip2, xz, zstd, or none.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import errno
import gzip
import io
import lzma
import re
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ciphertextfs import posix_acl

__all__ = [
    "BLOCK",
    "Member",
    "Rejected",
    "Damage",
    "HeaderError",
    "TarReader",
    "decompressed",
    "parse_number",
    "parse_header",
    "parse_pax",
    "pax_xattrs",
    "MAX_NAME",
    "MAX_PAX",
]

BLOCK = 512
_ZERO = bytes(BLOCK)
#: A long name or link target longer than this is refused (PATH_MAX is 4096;
#: an archive path may be longer, but not by orders of magnitude).
MAX_NAME = 64 * 1024
#: Pax extended headers carry the xattrs; Linux caps one value at 64 KiB and
#: all of an inode's at a few blocks, so this leaves ample room.
MAX_PAX = 16 * 1024 * 1024
#: Sparse maps: entries of one member.
MAX_SPARSE = 1 << 20
#: Times are restored as int64 nanoseconds (utimensat's range).
_NS_LIMIT = 1 << 63
_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "no change" to chown
_MAJOR_MAX = (1 << 12) - 1  # Linux dev_t: 12 bits of major, 20 of minor
_MINOR_MAX = (1 << 20) - 1
#: POSIX caps the size field's octal at 11 digits; base-256 can say more,
#: and pax sizes anything: beyond this no filesystem could hold the file.
_SIZE_MAX = 1 << 63

_REG = (b"0", b"\0", b"7")
_HIGH = bytes(range(128, 256))
_UNREADABLE = "archive unreadable (damaged compressed data or a read error)"
#: How a pax extended header's data begins: "LEN keyword=".
_PAX_START = re.compile(rb"[1-9][0-9]{0,19} [A-Za-z][A-Za-z0-9._-]{0,200}=")
_KNOWN = frozenset(b"01234567") | {0}


class HeaderError(ValueError):
    """A block that is not a usable tar header, or a field that does not parse."""


@dataclass
class Member:
    """One archive member, after its pax and GNU long-name headers.

    `offset` is where its first header (pax or long name included) starts
    in the uncompressed archive; `data_offset` where its data starts.
    `size` counts the data stored in the archive; for a sparse member
    `real_size` is the file's length and `sparse` the (offset, length) of
    each stored piece.
    """

    offset: int
    data_offset: int
    path: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int | None
    size: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    real_size: int = 0
    sparse: list[tuple[int, int]] | None = None


@dataclass
class Rejected:
    """A member read but refused: `reason` says which field and why."""

    offset: int
    path: bytes
    reason: str


@dataclass
class Damage:
    """Bytes `start` to `end` of the archive are lost (`end` None: to its end)."""

    start: int
    end: int | None
    reason: str
    path: bytes | None = None


# -- numbers ---------------------------------------------------------------


def parse_number(field_: bytes, what: str) -> int:
    """A numeric header field: octal (NUL/space padded) or base-256.

    Base-256 (GNU, star) marks the field with 0x80 for positive and 0xff
    for negative numbers; the rest is a big-endian two's complement value.
    An empty field is 0, as tar writers of all kinds leave it.
    """
    if field_ and field_[0] & 0x80:
        if field_[0] not in (0x80, 0xFF):
            raise HeaderError(f"{what}: bad base-256 number (lead byte {field_[0]:#04x})")
        n = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            n -= 1 << (8 * (len(field_) - 1))
        return n
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        if field_.strip(b"\0 "):
            raise HeaderError(f"{what}: bytes after the number's terminator")
        return 0
    if text.translate(None, b"01234567"):
        raise HeaderError(f"{what}: {text[:16]!r} is not an octal number")
    return int(text, 8)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = parse_number(block[148:156], "checksum")
    except HeaderError:
        return False
    head = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(head)
    if stored == unsigned:
        return True
    # Some old writers summed signed chars.
    return stored == unsigned - 256 * (len(head) - len(head.translate(None, _HIGH)))


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


@dataclass
class Header:
    """One 512-byte header block, its fields decoded (times in seconds)."""

    name: bytes
    mode: int
    uid: int | None
    gid: int | None
    size: int
    mtime: int | None
    typeflag: bytes
    linkname: bytes
    devmajor: int | None
    devminor: int | None
    gnu: bool
    problems: list[str]
    block: bytes


def parse_header(block: bytes) -> Header:
    """Decode a header block; HeaderError when it is not one.

    The size must parse (without it the next header cannot be found); a
    bad uid, gid, mtime or device number is kept as a problem of the
    member, which is then rejected while reading goes on.
    """
    if len(block) != BLOCK:
        raise HeaderError(f"partial block of {len(block)} bytes")
    if not _checksum_ok(block):
        raise HeaderError("header checksum mismatch")
    magic = block[257:265]
    gnu = magic == b"ustar  \0"
    posix = block[257:263] == b"ustar\0"
    if not (gnu or posix) and block[257:265].strip(b"\0"):
        raise HeaderError(f"unknown header magic {magic!r}")
    typeflag = block[156:157]
    if typeflag[0] not in _KNOWN and not (gnu or posix):
        raise HeaderError(f"v7 header with type {typeflag!r}")
    size = parse_number(block[124:136], "size")
    if size < 0:
        raise HeaderError(f"negative size {size}")
    problems: list[str] = []

    def num(lo: int, hi: int, what: str) -> int | None:
        try:
            return parse_number(block[lo:hi], what)
        except HeaderError as e:
            problems.append(str(e))
            return None

    try:
        mode = parse_number(block[100:108], "mode")
    except HeaderError as e:
        problems.append(str(e))
        mode = 0
    name = _cstr(block[0:100])
    if posix and block[345] and typeflag not in (b"x", b"g"):
        name = _cstr(block[345:500]) + b"/" + name
    return Header(
        name=name,
        mode=mode,
        uid=num(108, 116, "uid"),
        gid=num(116, 124, "gid"),
        size=size,
        mtime=num(136, 148, "mtime"),
        typeflag=typeflag,
        linkname=_cstr(block[157:257]),
        devmajor=num(329, 337, "devmajor") if (gnu or posix) else 0,
        devminor=num(337, 345, "devminor") if (gnu or posix) else 0,
        gnu=gnu,
        problems=problems,
        block=block,
    )


# -- pax -------------------------------------------------------------------


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Records "LEN KEYWORD=VALUE\\n" of a pax header; HeaderError on any bad one.

    Values are bytes: `SCHILY.xattr.*` values are raw binary, NUL and
    newline included, which the byte-counted length makes unambiguous.
    """
    out: dict[bytes, bytes] = {}
    sparse_00: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break  # NUL padding some writers leave
        sp = data.find(b" ", pos, min(pos + 21, n))
        if sp < 0 or sp == pos or not data[pos:sp].isdigit():
            raise HeaderError(f"pax record at byte {pos}: no length")
        length = int(data[pos:sp])
        end = pos + length
        if length < sp - pos + 4 or end > n:
            raise HeaderError(f"pax record at byte {pos}: length {length} out of bounds")
        if data[end - 1] != 0x0A:
            raise HeaderError(f"pax record at byte {pos}: not newline-terminated")
        eq = data.find(b"=", sp + 1, end - 1)
        if eq <= sp + 1:
            raise HeaderError(f"pax record at byte {pos}: no keyword=value")
        key, value = data[sp + 1 : eq], data[eq + 1 : end - 1]
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            sparse_00.append(value)  # sparse 0.0: the map as repeated records, in order
        else:
            out[key] = value
        pos = end
    if sparse_00:
        out[b"GNU.sparse.map"] = b",".join(sparse_00)
    return out


def _unescape_schily(name: bytes) -> bytes:
    """GNU tar escapes '=' and '%' in xattr names inside pax keywords."""
    return name.replace(b"%3D", b"=").replace(b"%25", b"%")


def _url_decode(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:
            hexd = raw[i + 1 : i + 3]
            if len(hexd) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in hexd):
                raise HeaderError(f"bad %-escape in xattr name {raw[:64]!r}")
            out.append(int(hexd, 16))
            i += 3
            continue
        out.append(raw[i])
        i += 1
    return bytes(out)


_SCHILY_ACLS = (
    (b"SCHILY.acl.access", posix_acl.XATTR_NAME_POSIX_ACL_ACCESS),
    (b"SCHILY.acl.default", posix_acl.XATTR_NAME_POSIX_ACL_DEFAULT),
)


def pax_xattrs(pax: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Extended attributes of a member from its pax records.

    GNU tar writes `SCHILY.xattr.<name>` with the raw value; bsdtar writes
    `LIBARCHIVE.xattr.<url-encoded name>` with the value in base64 (and
    usually the SCHILY record as well, which then wins).
    """
    out: dict[bytes, bytes] = {}
    lib: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            out[_unescape_schily(key[13:])] = value
        elif key.startswith(b"LIBARCHIVE.xattr."):
            name = _url_decode(key[17:])
            try:
                lib[name] = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except binascii.Error:
                raise HeaderError(f"xattr {name[:64]!r}: bad base64 value") from None
    for name, value in lib.items():
        out.setdefault(name, value)
    # bsdtar keeps ACLs only as acl(5) text; GNU tar writes the binary xattr too, which wins.
    for key, name in _SCHILY_ACLS:
        if key in pax and name not in out:
            try:
                value = posix_acl.from_text(pax[key])
            except posix_acl.AclError as e:
                raise HeaderError(f"{key.decode()}: {e}") from None
            # A minimal access ACL is only the mode bits: GNU tar writes one for
            # every file with a default ACL, where the file itself has none.
            if not (name == posix_acl.XATTR_NAME_POSIX_ACL_ACCESS and posix_acl.is_minimal(value)):
                out[name] = value
    for name in out:
        if not name or b"\0" in name:
            raise HeaderError(f"xattr name {name[:64]!r} is empty or holds a NUL")
    return out


def _pax_decimal(value: bytes, what: str, lo: int, hi: int) -> int:
    text = value.strip()
    body = text[1:] if text[:1] == b"-" else text
    if not body.isdigit() or len(body) > 40:
        raise HeaderError(f"pax {what} {value[:24]!r} is not a decimal number")
    n = int(text)
    if not lo <= n <= hi:
        raise HeaderError(f"pax {what} {n} out of range")
    return n


def _pax_time_ns(value: bytes, what: str) -> int:
    """A pax time ("1700000000.123456789", maybe negative) as nanoseconds."""
    text = value.strip()
    neg = text[:1] == b"-"
    body = text[1:] if neg else text
    sec, _, frac = body.partition(b".")
    if not sec.isdigit() or (frac and not frac.isdigit()) or len(sec) > 30:
        raise HeaderError(f"pax {what} {value[:32]!r} is not a time")
    ns = int(sec) * 1_000_000_000 + int((frac + b"000000000")[:9])
    ns = -ns if neg else ns
    if not -_NS_LIMIT < ns < _NS_LIMIT:
        raise HeaderError(f"{what} {value[:32].decode('ascii', 'replace')} s out of range")
    return ns


# -- decompression ---------------------------------------------------------


class DecompressError(Exception):
    """The compressed stream cannot be decompressed past this point."""


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read put back in front (for the magic)."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head = head
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_up_to(raw: BinaryIO, n: int) -> bytes:
    """`n` bytes, or fewer only at the end of the stream: reads may return short."""
    parts = []
    while n > 0:
        b = raw.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def decompressed(raw: BinaryIO) -> tuple[BinaryIO, str | None]:
    """The uncompressed bytes of `raw` and the compression found by magic."""
    if raw.seekable():
        start = raw.tell()
        head = raw.read(6)
        raw.seek(start)
        src: BinaryIO = raw
    else:
        head = read_up_to(raw, 6)
        src = io.BufferedReader(_Prefixed(head, raw), 1 << 16)  # type: ignore[assignment]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb"), "gzip"  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(src), "bzip2"  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\0"):
        return lzma.LZMAFile(src), "xz"  # type: ignore[return-value]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
        return reader, "zstd"  # type: ignore[return-value]
    return src, None  # type: ignore[return-value]


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return tuple(errs)


class _Source:
    """Uncompressed archive bytes with their offset; errors become DecompressError."""

    def __init__(self, stream: BinaryIO, *, can_seek: bool) -> None:
        self.stream = stream
        self.pos = 0
        self.can_seek = can_seek
        self.errors = _decompress_errors()
        self.back = b""

    def read(self, n: int) -> bytes:
        if not self.back:
            try:
                b = self.stream.read(n)
            except self.errors as e:
                raise DecompressError(str(e) or type(e).__name__) from None
            self.pos += len(b)
            if len(b) == n or not b:
                return b
            return b + self.read(n - len(b))
        out = b""
        if self.back:
            out, self.back = self.back[:n], self.back[n:]
            self.pos += len(out)
            n -= len(out)
        parts = [out]
        while n > 0:
            try:
                b = self.stream.read(n)
            except self.errors as e:
                raise DecompressError(str(e) or type(e).__name__) from None
            if not b:
                break
            parts.append(b)
            self.pos += len(b)
            n -= len(b)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        self.back = data + self.back
        self.pos -= len(data)

    def skip(self, n: int) -> int:
        """Skip n bytes; how many were actually there."""
        if n <= 0:
            return 0
        if self.can_seek and not self.back:
            here = self.stream.tell()
            end = self.stream.seek(0, io.SEEK_END)
            step = min(n, end - here)
            self.stream.seek(here + step)
            self.pos += step
            return step
        done = 0
        while done < n:
            b = self.read(min(n - done, 1 << 20))
            if not b:
                break
            done += len(b)
        return done


# -- the reader ------------------------------------------------------------


def _pad(n: int) -> int:
    return -n % BLOCK


class _Data(io.RawIOBase):
    """The data of the current member; valid until the next member is read."""

    def __init__(self, reader: TarReader, member: Member, serial: int) -> None:
        self.reader = reader
        self.member = member
        self.serial = serial

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.reader._read_data(self, 1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        return self.reader._read_data(self, n)

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.reader._read_data(self, len(b))
        b[: len(data)] = data
        return len(data)


class TarReader:
    """Iterate over `Member`, `Rejected` and `Damage` records in archive order.

    The data of a member is read with `open(member)` before the next record
    is asked for; asking for the next record skips what was not read.
    """

    def __init__(self, stream: BinaryIO, *, can_seek: bool = False) -> None:
        self.src = _Source(stream, can_seek=can_seek)
        self._serial = 0
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0
        self._current: Member | None = None
        self._truncated: str | None = None
        self._sparse_state: tuple[list[tuple[int, int]], int, int] | None = None
        self.globals: dict[bytes, bytes] = {}

    # data of the current member -----------------------------------------

    def open(self, member: Member) -> BinaryIO:
        if member is not self._current:
            raise OSError(errno.ESPIPE, "archive member is no longer the current one")
        if member.sparse is not None:
            self._sparse_state = (list(member.sparse), 0, member.real_size)
        return _Data(self, member, self._serial)  # type: ignore[return-value]

    def _raw_data(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            return b""
        try:
            b = self.src.read(n)
        except DecompressError as e:
            self._truncated = f"{_UNREADABLE}: {e}"
            self._left = 0
            raise OSError(errno.EIO, f"archive unreadable inside this member: {e}") from None
        size = self._current.size if self._current is not None else 0
        self._left -= len(b)
        if len(b) < n:
            done = size - self._left
            self._truncated = "archive ends inside this member"
            self._left = 0
            raise OSError(errno.EIO, f"archive ends {done} bytes into this member's {size} bytes")
        return b

    def _read_data(self, handle: _Data, n: int) -> bytes:
        if handle.serial != self._serial or handle.member is not self._current:
            raise OSError(errno.ESPIPE, "archive member is no longer the current one")
        if self._sparse_state is None:
            return self._raw_data(n)
        pieces, pos, real = self._sparse_state
        while pieces and pos >= pieces[0][0] + pieces[0][1]:
            pieces.pop(0)  # done, or empty (GNU ends its maps with one)
        if pos >= real or n <= 0:
            return b""
        if pieces and pos >= pieces[0][0]:
            data = self._raw_data(min(n, pieces[0][0] + pieces[0][1] - pos))
        else:
            nxt = pieces[0][0] if pieces else real
            data = bytes(min(n, nxt - pos, 1 << 20))
        self._sparse_state = (pieces, pos + len(data), real)
        return data

    # headers --------------------------------------------------------------

    def _finish_current(self) -> Damage | None:
        """Skip the unread data and padding of the current member."""
        m = self._current
        self._current = None
        self._serial += 1
        self._sparse_state = None
        if m is None:
            return None
        if self._truncated is None:
            want = self._left + _pad(m.size)
            try:
                got = self.src.skip(want)
            except DecompressError as e:
                self._truncated = f"{_UNREADABLE}: {e}"
                got = want
            if got < want and got < self._left:
                self._truncated = "archive ends inside this member"
        self._left = 0
        if self._truncated is not None:
            why, self._truncated = self._truncated, None
            return Damage(self.src.pos, None, f"{why}: nothing after it", m.path)
        return None

    def _read_block(self) -> bytes:
        return self.src.read(BLOCK)

    def _read_ext(self, h: Header, limit: int, what: str) -> tuple[bytes | None, str | None]:
        """The data of a pax or long-name header; (None, why) if refused."""
        if h.size > limit:
            got = self.src.skip(h.size + _pad(h.size))
            if got < h.size:
                return None, "EOF"
            return None, f"{what} of {h.size} bytes (limit {limit})"
        data = self.src.read(h.size)
        if len(data) < h.size:
            return None, "EOF"
        if self.src.skip(_pad(h.size)) < _pad(h.size):
            return None, "EOF"
        return data, None

    def __iter__(self) -> Iterator[Member | Rejected | Damage]:
        try:
            yield from self._records()
        except DecompressError as e:
            yield Damage(self.src.pos, None, f"{_UNREADABLE}: {e}: nothing after it")

    def _records(self) -> Iterator[Member | Rejected | Damage]:
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        first: int | None = None  # offset of the pending extension headers
        refuse: str | None = None  # why the pending member is refused
        bad_at: int | None = None
        bad_why = ""
        ext_lost = False
        heads: deque[bytes] = deque()
        while True:
            dmg = self._finish_current()
            if dmg is not None:
                yield dmg
                return
            off = self.src.pos
            block = self._read_block()
            if len(block) < BLOCK:
                if bad_at is not None:
                    yield Damage(bad_at, off, f"{bad_why}; no valid header after it")
                if block:
                    start = first if first is not None else off
                    yield Damage(start, None, "archive ends with a partial block (truncated)")
                elif first is not None:
                    yield Damage(first, None, "archive ends after an extended header (truncated)")
                else:
                    yield Damage(off, None, "archive ends without its end-of-archive blocks")
                return
            if block == _ZERO:
                nxt = self._read_block()
                if nxt == _ZERO or not nxt:
                    if bad_at is not None:
                        yield Damage(bad_at, off, f"{bad_why}; no valid header after it")
                    if first is not None:
                        yield Damage(first, off, "extended header without its member")
                    return
                self.src.unread(nxt)
                # GNU tar stops here ("A lone zero block"); a header wiped to
                # zeros looks the same, so read on and say so.
                yield Damage(off, off + BLOCK, "zero block where a header was expected")
                continue
            try:
                h = parse_header(block)
            except HeaderError as e:
                if bad_at is None:
                    bad_at, bad_why = (first if first is not None else off), str(e)
                    pax, longname, longlink, first, refuse = {}, None, None, None, None
                    ext_lost, heads = False, deque(maxlen=MAX_NAME // BLOCK + 2)
                ext_lost = ext_lost or _PAX_START.match(block) is not None
                heads.append(block[:100])
                continue
            if bad_at is not None:
                yield Damage(
                    bad_at,
                    off,
                    f"bad header at offset {bad_at} ({bad_why}): skipped to the next header",
                )
                bad_at = None
                # The skipped blocks may have been this member's pax or GNU
                # long-name header: then its name, xattrs (its fscrypt
                # context) and times are unknown, and restoring it from the
                # ustar fields alone would restore it wrongly.
                name_field = h.block[:100]
                if ext_lost or (name_field[-1] and any(x == name_field for x in heads)):
                    refuse = (
                        "its extended header was in the damaged region before it: "
                        "name, xattrs and times unknown"
                    )
            t = h.typeflag
            if t in (b"x", b"g", b"L", b"K"):
                if first is None:
                    first = off
                limit = MAX_PAX if t in (b"x", b"g") else MAX_NAME
                what = "extended header" if t in (b"x", b"g") else "GNU long name"
                data, why = self._read_ext(h, limit, what)
                if why == "EOF":
                    yield Damage(first, None, "archive ends inside an extended header")
                    return
                if data is None:
                    refuse = refuse or why
                    continue
                try:
                    if t == b"x":
                        pax.update(parse_pax(data))
                    elif t == b"g":
                        self.globals.update(parse_pax(data))
                    else:
                        name = data.rstrip(b"\0")
                        if b"\0" in name:
                            raise HeaderError("GNU long name holds a NUL")
                        if t == b"L":
                            longname = name
                        else:
                            longlink = name
                except HeaderError as e:
                    refuse = refuse or str(e)
                continue
            start = first if first is not None else off
            record = self._member(h, off, start, {**self.globals, **pax}, longname, longlink)
            pax, longname, longlink, first = {}, None, None, None
            if isinstance(record, Rejected):
                yield record
                continue
            if refuse is not None:
                record_reason, refuse = refuse, None
                self._current = record
                self._left = record.size
                yield Rejected(start, record.path, record_reason)
                continue
            self._current = record
            self._left = record.size
            yield record

    def _member(
        self,
        h: Header,
        off: int,
        start: int,
        pax: dict[bytes, bytes],
        longname: bytes | None,
        longlink: bytes | None,
    ) -> Member | Rejected:
        path = longname if longname is not None else h.name
        if b"path" in pax:
            path = pax[b"path"]
        link = longlink if longlink is not None else h.linkname
        if b"linkpath" in pax:
            link = pax[b"linkpath"]
        problems = list(h.problems)
        size = h.size
        if b"size" in pax:
            try:
                size = _pax_decimal(pax[b"size"], "size", 0, _SIZE_MAX)
            except HeaderError as e:
                problems.append(str(e))
        extra = 0
        if h.typeflag == b"S" and h.gnu:
            ext = self._old_sparse(h)
            if isinstance(ext, str):
                problems.append(ext)
                sparse, real = None, size
            else:
                sparse, real, extra = ext
        else:
            sparse, real = None, size
        m = Member(
            offset=start,
            data_offset=off + BLOCK + extra,
            path=path,
            typeflag=h.typeflag,
            mode=h.mode & 0o7777,
            uid=h.uid if h.uid is not None else 0,
            gid=h.gid if h.gid is not None else 0,
            mtime_ns=(h.mtime or 0) * 1_000_000_000,
            atime_ns=None,
            size=size,
            linkname=link,
            devmajor=h.devmajor or 0,
            devminor=h.devminor or 0,
            real_size=real,
            sparse=sparse,
        )
        if h.size > _SIZE_MAX:
            problems.append(f"size {h.size} out of range")
        for key, attr, lo, hi in (
            (b"uid", "uid", 0, _UID_MAX),
            (b"gid", "gid", 0, _UID_MAX),
            (b"SCHILY.devmajor", "devmajor", 0, _MAJOR_MAX),
            (b"SCHILY.devminor", "devminor", 0, _MINOR_MAX),
        ):
            if key in pax:
                try:
                    setattr(m, attr, _pax_decimal(pax[key], attr, lo, hi))
                except HeaderError as e:
                    problems.append(str(e))
            elif not lo <= getattr(m, attr) <= hi:
                problems.append(f"{attr} {getattr(m, attr)} out of range")
        try:
            if b"mtime" in pax:
                m.mtime_ns = _pax_time_ns(pax[b"mtime"], "mtime")
            elif not -_NS_LIMIT < m.mtime_ns < _NS_LIMIT:
                raise HeaderError(f"mtime {h.mtime} s out of range")
            if b"atime" in pax:
                m.atime_ns = _pax_time_ns(pax[b"atime"], "atime")
        except HeaderError as e:
            problems.append(str(e))
        try:
            m.xattrs = pax_xattrs(pax)
        except HeaderError as e:
            problems.append(str(e))
        if b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax:
            try:
                self._pax_sparse(m, pax)
            except HeaderError as e:
                problems.append(str(e))
        if not path:
            problems.append("empty name")
        elif b"\0" in path or b"\0" in link:
            problems.append("NUL in the member's name or link target")
        if len(path) > MAX_NAME or len(link) > MAX_NAME:
            problems.append(f"name of {max(len(path), len(link))} bytes (limit {MAX_NAME})")
        if problems:
            # The data is skipped with the size from the header: set the
            # member current (it is never handed out) so skipping happens.
            self._current = m
            self._left = m.size
            return Rejected(start, path, "; ".join(problems))
        return m

    def _old_sparse(self, h: Header) -> tuple[list[tuple[int, int]], int, int] | str:
        """The sparse map of an old GNU 'S' header and its extension blocks."""
        block = h.block
        pieces: list[tuple[int, int]] = []
        extra = 0

        def take(area: bytes, count: int) -> None:
            for i in range(count):
                o, n = area[i * 24 : i * 24 + 12], area[i * 24 + 12 : i * 24 + 24]
                if not o.strip(b"\0"):
                    return
                pieces.append((parse_number(o, "sparse offset"), parse_number(n, "sparse size")))

        try:
            take(block[386:482], 4)
            extended = block[482]
            real = parse_number(block[483:495], "sparse real size")
            while extended:
                ext = self._read_block()
                extra += BLOCK
                if len(ext) < BLOCK:
                    return "archive ends inside a sparse map"
                take(ext[:504], 21)
                extended = ext[504]
                if len(pieces) > MAX_SPARSE:
                    return "sparse map too long"
        except HeaderError as e:
            return str(e)
        bad = _check_sparse(pieces, real, h.size)
        return bad if bad else (pieces, real, extra)

    def _pax_sparse(self, m: Member, pax: dict[bytes, bytes]) -> None:
        """GNU pax sparse: 0.0 (offset/numbytes pairs), 0.1 (map), 1.0 (map in the data)."""
        real_key = b"GNU.sparse.realsize" if b"GNU.sparse.realsize" in pax else b"GNU.sparse.size"
        if real_key not in pax:
            raise HeaderError("sparse member without its real size")
        real = _pax_decimal(pax[real_key], "sparse real size", 0, _SIZE_MAX)
        if b"GNU.sparse.name" in pax:
            m.path = pax[b"GNU.sparse.name"]
        numbers: list[int]
        if pax.get(b"GNU.sparse.major") == b"1":
            numbers = self._sparse_map_in_data(m)
        elif b"GNU.sparse.map" in pax:
            raw = pax[b"GNU.sparse.map"]
            numbers = [_pax_decimal(x, "sparse map", 0, _SIZE_MAX) for x in raw.split(b",")]
        else:
            raise HeaderError("sparse member without its map")
        if len(numbers) % 2:
            raise HeaderError("sparse map with an odd count of numbers")
        pieces = [(numbers[i], numbers[i + 1]) for i in range(0, len(numbers), 2)]
        bad = _check_sparse(pieces, real, m.size)
        if bad:
            raise HeaderError(bad)
        m.sparse, m.real_size = pieces, real

    def _sparse_map_in_data(self, m: Member) -> list[int]:
        """Sparse 1.0: decimal lines at the start of the data, padded to a block."""
        buf = b""
        used = 0
        lines: list[bytes] = []
        count: int | None = None
        while count is None or len(lines) < 1 + 2 * count:
            if b"\n" not in buf:
                if m.size < BLOCK or used > 64 * MAX_SPARSE:
                    raise HeaderError("sparse map runs past the member's data")
                blk = self.src.read(BLOCK)
                if len(blk) < BLOCK:
                    raise HeaderError("archive ends inside a sparse map")
                used += BLOCK
                m.size -= BLOCK
                m.data_offset += BLOCK
                self._left = m.size
                buf += blk
                continue
            line, buf = buf.split(b"\n", 1)
            lines.append(line)
            if count is None:
                count = _pax_decimal(line, "sparse map count", 0, MAX_SPARSE)
        return [_pax_decimal(x, "sparse map", 0, _SIZE_MAX) for x in lines[1:]]


def _check_sparse(pieces: list[tuple[int, int]], real: int, stored: int) -> str | None:
    pos = 0
    total = 0
    for off, n in pieces:
        if off < pos or n < 0:
            return "sparse map out of order"
        pos = off + n
        total += n
    if pos > real:
        return f"sparse map reaches {pos}, past the real size {real}"
    if total != stored:
        return f"sparse map holds {total} bytes, the member {stored}"
    return None
