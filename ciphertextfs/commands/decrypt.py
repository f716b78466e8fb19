"""`ciphertextfs decrypt`: restore the original tree from a backup of the view."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ciphertextfs.commands import CommandError, exit_status_help
from ciphertextfs.restore import DEFAULT_BLOCK_SIZE

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
missing or damaged side files are reported one by one.

Safety: nothing is written outside DEST, whoever can rename things in or
above DEST or in SOURCE while the restore runs: DEST and every directory
below it are used through directory fds opened without following
symlinks, and files of a SOURCE directory are opened without following
symlinks and checked to be the regular files that were listed.  DEST may
not lie inside SOURCE.

Privilege-granting attributes (owners, set-user-ID, set-group-ID and sticky
bits, device nodes, security.* and trusted.* xattrs) are restored by
default only when running as root into a DEST owned by root (or created
in a directory owned by root); otherwise they are left out, and the
summary counts what was left out.  The options below choose explicitly."""

EPILOG = exit_status_help(
    "every entry restored (or, with --verify, restorable)",
    "some entries not restored; each is reported on stderr",
    "a fatal error: unreadable SOURCE or key file, unusable DEST, DEST inside SOURCE",
    signals="stopped by SIGINT or SIGTERM: what was restored keeps its metadata, the "
    "summary counts it, and the rest of the backup is not restored (a second signal "
    "stops at once, leaving directories mode 0700)",
)


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
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help="block size of the original filesystem where the backup does not record it, "
        "the data unit size of policies without a custom one (default %(default)s)",
    )
    priv = p.add_argument_group("privilege (default: on as root into a root-owned DEST, else off)")

    def pair(name: str, dest: str, what: str) -> None:
        priv.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=what)
        priv.add_argument(f"--no-{name}", dest=dest, action="store_false", help="do not")

    pair("same-owner", "owner", "restore owners and groups (as root only)")
    pair("setid", "setid", "restore set-user-ID, set-group-ID and sticky bits")
    pair("devices", "devices", "restore character and block device nodes (as root only)")
    pair(
        "privileged-xattrs",
        "privileged_xattrs",
        "restore security.* (file capabilities, LSM labels) and trusted.* xattrs",
    )
    priv.add_argument(
        "--xattrs-include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="restore only xattrs whose name matches a PATTERN (shell glob, repeatable); "
        "a privileged xattr a PATTERN names is restored too",
    )
    priv.add_argument(
        "--xattrs-exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never restore xattrs whose name matches PATTERN (repeatable)",
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
    from ciphertextfs.restore.report import Report
    from ciphertextfs.restore.restorer import Restorer
    from ciphertextfs.restore.writer import DestError, DestWriter, Privileges

    if args.verify and args.dest is not None:
        raise CommandError("--verify takes SOURCE only, no DEST")
    if not args.verify and args.dest is None:
        raise CommandError("DEST is required (or use --verify)")
    if not args.key and not args.v1_key and not has_secrets(args):
        raise CommandError(
            "give a secret: --passphrase-file, --ask-passphrase, --protector-key, --key or "
            "--v1-key (run 'ciphertextfs keys SOURCE' to see what opens this backup)",
        )
    bs = args.block_size
    if bs < 1024 or bs > 65536 or bs & (bs - 1):
        raise CommandError(f"--block-size {bs}: not a power of two from 1024 to 65536")
    if args.dest is not None and dest_inside(args.source, args.dest):
        raise CommandError(f"DEST {args.dest} lies inside SOURCE {args.source}")
    report = Report(stream=sys.stderr, quiet=args.quiet, progress=sys.stderr.isatty())
    keys = keyring_from_args(args, report.note, verbose=not args.quiet)
    if args.source == "-" and sys.stdin.isatty():
        raise CommandError("refusing to read an archive from a terminal (SOURCE is -)")
    try:
        meta = getattr(keys.resolver, "meta", None)
        backup = WithoutMetadataEntry(
            open_backup(args.source, stdin=sys.stdin.buffer), report.note, meta
        )
    except BackupError as e:
        raise CommandError(str(e)) from None
    privileges = Privileges(
        owner=args.owner,
        setid=args.setid,
        devices=args.devices,
        privileged_xattrs=args.privileged_xattrs,
        xattrs_include=args.xattrs_include,
        xattrs_exclude=args.xattrs_exclude,
    )
    writer = DestWriter(args.dest or ".", dry=args.verify, privileges=privileges)

    restorer = Restorer(backup, writer, keys, report, block_size=bs)

    def stop(signum: int, _frame: object) -> None:
        # The restore stops at its next safe point; a second signal at once.
        signal.signal(signum, signal.SIG_DFL)
        restorer.signals.append(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with backup:
            try:
                return restorer.run(verify=args.verify)
            except (DestError, BackupError) as e:
                raise CommandError(str(e)) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def dest_inside(source: str, dest: str) -> bool:
    """Whether DEST (existing or not) is SOURCE or lies below it."""
    src = os.path.realpath(source)
    if not os.path.isdir(src):
        return False
    head, name = os.path.split(os.path.abspath(dest).rstrip("/") or "/")
    where = os.path.join(os.path.realpath(head), name)
    if os.path.lexists(where):
        where = os.path.realpath(where)
    return where == src or where.startswith(src.rstrip("/") + "/")
