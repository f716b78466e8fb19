"""Shared fixtures: kernel-made ext4 images, cleaned up however a test ends."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness

# Tests match the messages of ls, tar, rsync and the C library: in English.
os.environ["LC_ALL"] = "C"
os.environ.pop("LANGUAGE", None)


@pytest.fixture(scope="session", autouse=True)
def _no_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Unmount and detach whatever the session left below its temp dir.

    Individual fixtures clean up after themselves; this is the backstop for
    a test killed half-way, so that a failure never leaks into the next run.
    """
    base = tmp_path_factory.getbasetemp()
    yield
    for mnt in harness.leaked_mounts(base):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    for dev in harness.leaked_loops(base):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def kernel() -> None:
    """Fail (never skip) when the kernel capabilities the product needs are missing."""
    harness.require_kernel()


@pytest.fixture
def ext4(kernel: None, tmp_path: Path):
    """Factory: `with ext4(features=..., size_mb=...) as (image, dev, mnt): ...`."""

    @contextlib.contextmanager
    def make(*, name: str = "fs", options: str = "", **mkfs_args):
        image = harness.mkfs(tmp_path / f"{name}.img", **mkfs_args)
        with harness.mounted(image, tmp_path / f"{name}.mnt", options=options) as (dev, mnt):
            yield image, dev, mnt

    return make
