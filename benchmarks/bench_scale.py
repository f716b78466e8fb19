"""Speed at scale: a host-sized tree through the view, against the kernel's ext4.

Builds an ext4 image (on a loop device with direct I/O) holding a tree of
--entries entries twice -- once written through the kernel into fscrypt v2
directories (one policy per top-level directory, as homes have), once
unencrypted -- of the shape of a real host: directories of 1 to 50,000
entries, deep chains, long names (ciphertexts over 149 bytes, the kernel's
long no-key names), hard links, symlinks, small files with a few user
xattrs.  A small C generator (benchmarks/gentree.c, compiled with gcc at run
time) writes both copies at once, so 400,000 entries take minutes.

Then, from a cold page cache each time (drop_caches before every run), it
times each workload over

  * the view of the encrypted copy, for each --source: `image` (the view
    over the unmounted image's loop device, as over a snapshot) and `live`
    (the view over the directory of the mounted filesystem);
  * the kernel's ext4 mount of the same device: the unencrypted copy, and,
    where the kernel can do it without the key, the encrypted copy (it lists
    no-key names and stats them, but reads no contents);
  * with --plain-view, also the view of the unencrypted copy;
  * with --gocryptfs, gocryptfs -reverse of the unencrypted copy over the
    kernel's mount (the peer admins would otherwise use);

and reports for every view run the daemon's peak memory (VmHWM) and the
FUSE requests it was sent, by type, counted by the kernel's
fuse_request_send tracepoint in the timed run itself.

Workloads (--workloads): `find`; `rsync-dry`, `rsync -aHAX --dry-run`
against an identical destination (an unchanged nightly run; the
destination is made by a full rsync of the same reader, untimed, or from
the timed `rsync` one's, and kept next to the image for --reuse);
`rsync`, a full `rsync -aHAX` into a fresh destination on tmpfs; `tar`,
`tar --xattrs -cf - | cat >/dev/null`.  With
--big-dir the image also holds a directory of 300,000 empty files, and two
more workloads run: `ls -f` of it, and `tar --xattrs` of the tree's
50,000-file directory.  A run that outlasts --timeout is killed and
reported as unfinished.

Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_scale --entries 400000 --keep
    .venv/bin/python -m benchmarks.bench_scale --reuse /var/tmp/ctfs-scale --source live
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import common
from benchmarks.common import MIB
from ciphertextfs.fscrypt import kernel
from tests import harness, harness_view, trees

#: The largest directory of the tree, and the one --big-dir lists.
MAX_DIR = 50_000
LISTING = 300_000
CHAIN_DEPTH = 64
#: With the tests' policy (PAD_32), plaintext names over 128 bytes encrypt to
#: 160 bytes or more: past 149, where the kernel's no-key names turn into a
#: hash (struct fscrypt_nokey_name).
LONG_NAME_MIN = 129
NAME_MAX = 255

GOALS = {"find": 5.0, "rsync-dry": 6.0, "ls-f": 5.0, "tar-big": 5.0}
MEMORY_GOAL = 512 * MIB
WORKLOADS = {
    "find": "find DIR | wc -l",
    "rsync-dry": "rsync -aHAX --dry-run DIR/ DEST/ (unchanged)",
    "rsync": "rsync -aHAX DIR/ FRESH/ (tmpfs)",
    "tar": "tar --xattrs -cf - DIR | cat",
    "ls-f": "ls -f DIR/listing | wc -l",
    "tar-big": "tar --xattrs -cf - DIR/big | cat",
}
BIG_WORKLOADS = ("ls-f", "tar-big")
#: The directory each workload reads, below its copy's root.
BIG_DIRS = collections.defaultdict(str, {"ls-f": "listing", "tar-big": "big"})
DESTS = ("enc", "plain", "gocryptfs")
#: rsync's exit codes for a transfer that ended with some files or attributes
#: not copied (23) or vanished (24): the destination is still the one to compare to.
PARTIAL_RSYNC = (0, 23, 24)
#: What the kernel can do over the encrypted copy without its key.
KERNEL_ENC_WORKLOADS = ("find", "rsync-dry", "ls-f")


# -- the shape of the tree (pure) ---------------------------------------------


@dataclass
class Plan:
    """What gentree writes: its operations, and the shape they make.

    `entries` counts every name below the root (directories, files, hard
    links, symlinks), as `find ROOT | wc -l` minus one would.
    """

    lines: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    dir_entries: dict[int, int] = field(default_factory=lambda: {0: 0})
    depth: dict[int, int] = field(default_factory=lambda: {0: 0})
    top_of: dict[int, int] = field(default_factory=lambda: {0: 0})
    file_count: dict[int, int] = field(default_factory=dict)
    dirs: int = 0
    files: int = 0
    links: int = 0
    symlinks: int = 0
    long_names: int = 0

    @property
    def entries(self) -> int:
        return self.dirs + self.files + self.links + self.symlinks

    def mkdir(self, parent: int, name: str) -> int:
        ident = len(self.depth)
        self.lines.append(f"D {ident} {parent} {name}")
        self.dir_entries[parent] += 1
        self.dir_entries[ident] = 0
        self.depth[ident] = self.depth[parent] + 1
        self.top_of[ident] = ident if parent == 0 else self.top_of[parent]
        if parent == 0:
            self.tops.append(name)
        self.dirs += 1
        self.long_names += len(name.encode()) >= LONG_NAME_MIN
        return ident

    def add_files(
        self, d: int, count: int, minlen: int, maxlen: int, *, sized: bool = True
    ) -> None:
        """One F operation per directory: its names are what H links to."""
        if count <= 0:
            return
        assert d not in self.file_count, "one F operation per directory"
        seed = 1_000_003 * d + 17
        self.lines.append(f"F {d} {count} {minlen} {maxlen} {seed} {int(sized)}")
        self.file_count[d] = count
        self.dir_entries[d] += count
        self.files += count
        if maxlen >= LONG_NAME_MIN:
            # gentree draws lengths uniformly in [minlen, maxlen].
            span = maxlen - minlen + 1
            self.long_names += count * (maxlen - max(minlen, LONG_NAME_MIN) + 1) // span

    def add_links(self, d: int, src: int, count: int) -> None:
        """Hard links stay within one top-level directory: one fscrypt policy."""
        count = min(count, self.file_count.get(src, 0))
        if count <= 0:
            return
        assert self.top_of[d] == self.top_of[src]
        self.lines.append(f"H {d} {src} {count}")
        self.dir_entries[d] += count
        self.links += count

    def add_symlinks(self, d: int, count: int, maxlen: int) -> None:
        if count <= 0:
            return
        self.lines.append(f"S {d} {count} {maxlen} {7_000_001 * d + 3}")
        self.dir_entries[d] += count
        self.symlinks += count

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _long_dir_name(rng: random.Random, i: int) -> str:
    n = rng.randint(LONG_NAME_MIN, NAME_MAX)
    stem = f"long-directory-{i}-"
    return (stem + "abcdefghijklmnopqrstuvwxyz0123456789" * 8)[:n]


def plan(entries: int, *, seed: int = 411_553) -> Plan:
    """The tree of exactly `entries` entries.

    Fixed parts first (the largest directory, deep chains, long names, a
    few large directories), then homes of random subtrees until the budget
    is spent: log-uniform directory sizes from 1 entry up, symlinks, hard
    links to a sibling directory's files.
    """
    if entries < 1000:
        raise ValueError("at least 1000 entries")
    rng = random.Random(seed)
    p = Plan()

    def budget() -> int:
        return entries - p.entries

    big = p.mkdir(0, "big")
    p.add_files(big, min(MAX_DIR, entries // 8), 8, 40)

    deep = p.mkdir(0, "deep")
    for c in range(max(1, entries // 100_000)):
        d = p.mkdir(deep, f"chain{c}")
        for level in range(CHAIN_DEPTH):
            d = p.mkdir(d, f"level{level:02d}")
            p.add_files(d, 2, 4, 12)
            p.add_symlinks(d, 1, 40)

    long_top = p.mkdir(0, "long")
    per_dir = max(1, min(5000, entries // 80) // 10)
    for i in range(10):
        d = p.mkdir(long_top, _long_dir_name(rng, i))
        p.add_files(d, per_dir, LONG_NAME_MIN, NAME_MAX)
        p.add_symlinks(d, per_dir // 10, 300)

    homes = [p.mkdir(0, f"home{h:02d}") for h in range(max(1, entries // 100_000))]
    large = [s for s in (20_000, 10_000, 5_000, 2_000, 1_000) if s <= entries // 20]
    for i, size in enumerate(large):
        d = p.mkdir(homes[i % len(homes)], f"large{size}")
        p.add_files(d, size, 6, 60)

    # Breadth first over the homes, so that every home gets a share.
    queue = collections.deque((h, h) for h in homes)
    last_with_files: dict[int, int] = {}
    while budget() > 0 and queue:
        d, home = queue.popleft()
        # Log-uniform sizes: mostly small directories, a fifth of them up to 2,000 files.
        top = 30 if rng.random() < 0.8 else 2000
        files = min(budget(), int(math.exp(rng.uniform(0, math.log(top)))))
        p.add_files(d, files, 1, 100 if rng.random() < 0.9 else NAME_MAX)
        p.add_symlinks(d, min(budget(), files // 20 + (rng.random() < 0.2)), 120)
        src = last_with_files.get(home)
        if src is not None and rng.random() < 0.3:
            p.add_links(d, src, min(budget(), max(1, p.file_count[src] // 4)))
        if d in p.file_count:
            last_with_files[home] = d
        subdirs = rng.choice((0, 0, 1, 2, 3, 4, 8)) if p.depth[d] < 12 else 0
        for s in range(min(budget(), subdirs)):
            queue.append((p.mkdir(d, f"d{s}-{len(p.depth)}"), home))
        if not queue and budget() > 0:
            # Every branch ended without children: grow again from a home.
            h = homes[len(p.depth) % len(homes)]
            queue.append((p.mkdir(h, f"more{len(p.depth)}"), h))
    assert p.entries == entries, (p.entries, entries)
    return p


def plan_listing(count: int) -> Plan:
    """One directory of `count` empty files: a listing, not contents, is what it costs."""
    p = Plan()
    p.add_files(p.mkdir(0, "listing"), count, 10, 40, sized=False)
    return p


def shape(p: Plan) -> dict[str, int]:
    """The figures the report states about the tree."""
    sizes = [n for d, n in p.dir_entries.items() if d != 0]
    return {
        "entries": p.entries,
        "directories": p.dirs,
        "files": p.files,
        "hard links": p.links,
        "symlinks": p.symlinks,
        "names of 129+ bytes": p.long_names,
        "largest directory": max(sizes),
        "smallest directory": min(sizes),
        "deepest level": max(p.depth.values()),
    }


# -- building -----------------------------------------------------------------


@dataclass
class Layout:
    """What the image holds; stored next to it so --reuse knows."""

    entries: int
    listing: int
    tops: list[str]
    shape: dict[str, int]
    image_mib: int = 0
    build: dict[str, float] = field(default_factory=dict)


def compile_gentree(out: Path) -> Path:
    src = Path(__file__).with_name("gentree.c")
    harness.run("gcc", "-O2", "-Wall", "-o", out, src)
    return out


def build(image: Path, work: Path, p: Plan, listing: Plan | None, log) -> Layout:
    """Both copies of the tree (enc/, plain/) and of the listing (enc-big/, plain-big/)."""
    count = listing.files if listing else 0
    layout = Layout(p.entries, count, list(p.tops), shape(p))
    t0 = time.perf_counter()
    gentree = compile_gentree(work / "gentree")
    layout.build["gcc"] = time.perf_counter() - t0
    # Per copy: an inode, a block or so of data for most files, directory blocks.
    per_copy = (p.entries * 6 + count // 2) * 1024
    inodes = int(2.1 * (p.entries + count)) + 10_000
    layout.image_mib = (2 * per_copy + inodes * 256) // MIB + 1024
    log(f"building {image} ({layout.image_mib} MiB sparse, {inodes} inodes)")
    t0 = time.perf_counter()
    harness.mkfs(
        image,
        size_mb=layout.image_mib,
        features=("encrypt",),
        extra=("-N", str(inodes), "-E", "lazy_itable_init=1,nodiscard"),
    )
    layout.build["mke2fs"] = time.perf_counter() - t0
    mnt = Path(f"/tmp/scale-build-{os.getpid()}")
    mnt.mkdir(exist_ok=True)
    jobs = [("enc", p), ("plain", p)]
    if listing:
        jobs += [("enc-big", listing), ("plain-big", listing)]
    try:
        with common.loop_device(image) as dev:
            harness.run("mount", "-t", "ext4", "-o", "noinit_itable", dev, mnt)
            try:
                ident = kernel.add_key(mnt, trees.TEST_KEY_V2)
                try:
                    for copy, what in jobs:
                        (mnt / copy).mkdir()
                        for top in what.tops:
                            (mnt / copy / top).mkdir()
                            if copy.startswith("enc"):
                                trees.POLICY["v2"].apply(mnt / copy / top, {2: ident})
                    t0 = time.perf_counter()
                    # One generator per copy, all at once: the encrypted ones
                    # spend their time in the kernel's filename encryption.
                    procs = []
                    for copy, what in jobs:
                        proc = subprocess.Popen(
                            [gentree, mnt / copy],
                            stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                        )
                        procs.append(proc)
                        assert proc.stdin is not None
                        # A generator that fails stops reading: its stderr says why.
                        with contextlib.suppress(BrokenPipeError):
                            proc.stdin.write(what.text().encode())
                            proc.stdin.close()
                    for proc in procs:
                        err = proc.stderr.read() if proc.stderr else b""
                        if proc.wait() != 0:
                            raise RuntimeError(f"gentree failed: {err.decode(errors='replace')}")
                    layout.build["gentree (all copies at once)"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    os.sync()
                    layout.build["sync"] = time.perf_counter() - t0
                finally:
                    os.sync()
                    with contextlib.suppress(OSError):
                        kernel.remove_key(mnt, ident, all_users=True)
            finally:
                harness.unmount(mnt)
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()
    for k, v in layout.build.items():
        log(f"  {k}: {v:.1f} s")
    return layout


# -- measuring ----------------------------------------------------------------


@dataclass
class Sample:
    seconds: float | None  # None: unfinished after the timeout
    returncode: int = 0
    output: str = ""
    vm_hwm: int = 0  # bytes; 0 for the kernel
    requests: dict[str, int] = field(default_factory=dict)
    error: str = ""


def run_timed(argv: list[str], timeout: float) -> Sample:
    """Run a pipeline in its own session; kill it all at the timeout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Sample(None, error=f"unfinished after {timeout:.0f} s")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    dt = time.perf_counter() - t0
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return Sample(dt, proc.returncode, out.decode(errors="replace").strip(), error=" / ".join(tail))


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def command(workload: str, directory: Path, dest: Path | None) -> list[str]:
    sh = ["bash", "-o", "pipefail", "-c"]
    d = os.fspath(directory)
    if workload == "find":
        return [*sh, 'find "$1" | wc -l', "find", d]
    if workload == "ls-f":
        return [*sh, 'ls -f "$1" | wc -l', "ls", d]
    if workload in ("rsync-dry", "rsync"):
        dry = ["--dry-run"] if workload == "rsync-dry" else []
        return ["rsync", "-aHAX", *dry, d + "/", os.fspath(dest) + "/"]
    if workload == "tar":
        return common.tar_pipeline(directory, tar_options=("--xattrs",))
    if workload == "tar-big":
        return common.tar_pipeline(directory, tar_options=("--xattrs",))
    raise ValueError(workload)


@dataclass(frozen=True)
class Reader:
    """One way of reading one copy (`enc` or `plain`).

    `how` is `image` (a view of the unmounted image's device), `live` (a
    view of the copy's directory in the mounted filesystem), `kernel`, or
    `gocryptfs` (-reverse, over the kernel's mount of the plain copy).
    """

    label: str
    copy: str
    how: str

    @property
    def is_view(self) -> bool:
        return self.how in ("image", "live")

    @property
    def dest(self) -> str:
        """Which destination an unchanged rsync-dry compares against."""
        return "gocryptfs" if self.how == "gocryptfs" else self.copy

    def runs(self, workload: str) -> bool:
        if self.how == "kernel" and self.copy == "enc":
            return workload in KERNEL_ENC_WORKLOADS
        return True

    def root(self, workload: str) -> str:
        """The directory of the filesystem that holds what the workload reads.

        gocryptfs encrypts the names below its root: it is mounted over the
        very directory a --big-dir workload reads.
        """
        root = self.copy + ("-big" if workload == "ls-f" else "")
        return root + "/" + BIG_DIRS[workload] if self.how == "gocryptfs" else root

    def sub(self, workload: str) -> str:
        """Where in the root the workload reads."""
        return "" if self.how == "gocryptfs" else BIG_DIRS[workload]


class Bench:
    def __init__(self, args, work: Path, log) -> None:
        self.args, self.work, self.log = args, work, log
        self.pid = os.getpid()
        self.vmnt = Path(f"/tmp/scale-view-{self.pid}")
        self.kmnt = Path(f"/tmp/scale-kernel-{self.pid}")
        self.dst = Path(f"/tmp/scale-dst-{self.pid}")
        self.gmnt = Path(f"/tmp/scale-gocryptfs-{self.pid}")
        self.workloads: list[str] = []
        self.results: dict[tuple[str, str, str], list[Sample]] = {}
        self.trace: Path | None = None
        self.dev = ""

    @contextlib.contextmanager
    def tmpfs(self) -> Iterator[None]:
        self.dst.mkdir(exist_ok=True)
        harness.run("mount", "-t", "tmpfs", "-o", "size=75%", "scale-dst", self.dst)
        try:
            yield
        finally:
            harness.unmount(self.dst)
            with contextlib.suppress(OSError):
                self.dst.rmdir()

    @contextlib.contextmanager
    def reading(self, reader: Reader, workload: str) -> Iterator[tuple[Path, int | None, Path]]:
        """The directory to run `workload` in, the pid of the FUSE daemon if any, its mount."""
        root = reader.root(workload)
        if reader.how == "kernel":
            yield self.kmnt / root, None, self.kmnt
        elif reader.how == "image":
            with harness_view.view_mount(self.dev, self.vmnt) as vm:
                yield self.vmnt / root, vm.pid, self.vmnt
        elif reader.how == "live":
            with harness_view.view_mount(self.kmnt / root, self.vmnt) as vm:
                yield self.vmnt, vm.pid, self.vmnt
        else:
            conf = self.work / f"gocryptfs-{root.replace('/', '-')}.conf"
            with common.gocryptfs_reverse(self.kmnt / root, self.gmnt, conf) as g:
                yield g, common.fuse_daemon_pid(g, b"gocryptfs"), g

    def ensure_dest(self, reader: Reader, fresh: Path | None = None) -> Path:
        """The destination an unchanged rsync-dry compares against, made once.

        It lives next to the image, on the host's disk (cold like the
        source in every run, as a backup appliance's disk is), and is kept
        with it: through today's view it takes longer to make than the
        dry run itself.  Made from `fresh` (a timed full rsync's
        result) when there is one, else by an untimed full rsync.
        """
        dest = self.work / f"dest-{reader.dest}"
        done = dest.with_suffix(".done")
        if done.exists():
            return dest
        if reader.how == "kernel" and reader.copy == "enc" and fresh is None:
            raise RuntimeError("the encrypted destination comes from a view: order the readers")
        shutil.rmtree(dest, ignore_errors=True)
        what = "the timed rsync's copy" if fresh else reader.label
        self.log(f"  making the rsync-dry destination {dest} from {what} (untimed)")
        if fresh is not None:
            s = run_timed(command("rsync", fresh, dest), 4 * self.args.timeout)
        else:
            with self.reading(reader, "rsync") as (path, _pid, _mnt):
                s = run_timed(command("rsync", path, dest), 4 * self.args.timeout)
        # 23, some files or attributes not transferred: gocryptfs -reverse
        # fails to read some of its own long-name files.
        if s.seconds is None or s.returncode not in PARTIAL_RSYNC:
            raise RuntimeError(f"making {dest} failed: {s.error}")
        self.log(
            f"    {s.seconds:.1f} s"
            + (f" (exit {s.returncode}: {s.error})" if s.returncode else "")
        )
        done.touch()
        return dest

    def measure(self, source: str, workload: str, reader: Reader, run: int) -> None:
        dest = None
        if workload == "rsync-dry":
            dest = self.ensure_dest(reader)
        elif workload == "rsync":
            dest = self.dst / "fresh"
        with self.reading(reader, workload) as (path, pid, mnt):
            harness.drop_caches()
            counter = self.trace if reader.how != "kernel" else None
            with common.fuse_requests(counter, mnt) as counts:
                s = run_timed(
                    command(workload, path / reader.sub(workload), dest), self.args.timeout
                )
            if pid is not None:
                s.vm_hwm = vm_hwm(pid)
            s.requests = dict(counts)
        if workload == "rsync":
            done = s.seconds is not None and s.returncode in PARTIAL_RSYNC
            if done and "rsync-dry" in self.workloads:
                self.ensure_dest(reader, dest)
            shutil.rmtree(dest, ignore_errors=True)
        self.results.setdefault((workload, source, reader.label), []).append(s)
        secs = "unfinished" if s.seconds is None else f"{s.seconds:8.2f} s"
        extra = f" rc={s.returncode} {s.error}" if s.returncode else ""
        mem = f" VmHWM {s.vm_hwm / MIB:.0f} MiB" if s.vm_hwm else ""
        self.log(f"  run {run + 1} {workload:9} {source:5} {reader.label:24} {secs}{mem}{extra}")

    def phase(self, source: str, dev: str, workloads: list[str]) -> None:
        self.dev, self.workloads = dev, workloads
        readers = [Reader("view", "enc", source)]
        if self.args.plain_view:
            readers.append(Reader("view (unencrypted copy)", "plain", source))
        readers += [
            Reader("kernel ext4", "plain", "kernel"),
            Reader("kernel ext4, encrypted, no key", "enc", "kernel"),
        ]
        if self.args.gocryptfs:
            readers.append(Reader("gocryptfs -reverse", "plain", "gocryptfs"))
        # A live filesystem is mounted read-write; noatime, or the kernel's
        # first reads of freshly written files would each write an atime.
        opts = "ro,noload" if source == "image" else "noatime,noinit_itable"
        for run in range(self.args.runs):
            for w in workloads:
                for reader in readers:
                    if not reader.runs(w):
                        continue
                    # The image source is the unmounted filesystem: the kernel
                    # mounts it only for its own runs.
                    mounted = contextlib.nullcontext()
                    if source == "live" or not reader.is_view:
                        mounted = kernel_mount(dev, self.kmnt, opts)
                    with mounted:
                        self.measure(source, w, reader, run)


@contextlib.contextmanager
def kernel_mount(dev: str, mnt: Path, options: str) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    harness.run("mount", "-t", "ext4", "-o", options, dev, mnt)
    try:
        yield mnt
    finally:
        harness.unmount(mnt)
        with contextlib.suppress(OSError):
            mnt.rmdir()


# -- reporting ----------------------------------------------------------------


def _median(samples: list[Sample]) -> float | None:
    done = [s.seconds for s in samples if s.seconds is not None]
    # A workload unfinished in any run is reported unfinished.
    return common.median(done) if len(done) == len(samples) else None


def per_entry(requests: dict[str, int], entries: int) -> str:
    total = sum(v for k, v in requests.items() if k != "(lost)")
    return f"{total / entries:.2f}" if requests else "-"


def entries_read(layout: Layout, workload: str) -> int:
    """The entries a workload walks: the denominator of its requests per entry."""
    if workload == "ls-f":
        return layout.listing + 1
    if workload == "tar-big":
        return layout.shape.get("largest directory", MAX_DIR) + 1
    return layout.entries + 1


def verdict(ratio: float | None, goal: float) -> str:
    if ratio is None:
        return f"<= {goal:g}x: MISSED"
    return f"<= {goal:g}x: {'met' if ratio <= goal else 'MISSED'}"


def report(layout: Layout, bench: Bench, out) -> None:
    results = bench.results
    timeout = bench.args.timeout
    peer = any(label == "gocryptfs -reverse" for _w, _s, label in results)
    headers = [
        "workload", "source", "reader", "entries seen", "seconds", "vs kernel", "goal",
        *(["ahead of gocryptfs"] if peer else []), "VmHWM", "req/entry",
    ]  # fmt: skip
    rows = []
    for (w, source, label), samples in results.items():
        sec = _median(samples)
        base = _median(results.get((w, source, "kernel ext4"), []))
        ratio = goal = ahead = ""
        if label != "kernel ext4" and sec is not None and base:
            ratio = f"{sec / base:.1f}x"
        if label == "view" and w in GOALS:
            goal = verdict(sec / base if sec is not None and base else None, GOALS[w])
        if label == "view" and peer:
            g = _median(results.get((w, source, "gocryptfs -reverse"), []))
            if sec is not None and g:
                ahead = f"{sec / g:.2f}x: {'met' if sec < g else 'MISSED'}"
            elif sec is None:
                ahead = "MISSED"
        shown = f"unfinished after {timeout:.0f} s" if sec is None else f"{sec:.2f}"
        if any(s.returncode for s in samples):
            shown += f" (exit {max(s.returncode for s in samples)})"
        hwm = max(s.vm_hwm for s in samples)
        rows.append(
            [
                WORKLOADS[w],
                source,
                label,
                samples[0].output if w in ("find", "ls-f") else "",
                shown,
                ratio,
                goal,
                *([ahead] if peer else []),
                f"{hwm / MIB:.0f} MiB" if hwm else "",
                per_entry(samples[0].requests, entries_read(layout, w)) if hwm else "",
            ]
        )
    out(f"Timings: median of {bench.args.runs} run(s), each from a cold page cache.")
    out("")
    common.print_table(headers, rows, out, text_columns=3)
    out("")
    if any(w == "rsync-dry" and label.startswith("kernel ext4, enc") for w, _s, label in results):
        out(
            "The kernel's dry run over the encrypted copy compares against the view's "
            "destination: the same names, but other sizes and xattrs, which a dry run only lists."
        )
        out("")
    hwm = max(
        (s.vm_hwm for (_w, _s, label), ss in results.items() if label == "view" for s in ss),
        default=0,
    )
    if hwm:
        met = "met" if hwm <= MEMORY_GOAL else "MISSED"
        out(
            f"Daemon peak memory (VmHWM of the view's daemon, largest over all runs): "
            f"{hwm / MIB:.0f} MiB; goal <= {MEMORY_GOAL // MIB} MiB: {met} at "
            f"{layout.entries:,} entries."
        )
        out("")
    rows = []
    for (w, source, label), samples in results.items():
        req = samples[0].requests
        if not req:
            continue
        entries = entries_read(layout, w)
        detail = ", ".join(
            f"{op} {n / entries:.2f}" for op, n in sorted(req.items(), key=lambda kv: -kv[1])
        )
        rows.append([w, source, label, f"{sum(req.values()):,}", detail])
    if rows:
        out(
            "FUSE requests sent to the daemon in the first run, counted by the kernel's "
            "fuse_request_send tracepoint; per entry (counting the directory walked), by type:"
        )
        out("")
        headers = ["workload", "source", "reader", "requests", "per entry"]
        common.print_table(headers, rows, out, text_columns=5)
        out("")


def parse_workloads(text: str, big_dir: bool) -> list[str]:
    """The workloads asked for, in the order they run.

    A full rsync runs before the dry run: its destination is the one the
    unchanged dry run compares against, which saves making it untimed.
    """
    chosen = {w.strip() for w in text.split(",") if w.strip()}
    for w in chosen:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if big_dir:
        chosen.update(BIG_WORKLOADS)
    order = ("find", "rsync", "rsync-dry", "tar", *BIG_WORKLOADS)
    return [w for w in order if w in chosen]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--entries", type=int, default=400_000, help="entries of the tree (default 400000)"
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ctfs-scale"))
    p.add_argument("--reuse", type=Path, metavar="DIR", help="reuse the image built in DIR")
    p.add_argument("--keep", action="store_true", help="keep the image for --reuse")
    p.add_argument(
        "--build-only", action="store_true", help="build the image, keep it, measure nothing"
    )
    p.add_argument("--runs", type=int, default=1, help="runs per measurement; median reported")
    p.add_argument("--source", choices=("image", "live", "both"), default="both")
    p.add_argument(
        "--workloads",
        default="find,rsync-dry,rsync,tar",
        help=f"comma-separated, of: {', '.join(WORKLOADS)} (default find,rsync-dry,rsync,tar)",
    )
    p.add_argument(
        "--big-dir",
        action="store_true",
        help=f"also a directory of {LISTING:,} entries (ls -f) and tar of the {MAX_DIR:,}-file one",
    )
    p.add_argument(
        "--listing-entries",
        type=int,
        default=LISTING,
        metavar="N",
        help=f"entries of the --big-dir directory (default {LISTING})",
    )
    p.add_argument(
        "--plain-view", action="store_true", help="also the view of the unencrypted copy"
    )
    p.add_argument(
        "--gocryptfs",
        action="store_true",
        help="also gocryptfs -reverse of the unencrypted copy (over the kernel's mount)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    p.add_argument("--results", type=Path, help="also append the report (Markdown) to this file")
    args = p.parse_args(argv)
    workloads = parse_workloads(args.workloads, args.big_dir)

    harness.require_fuse()
    printed = common.Report()
    out, log = printed.out, printed.log
    work = (args.reuse or args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    image, meta = work / "scale.img", work / "layout.json"
    sources = ["image", "live"] if args.source == "both" else [args.source]
    load_before = os.getloadavg()
    bench: Bench | None = None
    with common.cleanup_on_signals():
        try:
            if args.reuse:
                layout = Layout(**json.loads(meta.read_text()))
                if args.big_dir and not layout.listing:
                    raise SystemExit(f"{meta}: built without --big-dir")
            else:
                meta.unlink(missing_ok=True)
                for copy in DESTS:
                    (work / f"dest-{copy}.done").unlink(missing_ok=True)
                for conf in work.glob("gocryptfs-*.conf"):
                    conf.unlink()
                listing = plan_listing(args.listing_entries) if args.big_dir else None
                layout = build(image, work, plan(args.entries), listing, log)
                meta.write_text(json.dumps(asdict(layout)))
            bench = Bench(args, work, log)
            if args.build_only:
                args.keep = True
                sources = []
            with common.tracefs() as trace, bench.tmpfs():
                bench.trace = trace
                if trace is None:
                    log("no fuse_request_send tracepoint: requests not counted")
                for source in sources:
                    with common.loop_device(image, read_only=source == "image") as dev:
                        bench.phase(source, dev, workloads)
        finally:
            for point in (bench.vmnt, bench.gmnt) if bench else ():
                with contextlib.suppress(OSError):
                    point.rmdir()
            if not args.keep and not args.reuse:
                for f in (image, meta, work / "gentree"):
                    f.unlink(missing_ok=True)
                for copy in DESTS:
                    shutil.rmtree(work / f"dest-{copy}", ignore_errors=True)
                    (work / f"dest-{copy}.done").unlink(missing_ok=True)
                for conf in work.glob("gocryptfs-*.conf"):
                    conf.unlink()
    load_after = os.getloadavg()

    out(f"## bench_scale ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    out("")
    for k, v in common.machine().items():
        out(f"- {k}: {v}")
    out(f"- load average (1 min) before and after: {load_before[0]:.1f}, {load_after[0]:.1f}")
    out("- tree: " + ", ".join(f"{k} {v:,}" for k, v in layout.shape.items()))
    if layout.listing:
        out(f"- and a directory of {layout.listing:,} empty files (not counted above)")
    out(
        f"- both copies in one ext4 image ({layout.image_mib} MiB, sparse) on a loop device with "
        "direct I/O; fscrypt v2 AES-256-XTS, one policy per top-level directory"
    )
    if layout.build:
        built = ", ".join(f"{k} {v:.1f} s" for k, v in layout.build.items())
        total = sum(layout.build.values())
        out(f"- build through the kernel: {total:.0f} s ({built})")
    out(f"- command: bench_scale {' '.join(argv if argv is not None else sys.argv[1:])}")
    out("")
    if bench is not None and bench.results:
        report(layout, bench, out)
    printed.save(args.results)
    return 0


if __name__ == "__main__":
    common.exit_with(main)
