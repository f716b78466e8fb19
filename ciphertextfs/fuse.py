"""The thin pyfuse3 + trio adapter: FUSE requests answered from a `View`.

Everything the view shows is decided in `ciphertextfs.view`; this module only
translates between FUSE node ids and ext4 inode numbers, turns the view's
errors into errno values and refuses every modification with EROFS.

Node ids: FUSE insists that the root is node 1 (`pyfuse3.ROOT_INODE`), while
the view's root is some ext4 inode (2, or any directory for a directory
source).  ext4 inode 1 is the bad-blocks inode and is never linked from a
directory, so the two are simply swapped: node 1 <-> `view.root_ino`, every
other node id is the ext4 inode number itself (side files use their
synthetic numbers above 2**32).  pyfuse3 reports the node id as `st_ino`, so
every file keeps its original inode number and hard links stay visible to
`tar` and `rsync -H`; only the view's root directory reports inode 1.

View files use the page cache (FOPEN_DIRECT_IO would turn every
application read into a round trip and a device read), and the daemon
bounds what a backup leaves there (`ciphertextfs.pagecache`): after every
`CACHE_WINDOW` bytes read through the view, the pages of the files read
meanwhile are invalidated in one batch, so a full backup does not push the
host's working set out.  Source blocks are read with O_DIRECT by the ext4
layer and are not cached twice.

The mount's readahead is raised so that the kernel keeps several 1 MiB
requests in flight and the device read of one overlaps the reply of
another.  Large reads run in worker threads for that overlap, and so that
lookups and getattr keep being answered meanwhile (the handler hands
pyfuse3's read turn to another task first: `fuseloop.hand_over`), until
the device has shown itself fast: then they are answered in the event
loop, where they cost less than the hand-off, and go back to threads after
the first slow one (`ciphertextfs.readplace`).  Small reads are always
answered in the event loop.
libfuse's max_read option cannot be used: pyfuse3 has no way to set the
matching conn->max_read and libfuse then refuses to mount.

Threads.  Every request handler runs in the trio event loop, and only the
loop touches the adapter's own state: the directory handles and their
counter, the open counts, `stats`, the page-cache budget's window, the
record of large reads' times (`ReadPlace`, told by the handler once its
read is back), and (for a watched live source) the view's caches as
changes arrive.  Worker threads run: `View.read` of large reads while the
device is slow (at most `read_threads` at a time), which reaches the view,
its read-ahead and the ext4 reader through their locked LRU caches,
per-thread O_DIRECT buffers and positioned reads only; the page-cache
invalidations, one batch at a time, each on a set the loop has handed
over; and a live source's kernel invalidations (below).  So the view and
the reader below it must stay safe for concurrent calls; the adapter's own
fields need no lock.

A live source watched for changes (`ciphertextfs.live`, given as
`changes`) is cached like a static one.  Its events are read by a task of
the trio loop (`watch_changes`, waiting with wait_readable), not by a
thread: the view's caches are then changed between two requests, never in
the middle of one that the loop is answering, and no lock is needed around
the view.  The kernel's invalidations that follow (pyfuse3.invalidate_inode
and invalidate_entry) run in a worker thread, like the page cache drops:
they may wait for a page or a directory lock held by a request that only
this loop can answer.

Small files are read ahead a directory batch at a time by the view
(`ciphertextfs.view.readahead`), and open() hands their whole contents to
the page cache with notify_store before it answers, so the reader's read()
is served by the kernel.  The measurements behind each of these choices
are in benchmarks/RESULTS.md ("Design measurements").
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ciphertextfs import fuseloop, readdirplus
from ciphertextfs.fusedirent import bare_entry
from ciphertextfs.pagecache import PageCacheBudget
from ciphertextfs.readplace import ReadPlace
from ciphertextfs.view.model import ViewNoAttr, ViewNotFound
from ciphertextfs.view.protocol import ViewProtocol

if TYPE_CHECKING:
    from ciphertextfs.view.names import Entry

log = logging.getLogger("ciphertextfs")

#: FOPEN_DIRECT_IO for view files: no, see the module docstring for the numbers.
DIRECT_IO = False

#: Readahead of the FUSE mount's backing device info, set after mounting:
#: enough for several of the largest requests (1 MiB) to be in flight.
READ_AHEAD_KB = 16384

#: Bytes read through the view that the kernel may cache before the
#: daemon drops them.
CACHE_WINDOW = 32 << 20

#: Reads up to this size are answered in the event loop, larger ones in a
#: worker thread.
SMALL_READ = 128 << 10

#: Entries the view builds the attributes of ahead of a listing's first
#: reply: more than a reply holds (32 KiB for glibc's readdir), so that a
#: directory that fits in one is built whole, in inode number order.
FIRST_REPLY_ENTRIES = 256

#: Concurrent blocking reads in worker threads.  Two lets a read waiting on
#: the device overlap with another one and keeps metadata requests flowing
#: while a large read is in progress.
READ_THREADS = 2


#: The daemon's cyclic garbage collector runs a young collection after this
#: many allocations instead of 700: listings build several small objects per
#: entry, none of them in a cycle, and each collection walks every young one
#: (benchmarks/RESULTS.md, "Per-entry cost").
GC_THRESHOLDS = (100_000, 10, 10)

#: Seconds the change watcher waits after the first event of a burst, so
#: that one pass forgets what the whole burst changed.
CHANGE_BATCH = 0.01

P = ParamSpec("P")
T = TypeVar("T")


def _fuse_errors(
    handler: Callable[P, Awaitable[T]],
) -> Callable[P, Awaitable[T]]:
    """Turn every exception of a request handler into a FUSE errno.

    pyfuse3's main loop ends on any exception other than FUSEError, which
    would take the whole mount down for one damaged inode.  Damaged objects
    answer EIO with one log line naming the inode; the rest stays readable.
    """

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ViewNotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except ViewNoAttr:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        except trio.Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - the daemon must survive anything
            where = f"inode {args[1]}" if len(args) > 1 else "request"
            code = errno.EIO
            if isinstance(e, OSError) and e.errno in (errno.ENOMEM, errno.EOVERFLOW):
                code = e.errno
            log.warning("%s %s: %s: %s", handler.__name__, where, type(e).__name__, e)
            stats = getattr(args[0], "stats", None) if args else None
            if isinstance(stats, ServeStats):
                stats.errors += 1
            raise pyfuse3.FUSEError(code) from None

    return wrapper


@dataclass(slots=True)
class _DirHandle:
    """An open directory: its listing as opendir saw it, and how it is being read."""

    node: int
    entries: Sequence[Entry]
    damaged: bool
    how: readdirplus.Listing
    """Which of its replies carry attributes (`readdirplus.Guess`)."""
    ahead: bool = False
    """The view was told that the rest of the listing's attributes come next."""


@dataclass
class ServeStats:
    """What a mount served, for the summary logged at unmount."""

    entries: int = 0
    lookups: int = 0
    bytes: int = 0
    errors: int = 0


async def _async_erofs(*_args: Any, **_kwargs: Any) -> None:
    """Every modifying request: the view is read-only whatever the mount flags say."""
    raise pyfuse3.FUSEError(errno.EROFS)


class CiphertextOperations(pyfuse3.Operations):
    """Read-only FUSE operations over a `View`.

    `statvfs`, when given, answers statfs for a live source (the mounted
    filesystem's own figures are current, the on-disk superblock's free
    counts lag behind); otherwise the figures come from the superblock.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    #: The kernel enforces the view's POSIX ACLs itself.  Without this an
    #: ACL's mask in the group bits would grant every group member what only
    #: named users may do.
    enable_acl = True

    def __init__(
        self,
        view: ViewProtocol,
        *,
        statvfs_path: str | None = None,
        direct_io: bool = DIRECT_IO,
        read_threads: int = READ_THREADS,
        changes: Any = None,
    ) -> None:
        """`changes`: a `ciphertextfs.live.ChangeWatcher` of a live source whose
        view was made `watched`; None for a static source or the fallback."""
        super().__init__()
        self.view = view
        self.statvfs_path = statvfs_path
        self.direct_io = direct_io
        self.changes = changes
        self.timeout = float(view.cache_timeout)
        self.keep_cache = not view.live or view.watched
        self._limiter = trio.CapacityLimiter(read_threads) if read_threads > 0 else None
        self._read_place = ReadPlace()
        self._dir_handles: dict[int, _DirHandle] = {}
        self._open_counts: dict[int, int] = {}
        self._can_store = True
        self.page_cache = PageCacheBudget(CACHE_WINDOW, self._to_node)
        self._next_fh = 1
        self._guess = readdirplus.Guess()
        self.stats = ServeStats()

    # -- node ids -----------------------------------------------------------

    def _to_view(self, node: int) -> int:
        return self.view.root_ino if node == pyfuse3.ROOT_INODE else node

    def _to_node(self, ino: int) -> int:
        if ino == self.view.root_ino:
            return pyfuse3.ROOT_INODE
        if ino == pyfuse3.ROOT_INODE:
            # ext4 inode 1 (bad blocks) is never in a directory: a damaged entry.
            raise pyfuse3.FUSEError(errno.EIO)
        return ino

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self.view.attr(ino)
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._to_node(ino)
        e.generation = a.generation
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = a.st_mode
        e.st_nlink = a.st_nlink
        e.st_uid = a.st_uid
        e.st_gid = a.st_gid
        e.st_rdev = a.st_rdev
        e.st_size = a.st_size
        e.st_blocks = a.st_blocks
        e.st_blksize = self.block_size
        e.st_atime_ns = a.st_atime_ns
        e.st_mtime_ns = a.st_mtime_ns
        e.st_ctime_ns = a.st_ctime_ns
        return e

    @functools.cached_property
    def block_size(self) -> int:
        return self.view.statfs().block_size

    # -- lookups and attributes ---------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._to_view(parent_inode)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = self._entry(self.view.lookup(parent, name))
        self.stats.lookups += 1
        self._guess.looked_up(parent_inode, stat.S_ISDIR(entry.st_mode))
        return entry

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._to_view(inode))

    async def forget(self, inode_list: Any) -> None:
        """Nothing to forget: the view keeps no per-inode state."""

    # -- directories --------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the listing so offsets stay valid across readdir calls.

        A directory that needs several readdir requests is listed once; the
        offsets handed to the kernel are indexes into that snapshot, so a
        listing resumes exactly where the previous request stopped.
        """
        ino = self._to_view(inode)
        attr = self.view.attr(ino)
        if not stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = self.view.entries(ino)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = _DirHandle(
            inode, entries, bool(self.view.damage(ino)), self._guess.opened(inode)
        )
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List "." and "..", then the entries; offsets are 1 + the position.

        An entry whose inode cannot be read is still listed, with attributes
        that the kernel must not cache, so that the next stat of it answers
        EIO: a backup tool then reports that entry instead of never knowing
        it existed.  A reply without attributes (`readdirplus` says which)
        lists every entry whose file type the directory gives by inode
        number and type alone (`fusedirent`), and reads no inode.

        A directory partly damaged lists its sound entries, then fails with
        EIO: the error must come in a reply of its own (an error reply
        drops the entries of the same reply), so it answers the request
        that starts past the last entry.
        """
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        entries = handle.entries
        dir_ino = self._to_view(handle.node)
        with_attrs = bare_entry is None or self._guess.with_attributes(handle.how, start_id == 0)
        if with_attrs and start_id == 0:
            self.view.attrs_ahead(dir_ino, entries[:FIRST_REPLY_ENTRIES])
        elif with_attrs and not handle.ahead:
            handle.ahead = True
            self.view.attrs_ahead(dir_ino, entries[start_id - 2 :])
        own = self._entry(dir_ino)
        roots = (pyfuse3.ROOT_INODE, self.view.root_ino)
        added = 0
        for i in range(start_id, len(entries) + 2):
            if i < 2:
                name, attr = (b".", b"..")[i], own
            else:
                ent = entries[i - 2]
                name = ent.name
                if not with_attrs and ent.ifmt and ent.ino not in roots:
                    attr = bare_entry(ent.ino, ent.ifmt)
                else:
                    try:
                        attr = self._entry(ent.ino)
                    except Exception as e:  # noqa: BLE001 - one bad entry must not hide the rest
                        log.error("inode %d (%r): %s", ent.ino, ent.name, e)
                        self.stats.errors += 1
                        attr = self._unreadable_entry(ent.ino)
                        if attr is None:
                            continue
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            added += 1
            if i >= 2:
                self.stats.entries += 1
        if handle.damaged and not added:
            log.error("readdir of inode %d: directory damaged, answering EIO", handle.node)
            raise pyfuse3.FUSEError(errno.EIO)

    def _unreadable_entry(self, ino: int) -> pyfuse3.EntryAttributes | None:
        """Attributes for listing an entry whose inode answers EIO."""
        if ino in (pyfuse3.ROOT_INODE, self.view.root_ino):
            return None
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = stat.S_IFREG
        e.entry_timeout = 0
        e.attr_timeout = 0
        return e

    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- files --------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        ino = self._to_view(inode)
        attr = self.view.attr(ino)
        if stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        opened = self._open_counts.get(ino, 0)
        if opened == 0 and self.keep_cache and not self.direct_io and self._can_store:
            self._store_small(inode, ino)
        self._open_counts[ino] = opened + 1
        return pyfuse3.FileInfo(fh=ino, direct_io=self.direct_io, keep_cache=self.keep_cache)

    def _store_small(self, node: int, ino: int) -> None:
        """Hand a small file's contents to the page cache along with its open.

        The reader's next read() is then answered by the kernel, sparing a
        backup one FUSE round trip per small file.  Only when nobody else
        has the file open: a concurrent reader's readahead may hold a page
        locked until this very loop answers it, and notify_store would wait
        for that lock forever.  The cache keeps the pages across the open
        only with keep_cache, so live sources without a change watcher
        never take this path.
        """
        try:
            data = self.view.small_contents(ino)
        except Exception as e:  # noqa: BLE001 - only an optimisation: read() reports damage
            log.debug("inode %d: no read-ahead: %s", ino, e)
            return
        if not data:
            return
        try:
            pyfuse3.notify_store(node, 0, data)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                self._can_store = False
            log.debug("cannot store inode %d in the page cache: %s", ino, e)
            return
        self.page_cache.account(ino, len(data))
        self.stats.bytes += len(data)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Read in the event loop when small or when the device is fast, else in a thread.

        A small read costs less than the hand-off to a thread and back; a
        large one may wait on the device long enough that other requests
        should be answered meanwhile (`ciphertextfs.readplace`).
        """
        if self._limiter is None or size <= SMALL_READ:
            data = self.view.read(fh, off, size)
        else:
            start = time.perf_counter()
            try:
                if self._read_place.in_loop:
                    data = self.view.read(fh, off, size)
                else:
                    fuseloop.hand_over()
                    data = await trio.to_thread.run_sync(
                        self.view.read, fh, off, size, limiter=self._limiter
                    )
            finally:
                self._read_place.took(time.perf_counter() - start)
        if not self.direct_io:
            self.page_cache.account(fh, len(data))
        self.stats.bytes += len(data)
        return data

    async def release(self, fh: int) -> None:
        """Count the close; the page cache is bounded by `page_cache`."""
        left = self._open_counts.pop(fh, 1) - 1
        if left > 0:
            self._open_counts[fh] = left

    # -- a watched live source ------------------------------------------------

    async def watch_changes(self) -> None:
        """Forget what each burst of the live source's changes touched, until cancelled."""
        watcher = self.changes
        while True:
            await trio.lowlevel.wait_readable(watcher.fileno())
            await trio.sleep(CHANGE_BATCH)
            try:
                changes = watcher.read()
            except OSError as e:
                log.warning("reading the change watcher failed: %s", e)
                changes = None
            if changes is not None and not changes:
                continue
            try:
                if changes is None:
                    raise ValueError("changes lost")
                inv = self.view.apply_changes(changes.inodes, changes.names, changes.everything)
            except Exception as e:  # noqa: BLE001 - forgetting everything is always correct
                log.warning("live source changes: %s; forgetting everything", e)
                inv = self.view.apply_changes(set(), {}, True)
            if inv.inodes or inv.entries:
                await trio.to_thread.run_sync(self._invalidate_changed, inv, abandon_on_cancel=True)

    def _invalidate_changed(self, inv: Any) -> None:
        """The kernel forgets changed entries, then changed attributes and pages.

        Names the kernel never looked up, and inodes it does not hold,
        answer ENOENT: nothing to forget.
        """
        for parent, name in inv.entries:
            try:
                pyfuse3.invalidate_entry(self._notify_node(parent), name)
            except Exception as e:  # noqa: BLE001 - not cached, or gone meanwhile
                log.debug("invalidate entry %d/%r: %s", parent, name, e)
        for ino in inv.inodes:
            try:
                pyfuse3.invalidate_inode(self._notify_node(ino), False)
            except Exception as e:  # noqa: BLE001 - not cached, or gone meanwhile
                log.debug("invalidate inode %d: %s", ino, e)

    def _notify_node(self, ino: int) -> int:
        if ino == pyfuse3.ROOT_INODE:
            raise ValueError("ext4 inode 1 is never in the view")
        return self._to_node(ino)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.readlink(self._to_view(inode))

    # -- extended attributes ------------------------------------------------

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.xattr(self._to_view(inode), name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """All names, but trusted.* only for root, as ext4 lists them.

        The kernel refuses to read trusted.* values without CAP_SYS_ADMIN
        but leaves listing to the filesystem; ext4 hides the names too.
        """
        names = self.view.xattr_names(self._to_view(inode))
        if ctx.uid == 0:
            return list(names)
        return [n for n in names if not n.startswith(b"trusted.")]

    # -- the filesystem -----------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        figures = self.view.statfs()
        if self.statvfs_path is not None:
            v = os.statvfs(self.statvfs_path)
            s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
            s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        else:
            s.f_bsize = s.f_frsize = figures.block_size
            s.f_blocks = figures.blocks
            s.f_bfree = figures.free_blocks
            s.f_bavail = figures.available_blocks
            s.f_files = figures.files
            s.f_ffree = s.f_favail = figures.free_files
        s.f_namemax = figures.name_max
        return s

    # -- everything that would modify: EROFS ---------------------------------

    setattr = _async_erofs
    mknod = _async_erofs
    mkdir = _async_erofs
    unlink = _async_erofs
    rmdir = _async_erofs
    symlink = _async_erofs
    rename = _async_erofs
    link = _async_erofs
    write = _async_erofs
    create = _async_erofs
    setxattr = _async_erofs
    removexattr = _async_erofs


def fuse_options(source: str, *, allow_other: bool = False, debug: bool = False) -> set[str]:
    """libfuse mount options of a view; read-only and kernel permission checks always.

    default_permissions cannot be turned off: the daemon runs as root and
    answers every request, so without it any user could read any file.
    """
    # libfuse splits option strings at unescaped commas and pyfuse3 encodes
    # them as ASCII; the name only labels the mount in /proc/mounts.
    label = source.encode("ascii", "backslashreplace").decode("ascii")
    label = label.replace("\\", "\\\\").replace(",", "\\,")
    opts = {
        f"fsname=ciphertextfs:{label}",
        "subtype=ciphertextfs",
        "ro",
        "default_permissions",
    }
    if allow_other:
        opts.add("allow_other")
    if debug:
        opts.add("debug")
    return opts


def _set_read_ahead(mountpoint: str) -> None:
    """Raise the readahead of the new mount's bdi so backups get large requests.

    The kernel offers FUSE its default readahead (128 KiB) at init; the bdi
    of the connection ("MAJOR:MINOR" of the mount's st_dev) takes more once
    mounted.  Best effort: without it the view is merely slower.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except OSError as e:
        log.debug("cannot raise readahead of %s: %s", mountpoint, e)


async def _serve(
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    watch: Callable[[], Awaitable[None]] | None = None,
) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        async def announce() -> None:
            # A request answered through the mount proves the main loop runs;
            # only then may `ciphertextfs mount src mnt && ls mnt` proceed.
            await trio.to_thread.run_sync(_set_read_ahead, mountpoint, abandon_on_cancel=True)
            if on_ready is not None:
                on_ready()

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(announce)
        if watch is not None:
            nursery.start_soon(watch)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(
    ops: CiphertextOperations,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount, answer requests until unmounted or signalled, then unmount.

    `pyfuse3.init` raising means nothing was mounted.  SIGINT and SIGTERM
    end the loop and unmount; `fusermount3 -u` ends the loop from outside.
    """
    pyfuse3.init(ops, mountpoint, options)
    fuseloop.enable()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        watch = ops.watch_changes if ops.changes is not None else None
        trio.run(_serve, mountpoint, on_ready, watch)
    finally:
        pyfuse3.close(unmount=True)
        if ops.changes is not None:
            ops.changes.close()
