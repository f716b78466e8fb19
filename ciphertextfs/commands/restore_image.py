"""`ciphertextfs restore-image`: rebuild an ext4 filesystem from a backup, without keys."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile
import time
from typing import BinaryIO

from ciphertextfs import EXIT_OK, EXIT_PARTIAL, PROG
from ciphertextfs.commands import CommandError, exit_status_help

DESCRIPTION = """\
Write a backup of the ciphertext view, still encrypted, into a new ext4
filesystem on TARGET: no key is needed, and every owner unlocks their files
on it with the same key, passphrase or login as before the disaster.

SOURCE is any backup `decrypt` reads: a copy of the view (tar --xattrs -x,
rsync -aHAX) or a tar archive of it.  TARGET is a new image file, created
sparse and sized from the backup with headroom (or --size); with --force an
existing image or an unmounted block device, which is overwritten.

The filesystem is made by mke2fs with ext4's defaults, the encrypt feature,
the original block size, and stable_inodes and the original UUID when a
policy binds its ciphertext to them (IV_INO_LBLK_64/32).  Encrypted names,
contexts, contents (all-zero data units become holes), real sizes and
symlinks are written as they were on disk; inode numbers are kept where a
policy needs them.  Modes, owners, times, xattrs and POSIX ACLs come back.

Locked directories list the same no-key names as on the old disk: the
directory hash seed and algorithm they depend on travel with the backup
(user.fscrypt.dirhash) and are given to the new filesystem.  A backup made
before they did gets a new seed: the hash at the start of each no-key name
then differs unless -E hash_seed=UUID (dumpe2fs -h of the old disk) is
given, which always takes precedence.

The backup is read twice (to size the filesystem, then for the contents).
An archive on standard input ("-") is first copied to $TMPDIR, else
/var/tmp, into a file without a name that disappears when restore-image
ends; the copy needs room for the whole archive.

Every entry that cannot be written is reported on stderr ("not restored:
PATH: REASON") and left out; the filesystem stays consistent (e2fsck -fn)."""

EPILOG = (
    exit_status_help(
        "every entry written",
        "some entries not written; each is reported on stderr, and the filesystem is "
        "still consistent",
        "a fatal error: unreadable SOURCE, unusable TARGET",
    )
    + """

example (the admin, after replacing the disk):
  ciphertextfs restore-image /backup/home.tar /dev/sdb1 --force
  mount /dev/sdb1 /home        # each owner: fscrypt unlock /home/$USER"""
)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return n


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "restore-image",
        help="rebuild an ext4 filesystem from a backup, still encrypted, without keys",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=_size, metavar="SIZE", help="size of the filesystem (e.g. 20G)")
    p.add_argument(
        "-f", "--force", action="store_true", help="overwrite an existing image or device"
    )
    p.add_argument(
        "-O",
        dest="features",
        action="append",
        default=[],
        metavar="FEATURES",
        help="extra mke2fs -O features (repeatable)",
    )
    p.add_argument(
        "-E",
        dest="extended",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="extra mke2fs -E options (repeatable); hash_seed=UUID overrides the backup's",
    )
    p.add_argument("-L", "--label", metavar="LABEL", help="volume label")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    p.add_argument(
        "source", metavar="SOURCE", help='backup directory or tar archive ("-": standard input)'
    )
    p.add_argument("target", metavar="TARGET", help="image file or block device")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ciphertextfs.mkimage.libext2fs import Ext2Error
    from ciphertextfs.mkimage.plan import Planner
    from ciphertextfs.mkimage.writer import ImageWriter, MkfsOptions, TargetError, make_filesystem
    from ciphertextfs.restore.backup import BackupError, open_backup
    from ciphertextfs.restore.report import Report

    report = Report(stream=sys.stderr, quiet=args.quiet, progress=sys.stderr.isatty())
    start = time.monotonic()
    opts = MkfsOptions(
        size=args.size,
        force=args.force,
        features=[f for arg in args.features for f in arg.split(",") if f],
        extended=[o for arg in args.extended for o in arg.split(",") if o],
        label=args.label,
    )
    spool = None
    source = args.source
    if source == "-":
        spool, source = _spool_stdin(args.quiet)
    try:
        try:
            backup = open_backup(source)
        except BackupError as e:
            raise CommandError(str(e)) from None
        existed = os.path.lexists(args.target)
        with backup:
            plan = Planner(backup, report).run()
            try:
                make_filesystem(plan, args.target, opts)
                ImageWriter(plan, args.target, report, lambda: open_backup(source)).run()
            except (TargetError, Ext2Error, OSError, BackupError) as e:
                if not existed and os.path.isfile(args.target):
                    os.unlink(args.target)
                msg = str(e) if isinstance(e, TargetError) else f"{args.target}: {e}"
                raise CommandError(msg) from None
    finally:
        if spool is not None:
            spool.close()
    report._clear()
    if not args.quiet:
        from ciphertextfs.restore.report import _human

        print(
            f"{PROG} restore-image: {report.restored} inodes written "
            f"({_human(report.bytes_done)}, {time.monotonic() - start:.1f} s), "
            f"{report.failed} entries not restored",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_PARTIAL if report.failed or plan.warnings else EXIT_OK


def _spool_stdin(quiet: bool) -> tuple[BinaryIO | None, str]:
    """A path that reads standard input from its start, as often as needed.

    A regular file redirected to standard input is read in place.  A pipe is
    copied into an unnamed file (O_TMPFILE, or unlinked at once), so that no
    copy is left behind however restore-image ends; /proc/self/fd reopens it
    from the start for each read.
    """
    if stat.S_ISREG(os.fstat(0).st_mode):
        return None, "/proc/self/fd/0"
    if os.isatty(0):
        raise CommandError("SOURCE is - but standard input is a terminal")
    where = os.environ.get("TMPDIR") or "/var/tmp"
    if not quiet:
        print(
            f"{PROG} restore-image: copying standard input to {where} (the backup is read "
            "twice; set TMPDIR to choose where)",
            file=sys.stderr,
            flush=True,
        )
    spool = None
    try:
        spool = tempfile.TemporaryFile(dir=where, prefix="ciphertextfs-restore-image-")
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        spool.flush()
    except OSError as e:
        if spool is not None:
            spool.close()
        raise CommandError(
            f"cannot copy standard input to {where}: {e.strerror or e}; set TMPDIR to a "
            "directory with room for the whole archive, or give the archive as a file"
        ) from None
    return spool, f"/proc/self/fd/{spool.fileno()}"
