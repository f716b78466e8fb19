"""The view's names in encrypted directories equal the kernel's no-key names.

Oracle: `os.listdir` of the same directory on the live mount after its key
was removed.  Checked with and without dir_index, in one-block and
multi-block directories, with names short and long (lossy no-key names),
under v1 and v2 policies.  No FUSE here: the view model is called directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.fscrypt.nokey import base64url_decode, parse_nokey_name
from ciphertextfs.view.model import View
from ciphertextfs.view.names import SIDE_FILE_NAME
from tests import harness
from tests.trees import POLICY, ascii_name, keys_added, lock

VARIANTS = {
    "dir_index": ("encrypt",),
    "no-dir_index": ("encrypt", "^dir_index"),
    "1k-blocks": ("encrypt",),
    "stable_inodes": ("encrypt", "stable_inodes"),
}


def _populate(d: Path) -> None:
    (d / "one-block").mkdir()
    for n in (1, 16, 17, 40, 149, 150, 200, 255):
        (d / "one-block" / ascii_name(n)).write_bytes(b"")
    (d / "multi-block").mkdir()
    for i in range(150):
        (d / "multi-block" / f"{i:04d}-{ascii_name(60 + i % 190)}"[:255]).write_bytes(b"")
    (d / "empty").mkdir()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def locked_image(request, tmp_path_factory):
    """An image with encrypted trees; yields (image, {rel dir: (ino, kernel names)})."""
    harness.require_kernel()
    variant = request.param
    tmp = tmp_path_factory.mktemp(variant)
    block_size = 1024 if variant == "1k-blocks" else 4096
    image = harness.mkfs(tmp / "fs.img", block_size=block_size, features=VARIANTS[variant])
    policies = ["v1", "v2"] + (["v2-ino64", "v2-ino32"] if variant == "stable_inodes" else [])
    seen: dict[str, tuple[int, set[str]]] = {}
    subs = ("one-block", "multi-block", "empty")
    with harness.mounted(image, tmp / "mnt") as (_, mnt):
        inos: dict[str, int] = {}
        with keys_added(mnt) as keys:
            for name in policies:
                top = mnt / name
                top.mkdir()
                POLICY[name].apply(top, keys)
                _populate(top)
                for sub in subs:
                    inos[f"{name}/{sub}"] = os.stat(top / sub).st_ino
            lock(mnt, keys)
        for name in policies:
            top = mnt / name
            seen[name] = (os.stat(top).st_ino, set(os.listdir(top)))
            by_ino = {os.lstat(top / c).st_ino: top / c for c in os.listdir(top)}
            for sub in subs:
                ino = inos[f"{name}/{sub}"]
                seen[f"{name}/{sub}"] = (ino, set(os.listdir(by_ino[ino])))
    yield image, seen


def test_listing_equals_kernel_nokey_names(locked_image):
    image, seen = locked_image
    with Filesystem.open(str(image)) as fs:
        view = View(fs)
        for rel, (ino, kernel_names) in seen.items():
            names = {e.name.decode() for e in view.entries(ino)}
            names.discard(SIDE_FILE_NAME.decode())
            assert names == kernel_names, rel
            for name in kernel_names:
                assert view.lookup(ino, name.encode()) > 0


def test_long_names_are_in_the_side_file(locked_image):
    image, seen = locked_image
    with Filesystem.open(str(image)) as fs:
        view = View(fs)
        for rel, (ino, kernel_names) in seen.items():
            long = {n for n in kernel_names if parse_nokey_name(n).sha256 is not None}
            entries = {e.name: e.ino for e in view.entries(ino)}
            if not long:
                assert SIDE_FILE_NAME not in entries, rel
                continue
            side_ino = entries[SIDE_FILE_NAME]
            assert view.entries(ino)[0].name == SIDE_FILE_NAME, rel  # first, for tar
            text = view.read(side_ino, 0, 1 << 20).decode()
            head, *body = text.splitlines()
            assert head == "fscrypt-side 2"
            lines = dict(line.split(" ")[1:] for line in body if line.startswith("n "))
            assert set(lines) == long, rel
            for name, full in lines.items():
                parsed = parse_nokey_name(name)
                ciphertext = base64url_decode(full)
                assert ciphertext.startswith(parsed.prefix)
                assert len(ciphertext) > 149
