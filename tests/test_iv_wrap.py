"""IV_INO_LBLK_32 across the 2^32 wrap of hashed inode number plus block.

The kernel adds the block number to the inode's SipHash modulo 2^32; a file
whose blocks straddle the point where that sum wraps is written through the
kernel and decrypted by our reader, so a wrong mask on either side of the
wrap (in the per-unit IV or in the many-unit fast path) shows.
"""

from __future__ import annotations

import os
from pathlib import Path

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.fscrypt import crypto
from tests import trees

U32 = (1 << 32) - 1
EXT4_MAX_LBLK = U32 - 1  # s_maxbytes of 4 KiB extent files ends one block short
BS = 4096


def test_ino_lblk_32_contents_across_the_wrap(ext4, tmp_path: Path) -> None:
    master = trees.MASTER_KEYS[2]
    plain = os.urandom(2 * BS)
    with ext4(features=("encrypt", "stable_inodes"), size_mb=16) as (image, _dev, mnt):
        with trees.keys_added(mnt) as keys:
            d = mnt / "d"
            d.mkdir()
            trees.POLICY["v2-ino32"].apply(d, keys)
            for n in range(8):
                f = d / f"f{n}"
                f.touch()
                ino = os.stat(f).st_ino
                wrap = (-master.hashed_ino(ino)) & U32  # first block whose IV index is 0
                if 1 <= wrap <= EXT4_MAX_LBLK:
                    break
            else:
                raise AssertionError("no inode with a reachable wrap in 8 tries")
            fd = os.open(f, os.O_WRONLY)
            try:
                os.pwrite(fd, plain, (wrap - 1) * BS)
            finally:
                os.close(fd)
            trees.lock(mnt, keys)
    fs = Filesystem.open(image)
    try:
        inode = fs.inode(ino)
        ct = fs.read(inode, (wrap - 1) * BS, 2 * BS)
        _ctx, key = trees.file_key(fs, inode, for_filenames=False)
    finally:
        fs.close()
    assert key.hashed_ino is not None and (key.hashed_ino + wrap) & U32 == 0
    assert ct[:64] != plain[:64] and ct[BS : BS + 64] != plain[BS : BS + 64]
    # The many-unit path, and each unit on its own through generate_iv().
    assert crypto.decrypt_contents(key, ct, wrap - 1) == plain
    assert crypto.decrypt_data_unit(key, wrap - 1, ct[:BS]) == plain[:BS]
    assert crypto.decrypt_data_unit(key, wrap, ct[BS:]) == plain[BS:]
