"""`ciphertextfs demo`: the whole backup and restore story on a scratch image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ciphertextfs.commands import exit_status_help

DESCRIPTION = """\
Show what ciphertextfs does, with the real kernel and the real tools, in a
scratch directory: make an ext4 image with an fscrypt-encrypted directory,
lock it by removing the key, mount the ciphertext view, back it up with
plain 'tar --xattrs', show the view's xattrs with getfattr, then restore
the archive with the key and check that it equals the original.

Needs root, loop devices, ext4 encryption support and /dev/fuse.  Nothing
outside the scratch directory is touched; every mount and loop device is
released at the end."""

EPILOG = exit_status_help(
    "the demo ran: the restored tree equals the original",
    None,
    "a requirement missing (root, ext4 encryption, /dev/fuse) or a step failed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="back up a locked encrypted directory with tar, then restore it",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        type=Path,
        help="work in a new directory below DIR and keep it (image, archive, restored tree)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ciphertextfs.demo import main

    return main(args.keep)
