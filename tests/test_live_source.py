"""A view over a mounted ext4 follows the live filesystem.

Metadata comes through the block device's page cache, which ext4 itself
updates; file contents are read with O_DIRECT from the device, so the view
writes the filesystem back (syncfs) whenever its short caches expire.  A
file created or changed after the view was mounted must therefore appear,
with its contents, within about a second, with no `sync` by anyone.
"""

from __future__ import annotations

import os
import time

import pytest

from ciphertextfs.fscrypt.policy import parse_context
from tests import harness
from tests.harness_view import view_mount
from tests.trees import POLICY, keys_added


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.parametrize("given", ["directory", "device", "image"])
def test_changes_after_mount_appear(ext4, tmp_path, given):
    """SOURCE is the mounted filesystem's directory, its device, or the image behind it."""
    harness.require_fuse()
    with ext4(size_mb=32) as (image, dev, mnt):
        source = {"directory": mnt, "device": dev, "image": image}[given]
        (mnt / "plain").mkdir()
        (mnt / "plain/old").write_bytes(b"before the view was mounted")
        with keys_added(mnt) as keys:
            (mnt / "vault").mkdir()
            POLICY["v2"].apply(mnt / "vault", keys)
            with view_mount(source, tmp_path / "view") as vm:
                view = vm.mountpoint
                assert (view / "plain/old").read_bytes() == b"before the view was mounted"

                data = os.urandom(5000)
                (mnt / "plain/new").write_bytes(data)
                (mnt / "plain/old").write_bytes(b"changed after")
                (mnt / "vault/secret").write_bytes(b"encrypted, written after mount")
                assert _wait_for(lambda: (view / "plain/new").exists())
                assert _wait_for(lambda: (view / "plain/new").read_bytes() == data)
                assert _wait_for(lambda: (view / "plain/old").read_bytes() == b"changed after")

                def encrypted_file_visible() -> bool:
                    names = os.listdir(view / "vault")
                    return (
                        len(names) == 1
                        and os.getxattr(view / "vault" / names[0], "user.fscrypt.size")
                        == str(len(b"encrypted, written after mount")).encode()
                    )

                assert _wait_for(encrypted_file_visible)
                (name,) = os.listdir(view / "vault")
                ctx = parse_context(os.getxattr(view / "vault" / name, "user.fscrypt.context"))
                assert ctx.version == 2
                # The ciphertext reached the device: not the zeros of an
                # unwritten delayed allocation.
                assert (view / "vault" / name).read_bytes().strip(b"\0")
