"""The harness itself: a mount made by a test is gone after it, failure or not."""

import os

import pytest

from tests import harness


def test_mount_cleanup_on_failure(ext4, tmp_path):
    with pytest.raises(RuntimeError):
        with ext4(size_mb=8) as (image, dev, mnt):
            assert os.path.ismount(mnt)
            (mnt / "f").write_text("x")
            raise RuntimeError("boom")
    assert not os.path.ismount(tmp_path / "fs.mnt")
    assert harness.leaked_loops(tmp_path) == []
