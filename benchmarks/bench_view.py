"""How fast a backup reads through the view, against the kernel's own ext4.

Builds an ext4 image holding the same tree twice -- once written through
the kernel into fscrypt v2 directories, once unencrypted -- then, from a
cold page cache each time, times `tar -cf - DIR | cat >/dev/null` over

  * the view of the encrypted copy (key removed, image unmounted, the view
    mounted over the loop device),
  * the unencrypted copy through the kernel's ext4 mount of the same device,
  * with --gocryptfs, the unencrypted copy through `gocryptfs -reverse` (the
    other way of backing up encrypted data with stock tools: an encrypted
    view of plaintext) over that kernel mount,
  * and `dd iflag=direct` of the device itself, for the raw bandwidth,

and reports the page cache each tar run brings in (charged to a memory
cgroup of its own, so that other activity on the machine does not count)
and how much of an unrelated, previously cached 512 MiB host file is still
cached afterwards.

Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_view --large-mib 1024 --small-files 20000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import common
from benchmarks.common import MIB
from ciphertextfs.fscrypt import kernel
from tests import harness, harness_view, trees

LARGE_FILE = 4 * MIB
SMALL_DIRS = 20
SMALL_MIN, SMALL_MAX = 512, 8192
HOST_FILE = 512 * MIB
GOALS = {"large": 1.25, "small": 2.0}
#: Issue 11's goals, for tar --xattrs (what a backup runs), static and live alike.
GOALS_XATTRS = {"large": 1.5, "small": 2.5}
VIEWS = ("view", "live")
READERS = {
    "view": "view (FUSE) tar",
    "live": "view (FUSE) tar, live source",
    "ext4": "kernel ext4 tar",
    "gocryptfs": "gocryptfs -reverse tar",
    "dd": "dd O_DIRECT",
}
WORKLOADS = {"large": "large (4 MiB files)", "small": "small (0.5-8 KiB files)"}


@dataclass
class Layout:
    """What the image holds; stored next to it so --reuse knows."""

    large_mib: int
    small_files: int
    large_bytes: int = 0
    small_bytes: int = 0
    image_mib: int = 0
    build: dict[str, float] = field(default_factory=dict)

    @property
    def large_count(self) -> int:
        return self.large_mib * MIB // LARGE_FILE


def small_sizes(count: int) -> list[int]:
    rng = random.Random(20000)
    return [rng.randint(SMALL_MIN, SMALL_MAX) for _ in range(count)]


# -- building -----------------------------------------------------------------


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync: with fscrypt the encryption happens at writeback, in
    the context of whoever forces it, so fsync from several threads spreads
    the kernel's (slow, generic) AES over the cores."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_large(root: Path, layout: Layout, threads: int) -> None:
    root.mkdir(exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        jobs = [
            pool.submit(write_file, root / f"f{i:05d}", common.file_data(i, LARGE_FILE))
            for i in range(layout.large_count)
        ]
        for j in jobs:
            j.result()


def write_small(root: Path, sizes: list[int], threads: int) -> None:
    root.mkdir(exist_ok=True)
    for d in range(SMALL_DIRS):
        (root / f"d{d:02d}").mkdir(exist_ok=True)

    def one(i: int) -> None:
        path = root / f"d{i % SMALL_DIRS:02d}" / f"s{i:06d}"
        with open(path, "wb") as f:
            f.write(common.file_data(1_000_000 + i, sizes[i]))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for j in [pool.submit(one, i) for i in range(len(sizes))]:
            j.result()
    os.sync()


def build(image: Path, layout: Layout, threads: int, log) -> None:
    sizes = small_sizes(layout.small_files)
    layout.large_bytes = layout.large_count * LARGE_FILE
    layout.small_bytes = sum(sizes)
    # Both copies, a 4 KiB block or two per small file, journal and slack.
    per_copy = layout.large_bytes + layout.small_files * 8192
    layout.image_mib = (2 * per_copy) // MIB * 11 // 10 + 512
    inodes = 2 * layout.small_files + 4 * layout.large_count + 8192
    log(f"building {image} ({layout.image_mib} MiB, {inodes} inodes)")
    harness.mkfs(image, size_mb=layout.image_mib, features=("encrypt",), extra=("-N", str(inodes)))
    mnt = image.parent / "build-mnt"
    mnt.mkdir(exist_ok=True)
    with common.loop_device(image) as dev:
        harness.run("mount", "-t", "ext4", dev, mnt)
        try:
            ident = kernel.add_key(mnt, trees.TEST_KEY_V2)
            try:
                for name in ("enc-large", "enc-small"):
                    (mnt / name).mkdir()
                    kernel.set_policy_v2(mnt / name, ident)
                steps = [
                    ("encrypted large", lambda: write_large(mnt / "enc-large", layout, threads)),
                    ("plain large", lambda: write_large(mnt / "plain-large", layout, threads)),
                    ("encrypted small", lambda: write_small(mnt / "enc-small", sizes, threads)),
                    ("plain small", lambda: write_small(mnt / "plain-small", sizes, threads)),
                ]
                for what, step in steps:
                    t0 = time.perf_counter()
                    step()
                    os.sync()
                    layout.build[what] = time.perf_counter() - t0
                    log(f"  wrote {what} in {layout.build[what]:.1f} s")
            finally:
                os.sync()
                with contextlib.suppress(OSError):
                    kernel.remove_key(mnt, ident, all_users=True)
        finally:
            harness.unmount(mnt)
    mnt.rmdir()


def ensure_host_file(path: Path) -> None:
    if path.exists() and path.stat().st_size == HOST_FILE:
        return
    with open(path, "wb") as f:
        for i in range(HOST_FILE // (16 * MIB)):
            f.write(common.file_data(2_000_000 + i, 16 * MIB))


# -- measuring ----------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    memcg_cache: int = 0
    memcg_peak: int = 0
    host_before: int = 0
    host_after: int = 0
    foreign_drop: bool = False


def cold_cache_with_host_file(host_file: Path) -> None:
    """Drop every cache, then cache the unrelated host file (the host's working set)."""
    harness.drop_caches()
    subprocess.run(["cat", os.fspath(host_file)], stdout=subprocess.DEVNULL, check=True)


def measure_tar(directory: Path, host_file: Path, tar_options: tuple[str, ...] = ()) -> Sample:
    cold_cache_with_host_file(host_file)
    host_before = common.fincore_bytes(host_file)
    drops = common.drop_pagecache_count()
    with common.memcg(f"ctfs-bench-{os.getpid()}") as (cg, usage):
        seconds = common.timed(common.tar_pipeline(directory, cg, tar_options))
        used = usage()
    return Sample(
        seconds,
        used.cache,
        used.peak,
        host_before,
        common.fincore_bytes(host_file),
        common.drop_pagecache_count() != drops,
    )


def measure_dd(dev: str, nbytes: int) -> Sample:
    harness.drop_caches()
    count = -(-nbytes // (4 * MIB))
    argv = ["dd", f"if={dev}", "iflag=direct", "bs=4M", f"count={count}", "of=/dev/null"]
    return Sample(common.timed(argv))


@contextlib.contextmanager
def kernel_mount(dev: str, mnt: Path, options: str = "ro,noload"):
    mnt.mkdir(exist_ok=True)
    harness.run("mount", "-t", "ext4", "-o", options, dev, mnt)
    try:
        yield mnt
    finally:
        harness.unmount(mnt)


@contextlib.contextmanager
def gocryptfs_reverse(plain: Path, work: Path):
    """`gocryptfs -reverse` of `plain` (read-only kernel mount), with a throwaway config."""
    conf = work / "gocryptfs.reverse.conf"
    conf.unlink(missing_ok=True)
    try:
        with common.gocryptfs_reverse(plain, work / "gocryptfs-mnt", conf) as mnt:
            yield mnt
    finally:
        conf.unlink(missing_ok=True)


@contextlib.contextmanager
def profiler(pid: int, out: Path | None):
    """py-spy on the view's daemon while the block runs, when asked for."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen(
        [spy, "record", "-p", str(pid), "--threads", "--idle", "--nonblocking", "-r", "200",
         "-f", "raw", "-o", os.fspath(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_all(
    dev: str,
    work: Path,
    layout: Layout,
    runs: int,
    profile_dir: Path | None,
    log,
    tar_options: tuple[str, ...] = (),
    gocryptfs: bool = False,
    sources: tuple[str, ...] = ("image",),
) -> dict[tuple[str, str], list[Sample]]:
    host_file = work / "host-file"
    ensure_host_file(host_file)
    results: dict[tuple[str, str], list[Sample]] = {}
    kmnt, vmnt = work / "kernel-mnt", work / "view-mnt"
    workloads = [w for w in ("large", "small") if getattr(layout, f"{w}_bytes")]
    for r in range(runs):
        for w in workloads:
            if "image" in sources:
                with harness_view.view_mount(dev, vmnt) as vm:
                    prof = None
                    if profile_dir is not None and r == 0:
                        prof = profile_dir / f"py-spy-{w}.txt"
                    with profiler(vm.pid, prof):
                        s = measure_tar(vmnt / f"enc-{w}", host_file, tar_options)
                results.setdefault((w, "view"), []).append(s)
                log(f"  run {r + 1} {w:5} view {s.seconds:7.2f} s")
            if "live" in sources:
                # noatime: the kernel's first reads of freshly written files
                # would each write an atime, under the view's feet.
                with (
                    kernel_mount(dev, kmnt, "noatime,noinit_itable"),
                    harness_view.view_mount(kmnt / f"enc-{w}", vmnt) as vm,
                ):
                    prof = None
                    if profile_dir is not None and r == 0:
                        prof = profile_dir / f"py-spy-{w}-live.txt"
                    with profiler(vm.pid, prof):
                        s = measure_tar(vmnt, host_file, tar_options)
                results.setdefault((w, "live"), []).append(s)
                log(f"  run {r + 1} {w:5} view, live source {s.seconds:7.2f} s")
            with kernel_mount(dev, kmnt):
                s = measure_tar(kmnt / f"plain-{w}", host_file, tar_options)
            results.setdefault((w, "ext4"), []).append(s)
            log(f"  run {r + 1} {w:5} ext4 {s.seconds:7.2f} s")
            if gocryptfs:
                with kernel_mount(dev, kmnt), gocryptfs_reverse(kmnt / f"plain-{w}", work) as g:
                    s = measure_tar(g, host_file, tar_options)
                results.setdefault((w, "gocryptfs"), []).append(s)
                log(f"  run {r + 1} {w:5} gocryptfs -reverse {s.seconds:7.2f} s")
            s = measure_dd(dev, getattr(layout, f"{w}_bytes"))
            results.setdefault((w, "dd"), []).append(s)
            log(f"  run {r + 1} {w:5} dd   {s.seconds:7.2f} s")
    return results


# -- reporting ----------------------------------------------------------------


def report(layout: Layout, results, runs: int, out, goals: dict[str, float] = GOALS) -> None:
    def mb(n: int) -> str:
        return f"{n / MIB:.0f} MiB"

    files = {"large": layout.large_count, "small": layout.small_files}
    nbytes = {"large": layout.large_bytes, "small": layout.small_bytes}
    headers = [
        "workload", "reader", "bytes", "files", "seconds", "MB/s", "view/ext4", "goal",
        "ahead of gocryptfs",
    ]  # fmt: skip
    rows = []
    for (w, reader), samples in results.items():
        sec = common.median([s.seconds for s in samples])
        ratio = goal = ahead = ""
        if reader in VIEWS:
            ext4 = common.median([s.seconds for s in results[(w, "ext4")]])
            ratio = f"{sec / ext4:.2f}x"
            goal = f"<= {goals[w]}x: {'met' if sec / ext4 <= goals[w] else 'MISSED'}"
            if (w, "gocryptfs") in results:
                gocryptfs = common.median([s.seconds for s in results[(w, "gocryptfs")]])
                ahead = f"{sec / gocryptfs:.2f}x: {'met' if sec < gocryptfs else 'MISSED'}"
        b = -(-nbytes[w] // (4 * MIB)) * 4 * MIB if reader == "dd" else nbytes[w]
        rows.append(
            [
                WORKLOADS[w],
                READERS[reader],
                mb(b),
                str(files[w]) if reader != "dd" else "-",
                f"{sec:.2f}",
                f"{b / sec / 1e6:.0f}",
                ratio,
                goal,
                ahead,
            ]
        )
    out(f"Timings: median of {runs} run(s), each from a cold page cache.")
    out("")
    common.print_table(headers, rows, out)
    out("")
    out(
        "Memory charged to the tar pipeline's own memory cgroup (page cache it brought in, "
        "plus its small anonymous memory for the peak), median over runs; and how much of "
        "a 512 MiB unrelated host file, read into the cache right before each run, is still "
        "cached after it (only runs during which nobody else dropped the caches):"
    )
    out("")
    rows = []
    for (w, reader), samples in results.items():
        if reader == "dd":
            continue

        # Runs during which someone else dropped the caches say nothing
        # about what the reader evicted.
        clean = [s for s in samples if not s.foreign_drop]

        def med(attr: str, samples=clean) -> int:
            return int(common.median([getattr(s, attr) for s in samples])) if samples else 0

        rows.append(
            [
                w,
                reader,
                mb(int(common.median([s.memcg_peak for s in samples]))),
                mb(int(common.median([s.memcg_cache for s in samples]))),
                f"{mb(med('host_after'))} of {mb(med('host_before'))}",
                f"{len(clean)} of {len(samples)}",
            ]
        )
    common.print_table(
        [
            "workload",
            "reader",
            "peak charged",
            "cache charged after",
            "host file cached",
            "runs without foreign drop_caches",
        ],
        rows,
        out,
    )


def chart(results, args, layout: Layout) -> None:
    """Seconds per reader, one panel per workload, as the first table has them."""
    groups: dict[str, dict[str, float]] = {}
    for (w, reader), samples in results.items():
        groups.setdefault(WORKLOADS[w], {})[READERS[reader]] = common.median(
            [s.seconds for s in samples]
        )
    tar = "tar --xattrs" if args.xattrs else "tar"
    title = (
        f"{tar} -cf - DIR | cat: seconds, median of {args.runs} cold-cache run(s); "
        f"{layout.large_mib} MiB of 4 MiB files, {layout.small_files} small files"
    )
    common.write_chart(args.chart, title, groups, "seconds (lower is better)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--large-mib", type=int, default=1024, help="MiB of 4 MiB files (default 1024)")
    p.add_argument("--small-files", type=int, default=20000, help="small files (default 20000)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ctfs-bench"))
    p.add_argument("--reuse", type=Path, metavar="DIR", help="reuse the image built in DIR")
    p.add_argument("--keep", action="store_true", help="keep the image for --reuse")
    p.add_argument("--profile", action="store_true", help="py-spy the daemon in the first run")
    p.add_argument(
        "--gocryptfs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time tar over gocryptfs -reverse of the unencrypted copy (default: yes)",
    )
    p.add_argument(
        "--source",
        choices=("image", "live", "both"),
        default="both",
        help="the view over the unmounted image, over the mounted filesystem, or both "
        "(default both)",
    )
    p.add_argument(
        "--xattrs",
        action="store_true",
        help="time tar --xattrs (what a real backup runs) instead of plain tar",
    )
    common.add_common_arguments(p)
    args = p.parse_args(argv)

    harness.require_fuse()
    printed = common.Report()
    out, log = printed.out, printed.log

    work = (args.reuse or args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    image, meta = work / "bench.img", work / "layout.json"
    with common.cleanup_on_signals():
        try:
            if args.reuse:
                layout = Layout(**json.loads(meta.read_text()))
            else:
                layout = Layout(args.large_mib, args.small_files)
                meta.unlink(missing_ok=True)
                build(image, layout, args.threads, log)
                meta.write_text(json.dumps(asdict(layout)))
            profile_dir = work if args.profile else None
            sources = ("image", "live") if args.source == "both" else (args.source,)
            # A live source is mounted read-write: the loop device must allow it.
            with common.loop_device(image, read_only="live" not in sources) as dev:
                tar_options = ("--xattrs",) if args.xattrs else ()
                results = run_all(
                    dev,
                    work,
                    layout,
                    args.runs,
                    profile_dir,
                    log,
                    tar_options,
                    args.gocryptfs,
                    sources,
                )
        finally:
            if not args.keep and not args.reuse:
                for f in (image, meta, work / "host-file"):
                    f.unlink(missing_ok=True)

    out(f"## bench_view ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    out("")
    for k, v in common.machine().items():
        out(f"- {k}: {v}")
    out(
        f"- configuration: {layout.large_count} x 4 MiB files ({layout.large_mib} MiB); "
        f"{layout.small_files} files of {SMALL_MIN}-{SMALL_MAX} bytes in {SMALL_DIRS} "
        f"directories ({layout.small_bytes / MIB:.0f} MiB); fscrypt v2 AES-256-XTS, "
        f"4 KiB blocks; image {layout.image_mib} MiB on a loop device with direct I/O"
    )
    out(f"- tar command: tar {'--xattrs ' if args.xattrs else ''}-cf - DIR | cat >/dev/null")
    if layout.build:
        built = ", ".join(f"{k} {v:.1f} s" for k, v in layout.build.items())
        out(f"- build through the kernel ({args.threads} writer threads, fsync each): {built}")
    out("")
    report(layout, results, args.runs, out, GOALS_XATTRS if args.xattrs else GOALS)
    printed.save(args.results)
    chart(results, args, layout)
    return 0


if __name__ == "__main__":
    common.exit_with(main)
