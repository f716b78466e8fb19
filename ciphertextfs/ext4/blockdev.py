"""The only code that touches the source: a read-only block device or image.

Metadata goes through buffered reads (small, repeated, worth the page
cache).  File data goes through O_DIRECT so that a backup streaming a whole
filesystem does not evict everything else from the page cache; where the
source cannot do O_DIRECT (tmpfs, some FUSE files) the reads fall back to
buffered ones, logged once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .errors import CorruptError, Ext4Error

log = logging.getLogger("ciphertextfs")

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
DEFAULT_ALIGN = 4096
# One O_DIRECT request at most this large; larger reads loop.
DIRECT_CHUNK = 8 << 20
# Requests `read_data_many` keeps in flight: a device answers a queue of
# small random reads many times faster than the same reads one by one.
QUEUE_DEPTH = 8
# Bytes asked for per readahead hint: within any device's readahead window.
ADVISE_PIECE = 128 << 10


class BlockSource:
    """A read-only view of a block device or image file."""

    def __init__(self, path: str | os.PathLike[str], *, direct_io: bool = True) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._direct_fd: int | None = None
        self._retired_fds: list[int] = []
        self._local = threading.local()
        self._fallback_logged = False
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        try:
            st = os.fstat(self._fd)
            self.is_blockdev = stat.S_ISBLK(st.st_mode)
            if self.is_blockdev:
                buf = fcntl.ioctl(self._fd, BLKGETSIZE64, b"\0" * 8)
                (self.size,) = struct.unpack("<Q", buf)
                buf = fcntl.ioctl(self._fd, BLKSSZGET, b"\0" * 4)
                (self.align,) = struct.unpack("<i", buf)
                if self.align <= 0 or self.align & (self.align - 1):
                    self.align = DEFAULT_ALIGN
            else:
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
                self.align = DEFAULT_ALIGN
            if direct_io:
                self._open_direct()
        except BaseException:
            self.close()
            raise

    def _open_direct(self) -> None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            self._fall_back("O_DIRECT is not available on this platform")
            return
        try:
            self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | flag)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fall_back(f"the source refuses O_DIRECT ({e.strerror})")

    def _fall_back(self, why: str) -> None:
        # The O_DIRECT fd stays open until close(): a pool thread may have
        # read its number already, and a number closed now could be reused
        # by the next open() and read that file instead.
        if self._direct_fd is not None:
            self._retired_fds.append(self._direct_fd)
            self._direct_fd = None
        if not self._fallback_logged:
            self._fallback_logged = True
            log.info("%s: %s; file data will be read through the page cache", self.path, why)

    @property
    def direct(self) -> bool:
        """Whether data reads currently bypass the page cache."""
        return self._direct_fd is not None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in (self._direct_fd, *self._retired_fds, self._fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct_fd = None
        self._retired_fds = []
        self._fd = -1

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptError(
                f"{what}: bytes {offset}..{offset + length} lie beyond the end of the source"
            )

    def read_meta(self, offset: int, length: int, what: str = "metadata") -> bytes:
        """Buffered read of exactly `length` bytes."""
        self._check_range(offset, length, what)
        return self._pread_full(self._fd, offset, length, what)

    def advise(self, offset: int, length: int) -> None:
        """Let the page cache read a metadata range ahead (a hint: errors are ignored).

        The kernel reads at most the device's readahead window per
        POSIX_FADV_WILLNEED, so a longer range is asked for in pieces.
        """
        end = min(offset + length, self.size)
        try:
            while 0 <= offset < end:
                piece = min(ADVISE_PIECE, end - offset)
                os.posix_fadvise(self._fd, offset, piece, os.POSIX_FADV_WILLNEED)
                offset += piece
        except OSError:
            pass

    @staticmethod
    def _pread_full(fd: int, offset: int, length: int, what: str) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                raise CorruptError(f"{what}: short read at byte {offset + got}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_data(self, offset: int, length: int, what: str = "data") -> bytes:
        """Read exactly `length` bytes of file data, with O_DIRECT where possible."""
        self._check_range(offset, length, what)
        if length == 0:
            return b""
        if self._direct_fd is None:
            return self._pread_full(self._fd, offset, length, what)
        if length <= DIRECT_CHUNK:
            # One request: a single copy out of the aligned buffer.  The
            # general path's zero-filled bytearray and final bytes() copy
            # cost more than the device read (bench_view).
            chunk = self._read_direct(offset, length, what)
            if chunk is not None:
                return bytes(chunk)
            return self._pread_full(self._fd, offset, length, what)
        out = bytearray(length)
        done = 0
        while done < length:
            n = min(length - done, DIRECT_CHUNK)
            chunk = self._read_direct(offset + done, n, what)
            if chunk is None:
                out[done:] = self._pread_full(self._fd, offset + done, length - done, what)
                break
            out[done : done + n] = chunk
            done += n
        return bytes(out)

    def read_data_many(
        self, ranges: Sequence[tuple[int, int]], what: str = "data"
    ) -> list[bytes | None]:
        """`read_data` of each (offset, length), QUEUE_DEPTH requests at a time.

        Each worker walks its own slice of `ranges` in order, so the
        requests reach the device sorted as the caller sorted them.  A range
        that cannot be read answers None; the others are unaffected.
        """

        def read_slice(lo: int, hi: int) -> list[bytes | None]:
            out: list[bytes | None] = []
            for offset, length in ranges[lo:hi]:
                try:
                    out.append(self.read_data(offset, length, what))
                except (Ext4Error, OSError) as e:
                    log.debug("%s: bytes %d..%d: %s", what, offset, offset + length, e)
                    out.append(None)
            return out

        if len(ranges) < 2:
            return read_slice(0, len(ranges))
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(QUEUE_DEPTH, thread_name_prefix="ext4-read")
            pool = self._pool
        step = -(-len(ranges) // QUEUE_DEPTH)
        futures = [pool.submit(read_slice, lo, lo + step) for lo in range(0, len(ranges), step)]
        return [data for f in futures for data in f.result()]

    def _buffer(self, size: int) -> mmap.mmap:
        """A page-aligned scratch buffer per thread (anonymous mmap is page aligned)."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            # The old buffer is left to the garbage collector: a caller may
            # still hold a view of it.
            buf = mmap.mmap(-1, max(size, 1 << 20))
            self._local.buf = buf
        return buf

    def _read_direct(self, offset: int, length: int, what: str) -> memoryview | None:
        """One aligned O_DIRECT read; None after falling back to buffered reads."""
        align = self.align
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        view = memoryview(self._buffer(end - start))[: end - start]
        if not self._direct_into(view, start, offset - start + length, what):
            return None
        return view[offset - start : offset - start + length]

    def _direct_into(self, view: memoryview, start: int, need: int, what: str) -> bool:
        """Fill the aligned `view` from aligned `start` with O_DIRECT.

        At least `need` bytes must arrive (the end of the source may cut
        the last aligned block short); False after falling back.
        """
        align = self.align
        got = 0
        try:
            while got < len(view):
                fd = self._direct_fd
                if fd is None:
                    return False
                n = os.preadv(fd, [view[got:]], start + got)
                if n <= 0:
                    break
                got += n
                if got % align:
                    break
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fall_back(f"O_DIRECT read failed ({e.strerror})")
            return False
        if got < need:
            raise CorruptError(f"{what}: short read at byte {start + got}")
        return True

    def read_scattered(
        self, length: int, pieces: Sequence[tuple[int, int, int]], what: str = "data"
    ) -> bytes:
        """`length` bytes made of (position, source offset, bytes) pieces, zeros elsewhere.

        One piece covering everything, the usual case for a backup's large
        reads, is one `read_data`: no zero-filled buffer and no second copy,
        which cost more than the device read itself (bench_view).  But a
        file's extents seldom line up with a reader's request, so one
        request often spans several of them.  Where the pieces are aligned
        they are read straight into place in one O_DIRECT buffer and copied
        out once, instead of once per piece and again for the whole.
        """
        if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][2] == length:
            return self.read_data(pieces[0][1], length, what)
        for _pos, offset, n in pieces:
            self._check_range(offset, n, what)
        align = self.align
        order = sorted(pieces)
        total = -(-length // align) * align
        aligned = all(
            pos % align == 0 and offset % align == 0 and (n % align == 0 or pos + n == length)
            for pos, offset, n in order
        ) and all(a[0] + a[2] <= b[0] for a, b in zip(order, order[1:], strict=False))
        if self._direct_fd is not None and aligned and total <= DIRECT_CHUNK:
            view = memoryview(self._buffer(total))[:total]
            done = 0
            for pos, offset, n in order:
                if pos > done:
                    view[done:pos] = bytes(pos - done)
                span = -(-n // align) * align
                if not self._direct_into(view[pos : pos + span], offset, n, what):
                    break
                done = pos + n
            else:
                if done < length:
                    view[done:length] = bytes(length - done)
                return bytes(view[:length])
        out = bytearray(length)
        for pos, offset, n in pieces:
            out[pos : pos + n] = self.read_data(offset, n, what)
        return bytes(out)
