"""BlockSource: the one place that opens the source."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ciphertextfs.ext4.blockdev import BlockSource


def test_fallback_keeps_the_direct_fd_number_until_close(tmp_path: Path) -> None:
    """A reader that picked up the O_DIRECT fd just before the fallback still reads the source.

    Closing that fd at the fallback would let the next open() take its
    number, and the reader's preadv would then read the other file.
    """
    image = tmp_path / "src"
    image.write_bytes(b"S" * 8192)
    other = tmp_path / "other"
    other.write_bytes(b"O" * 8192)
    src = BlockSource(image)
    try:
        assert src.direct, "this test needs a source that takes O_DIRECT"
        picked_up = src._direct_fd  # what a pool thread holds mid-read
        src._fall_back("test")
        assert not src.direct
        fd = os.open(other, os.O_RDONLY)
        try:
            assert fd != picked_up
            buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
            assert os.preadv(picked_up, [buf], 0) == 4096 and buf[:4] == b"SSSS"
        finally:
            os.close(fd)
        assert src.read_data(0, 4096) == b"S" * 4096  # buffered now
    finally:
        src.close()
    src.close()  # twice is harmless
