"""`ciphertextfs decrypt`: restore the original tree from a backup of the view.

Exit status: 0 everything restored, 1 some entries not restored (each
reported on stderr), 2 usage or fatal error (nothing restored).
"""

from __future__ import annotations

import argparse
import sys

from ciphertextfs.commands import CommandError

DESCRIPTION = """\
Decrypt a backup of the ciphertext view into DEST with the owner's keys.

SOURCE is a directory holding a copy of the view (tar --xattrs -x,
rsync -aHAX), a tar archive made from the view, read directly, or "-" for
a tar stream on standard input, read in one pass (zstd -dc home.tar.zst |
ciphertextfs decrypt --key alice.key - /restore).  Archives may be
uncompressed or compressed with gzip, bzip2, xz or zstd (found by content,
not by name).  A damaged archive is read past the damage: each region lost
is reported ("damaged archive: ...") and the rest is restored.

DEST must not exist or be an empty directory; it may lie in an unlocked
fscrypt-encrypted directory (the kernel re-encrypts).

With the fscrypt tool's secrets (see below and 'ciphertextfs keys'), the
master keys are unlocked from the fscrypt metadata in the backup.  Raw key
files (--key) hold a 64-byte master key.  v2 policies find their key by
its identifier; v1 policies by the descriptor given with --v1-key, or else
by the descriptor e4crypt/fscrypt derive from the key.

Every entry that cannot be restored is reported on stderr ("not restored:
PATH: REASON"); a missing key is reported once with the number of entries
that need it.  The rest of the tree is restored.

A backup that lost its user.fscrypt.* xattrs (rsync -a without -X, tar
without --xattrs at create or extract, cpio) can never be restored: it is
detected, said so, and every entry it affects counts as not restored, also
with --verify.  Entries without a context inside an encrypted directory and
missing or damaged side files are reported one by one."""

EPILOG = """\
exit status:
  0  every entry restored (or, with --verify, restorable)
  1  some entries not restored; each is reported on stderr
  2  usage error or fatal error (unreadable SOURCE or key file, unusable DEST)"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "decrypt",
        help="decrypt a backup of the view with the owner's keys",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="FILE",
        help="raw 64-byte master key (repeatable)",
    )
    p.add_argument(
        "--v1-key",
        action="append",
        default=[],
        metavar="DESCRIPTOR=FILE",
        help="v1 master key for the 16-hex-digit key descriptor (repeatable)",
    )
    from ciphertextfs.commands.keys import add_secret_options

    add_secret_options(p)
    p.add_argument(
        "--verify",
        action="store_true",
        help="decrypt everything without writing; report what could not be restored",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=4096,
        metavar="N",
        help="block size of the original filesystem, the data unit size of policies "
        "without a custom one (default 4096)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    p.add_argument(
        "source", metavar="SOURCE", help="backup directory, tar archive, or - for standard input"
    )
    p.add_argument("dest", metavar="DEST", nargs="?", help="where to restore (not with --verify)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ciphertextfs.commands.keys import has_secrets, keyring_from_args
    from ciphertextfs.restore.backup import BackupError, open_backup
    from ciphertextfs.restore.fscrypt_metadata import WithoutMetadataEntry
    from ciphertextfs.restore.report import EXIT_FATAL, Report
    from ciphertextfs.restore.restorer import Restorer
    from ciphertextfs.restore.writer import DestError, DestWriter

    if args.verify and args.dest is not None:
        raise CommandError("--verify takes SOURCE only, no DEST", EXIT_FATAL)
    if not args.verify and args.dest is None:
        raise CommandError("DEST is required (or use --verify)", EXIT_FATAL)
    if not args.key and not args.v1_key and not has_secrets(args):
        raise CommandError(
            "give a secret: --passphrase-file, --ask-passphrase, --protector-key, --key or "
            "--v1-key (run 'ciphertextfs keys SOURCE' to see what opens this backup)",
            EXIT_FATAL,
        )
    bs = args.block_size
    if bs < 1024 or bs > 65536 or bs & (bs - 1):
        raise CommandError(f"--block-size {bs}: not a power of two from 1024 to 65536", EXIT_FATAL)
    report = Report(stream=sys.stderr, quiet=args.quiet, progress=sys.stderr.isatty())
    keys = keyring_from_args(args, report.note, verbose=not args.quiet)
    if args.source == "-" and sys.stdin.isatty():
        raise CommandError("refusing to read an archive from a terminal (SOURCE is -)", EXIT_FATAL)
    try:
        meta = getattr(keys.resolver, "meta", None)
        backup = WithoutMetadataEntry(
            open_backup(args.source, stdin=sys.stdin.buffer), report.note, meta
        )
    except BackupError as e:
        raise CommandError(str(e), EXIT_FATAL) from None
    writer = DestWriter(args.dest or ".", dry=args.verify)
    with backup:
        try:
            return Restorer(backup, writer, keys, report, block_size=bs).run(verify=args.verify)
        except (DestError, BackupError) as e:
            raise CommandError(str(e), EXIT_FATAL) from None
