"""`ciphertextfs mount`: serve the ciphertext view of an ext4 filesystem over FUSE.

Everything that can be checked is checked before forking, so that a failure
is one line on stderr with nothing mounted, and success means the mount
answers requests by the time the command returns.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import stat
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ciphertextfs import EXIT_FATAL, EXIT_OK, PROG
from ciphertextfs.commands import CommandError, exit_status_help, mountlog

if TYPE_CHECKING:
    from ciphertextfs.view.protocol import ViewProtocol

log = logging.getLogger("ciphertextfs")

#: Set to 1, the view of a live source does not watch its changes and
#: forgets everything every second instead (the fallback where fanotify
#: is not available).
NO_WATCH_ENV = "CIPHERTEXTFS_NO_WATCH"

#: -o options: name -> help.  ro and default_permissions are always on and
#: accepted only so that fstab-style option lists work unchanged.
MOUNT_OPTIONS = {
    "allow_other": "let other users use the view (file modes and ACLs still apply)",
    "debug": "trace every FUSE request to stderr; implies -f",
    "ro": "read-only (always on)",
    "default_permissions": "the kernel checks file modes and ACLs (always on)",
    "noexec": "do not allow programs in the view to be executed",
}

#: Options mount(8), mount.fuse3 and systemd put into an option list, or an
#: fstab line holds for them, that mean nothing to the view: accepted and
#: ignored.  The view is always nodev,nosuid (it shows device nodes and
#: set-user-ID files of someone else's filesystem): dev and suid, which
#: mount.fuse3 adds whenever nodev and nosuid are absent, do not turn that off.
IGNORED_OPTIONS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "async",
        "sync",
    }
)

#: Prefixes of options that belong to mount(8) or systemd (x-systemd.automount,
#: x-systemd.requires=..., x-mount.mkdir, comment=...).
IGNORED_PREFIXES = ("x-", "comment=")

DESCRIPTION = """\
Mount a read-only view of an ext4 filesystem at MOUNTPOINT in which files
encrypted with fscrypt read as their on-disk ciphertext, so that an
administrator can back them up without the owner's key.  Inside encrypted
directories names appear as the kernel's no-key names; the encryption
context and the real size are the user.fscrypt.* extended attributes.
Unencrypted files appear unchanged.  A backup that keeps names, contents,
modes, times, symlink targets and user.* xattrs (tar --xattrs, rsync -aHAX)
can later be decrypted with 'ciphertextfs decrypt'.

SOURCE is one of:
  - an ext4 block device (/dev/sdb1, a snapshot such as /dev/vg/snap);
  - an ext4 image file;
    (a device or image that is mounted right now is read live, like a
    directory source rooted at the filesystem's root)
  - a directory inside a mounted ext4 filesystem: the view shows that
    directory's tree, read from the filesystem's block device.  The
    filesystem is synced (syncfs) first; then its changes are watched
    (fanotify) and the view forgets exactly what changed, syncing again
    before it reads a changed file, so changes show within about a
    second.  Where fanotify is unavailable, the view forgets everything
    and syncs at most once a second instead.  Files changing during the
    backup may be seen in an intermediate state, so prefer a snapshot for
    consistency.

SOURCE is only ever opened read-only.  Reading a block device needs the
privileges to open it (usually root).  The view enforces the original file
modes and ACLs (default_permissions is always on).

Unless -f is given, the command returns once the view answers requests
and a background process serves it.  Unmount with 'fusermount3 -u
MOUNTPOINT' or 'umount MOUNTPOINT'; SIGTERM or SIGINT to the serving
process also unmounts.

In the background the view logs to syslog (the journal on systemd
machines) under the name ciphertextfs, or with --log to a file: one line
per damaged object (inode, directory entry, read error), at most {burst}
warnings per {interval:g} s and then a line counting those suppressed, and at
unmount a summary (entries listed, lookups, bytes read, errors) at info
level.  Without a syslog daemon (/dev/log) warnings and errors go to the
kernel log (dmesg).  With -f everything goes to stderr."""

EXIT_STATUS = exit_status_help(
    "mounted, and answering (with -f: served, then unmounted cleanly)",
    None,
    "SOURCE, MOUNTPOINT or FUSE unusable: nothing is mounted (mount -t and fstab "
    "mounts, through mount.fuse3, exit with the same status)",
)

EPILOG = """\
mount options (-o, comma-separated):
{options}
{ignored}

fstab and mount -t:
  mount(8) runs 'mount.fuse3', which runs '{prog} SOURCE MOUNTPOINT -o OPTIONS';
  that form is the same as '{prog} mount -o OPTIONS SOURCE MOUNTPOINT':
    mount -t fuse.ciphertextfs /dev/vg/home-snap /mnt/view -o ro,allow_other
    # /etc/fstab:
    /dev/vg/home-snap  /mnt/view  fuse.ciphertextfs  ro,allow_other,noauto,nofail  0 0

{exit_status}

examples:
  Back up an LVM snapshot of /home:
    ciphertextfs mount /dev/vg/home-snap /mnt/view
    tar --xattrs --xattrs-include='*' -C /mnt/view -cf home.tar .
    fusermount3 -u /mnt/view

  Back up a directory of the running system with rsync:
    ciphertextfs mount /home/alice /mnt/view && rsync -aHAX /mnt/view/ backup:/alice/

  Look at an image in the foreground, with request tracing:
    ciphertextfs mount -f -o debug disk.img /mnt/view
"""


def ignored_options_text() -> str:
    names = ", ".join([*sorted(IGNORED_OPTIONS), "x-*", "comment=*"])
    text = (
        f"Also accepted and ignored, as in an fstab line: {names}.  The view is always "
        "read-only, nodev and nosuid; 'rw' is refused."
    )
    return textwrap.fill(text, width=78, initial_indent="  ", subsequent_indent="  ")


def register(subparsers: Any) -> None:
    options = "\n".join(f"  {name:<20} {text}" for name, text in MOUNT_OPTIONS.items())
    p = subparsers.add_parser(
        "mount",
        help="mount the ciphertext view of an ext4 filesystem",
        description=DESCRIPTION.format(burst=mountlog.BURST, interval=mountlog.INTERVAL),
        epilog=EPILOG.format(
            options=options,
            ignored=ignored_options_text(),
            prog=PROG,
            exit_status=EXIT_STATUS,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground, log to stderr; end with Ctrl-C or an unmount",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options, see below (may be repeated)",
    )
    p.add_argument(
        "--log",
        metavar="FILE",
        help="in the background, append warnings (damaged inodes, read errors) and the "
        "summary at unmount to FILE instead of syslog",
    )
    p.add_argument(
        "--fscrypt-linked",
        action="append",
        default=[],
        metavar="DIR",
        help="the .fscrypt directory of the filesystem that SOURCE's .link protectors name "
        "(usually /.fscrypt, where login protectors live): the protector files they name are "
        "added to the view's fscrypt metadata entry (repeatable)",
    )
    p.add_argument(
        "--no-fscrypt-metadata",
        action="store_true",
        help="do not add the fscrypt metadata entry (.ciphertextfs-fscrypt) to the view's root",
    )
    p.add_argument("source", metavar="SOURCE", help="ext4 block device, image file or directory")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory, not in use")
    p.set_defaults(run=run)


def parse_options(values: list[str]) -> set[str]:
    """The view's own options named in `values`; CommandError (a usage error) for a wrong one."""
    chosen = set()
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name or name in IGNORED_OPTIONS or name.startswith(IGNORED_PREFIXES):
                continue
            if name == "rw":
                raise CommandError("option 'rw': the view is always read-only (give 'ro')")
            if name not in MOUNT_OPTIONS:
                known = ", ".join(MOUNT_OPTIONS)
                raise CommandError(f"unknown mount option '{name}' (known: {known})")
            chosen.add(name)
    return chosen


def helper_argv(argv: Sequence[str], commands: Sequence[str]) -> list[str]:
    """The argument list with mount.fuse3's form turned into the mount command's.

    mount(8) hands fuse.* types to mount.fuse3, which runs `ciphertextfs
    SOURCE MOUNTPOINT -o OPTIONS`: a first argument that is neither a
    command nor an option is that form.
    """
    argv = list(argv)
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        return ["mount", *argv]
    return argv


def check_mountpoint(path: str) -> None:
    from ciphertextfs.mounts import is_mount_point

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CommandError(f"{path}: mount point does not exist") from None
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CommandError(f"{path}: mount point is not a directory")
    if is_mount_point(path):
        raise CommandError(f"{path}: mount point is busy (something is mounted there)")


def check_dev_fuse() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise CommandError(f"/dev/fuse: {e.strerror}: FUSE is unavailable") from None
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise CommandError("/dev/fuse: not a character device: FUSE is unavailable")
    finally:
        os.close(fd)


def open_source(path: str) -> tuple[Any, Any]:
    """(Filesystem, Source) for SOURCE, or CommandError with the reason."""
    from ciphertextfs.ext4.errors import CorruptError, Ext4Error, NotExt4Error
    from ciphertextfs.ext4.fs import Filesystem
    from ciphertextfs.source import SourceError, resolve_source

    try:
        source = resolve_source(path)
    except SourceError as e:
        raise CommandError(str(e)) from None
    try:
        # A mounted filesystem's newest metadata is in the device's page
        # cache, which buffered reads see; replaying its journal on top
        # would bring back older committed copies.
        fs = Filesystem.open(source.path, replay_journal=not source.live)
    except NotExt4Error as e:
        raise CommandError(f"{path}: not an ext4 filesystem ({e})") from None
    except CorruptError as e:
        raise CommandError(f"{path}: damaged ext4 filesystem ({e})") from None
    except Ext4Error as e:
        raise CommandError(f"{path}: {e}") from None
    except OSError as e:
        raise CommandError(f"{source.path}: {e.strerror or e}") from None
    return fs, source


def run(args: argparse.Namespace) -> int:
    options = parse_options(args.options)
    debug = "debug" in options
    foreground = args.foreground or debug
    mountlog.configure(log, foreground, debug, args.log)

    fs, source = open_source(args.source)
    check_mountpoint(args.mountpoint)
    check_dev_fuse()

    from ciphertextfs.fuse import CiphertextOperations, fuse_options
    from ciphertextfs.view.model import View

    sync = None
    if source.directory is not None:
        from ciphertextfs.source import sync_directory

        sync = functools.partial(sync_directory, source.directory)
    changes = watch_changes(source.directory) if source.live else None
    view = View(fs, source.root_ino, live=source.live, sync=sync, watched=changes is not None)
    try:
        root = view.attr(source.root_ino)
    except Exception as e:  # noqa: BLE001 - any failure here is the source's fault
        raise CommandError(f"{args.source}: cannot read the root directory ({e})") from None
    if not stat.S_ISDIR(root.st_mode):
        raise CommandError(f"{args.source}: inode {source.root_ino} is not a directory")
    for warning in getattr(fs, "warnings", [])[:5]:
        print(f"{PROG}: warning: {args.source}: {warning}", file=sys.stderr)
    view = with_fscrypt_metadata(view, fs, source.root_ino, args)

    ops = CiphertextOperations(view, statvfs_path=source.directory, changes=changes)
    opts = fuse_options(
        os.path.abspath(args.source), allow_other="allow_other" in options, debug=debug
    )
    if "noexec" in options:
        opts.add("noexec")
    mountpoint = os.path.abspath(args.mountpoint)
    if foreground:
        return serve_foreground(ops, mountpoint, opts)
    return serve_background(ops, mountpoint, opts, args.log)


def watch_changes(directory: str | None) -> Any:
    """A fanotify watcher of the live source's filesystem, or None (logged) for the fallback."""
    from ciphertextfs.live import ChangeWatcher

    if directory is None:
        why = "no mount point"
    elif os.environ.get(NO_WATCH_ENV) == "1":
        why = f"{NO_WATCH_ENV}=1"
    else:
        try:
            return ChangeWatcher.open(directory)
        except OSError as e:
            why = str(e)
    log.warning(
        "live source: changes cannot be watched (%s); caches expire every second instead", why
    )
    return None


def log_summary(ops: Any, mountpoint: str) -> None:
    s = ops.stats
    log.info(
        "%s unmounted: %d entries listed, %d lookups, %d bytes read, %d errors",
        mountpoint,
        s.entries,
        s.lookups,
        s.bytes,
        s.errors,
    )
    mountlog.finish(log)


def with_fscrypt_metadata(
    view: ViewProtocol, fs: Any, root_ino: int, args: argparse.Namespace
) -> ViewProtocol:
    """The view with its fscrypt metadata entry (docs/FORMAT.md), and what backups would lack."""
    from ciphertextfs.view.metadata_view import MetadataCollision, MetadataView, collect

    for path in args.fscrypt_linked:
        if not os.path.isdir(path):
            raise CommandError(f"--fscrypt-linked {path}: not a directory")
    got = collect(fs, root_ino, args.fscrypt_linked, disabled=args.no_fscrypt_metadata)
    for warning in got.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if got.entry is None:
        return view
    try:
        return MetadataView(view, got.entry)
    except MetadataCollision as e:
        raise CommandError(f"{args.source}: {e}") from None


def serve_foreground(ops: Any, mountpoint: str, opts: set[str]) -> int:
    from ciphertextfs.fuse import serve

    try:
        serve(ops, mountpoint, opts)
    except RuntimeError as e:
        raise CommandError(f"{mountpoint}: cannot mount: {e}") from None
    log_summary(ops, mountpoint)
    return EXIT_OK


def _redirect_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    if log_file:
        out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        os.close(fd)


def serve_background(ops: Any, mountpoint: str, opts: set[str], log_file: str | None) -> int:
    """Fork; the parent returns once the child's mount answers requests.

    The child reports "ok" or its error through a pipe; end of file without
    either means it died before mounting.
    """
    from ciphertextfs.fuse import serve

    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        os.setsid()
        ready = False

        def on_ready() -> None:
            nonlocal ready
            os.write(wfd, b"ok\n")
            os.close(wfd)
            ready = True
            _redirect_stdio(log_file)

        code = EXIT_OK
        try:
            serve(ops, mountpoint, opts, on_ready)
            log_summary(ops, mountpoint)
        except BaseException as e:  # noqa: BLE001 - report whatever ends the child
            code = EXIT_FATAL
            if ready:
                log.error("serving %s failed: %s", mountpoint, e)
            else:
                msg = f"{mountpoint}: cannot mount: {e}".replace("\n", " ")
                os.write(wfd, msg.encode("utf-8", "replace") + b"\n")
        finally:
            logging.shutdown()
        os._exit(code)

    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 4096):
        chunks.append(chunk)
    os.close(rfd)
    reply = b"".join(chunks).decode("utf-8", "replace").strip()
    if reply == "ok":
        return EXIT_OK
    os.waitpid(pid, 0)
    raise CommandError(reply or f"{mountpoint}: the serving process died before mounting")
