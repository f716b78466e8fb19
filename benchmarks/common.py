"""Shared pieces of the benchmark scripts: machine facts, cleanup, test data.

The benchmarks print tables; they are not tests and assert nothing.  They
need root, loop devices, ext4 encryption and /dev/fuse, like the kernel
tests, and reuse the test harness so that every loop device and mount they
create is released however they end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests import harness, harness_view

#: Key of the keystream that fills the benchmark files (not a secret).
DATA_KEY = bytes(range(32))

MIB = 1 << 20


def file_data(index: int, size: int) -> bytes:
    """Incompressible, reproducible contents for file number `index`.

    AES-CTR keystream: gigabytes per second, so generating the data costs
    nothing next to writing it, and the encrypted and unencrypted copies of
    the tree hold the same bytes without keeping them in memory.
    """
    nonce = index.to_bytes(16, "little")
    enc = Cipher(algorithms.AES(DATA_KEY), modes.CTR(nonce)).encryptor()
    return enc.update(bytes(size))


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = meminfo()["MemTotal"]
    aes = "?"
    with contextlib.suppress(OSError), open("/proc/crypto") as f:
        blocks = f.read().split("\n\n")
        best = -1
        for b in blocks:
            fields = dict(
                (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in b.splitlines())
            )
            if fields.get("name") == "xts(aes)" and int(fields.get("priority", "0")) > best:
                best = int(fields.get("priority", "0"))
                aes = fields.get("driver", "?")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kernel xts(aes)": aes,
    }


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


def drop_pagecache_count() -> int:
    """How often anyone has written to /proc/sys/vm/drop_caches since boot.

    Other processes (tests running alongside) dropping the caches during a
    run would make the host file look evicted by the reader under test.
    """
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "drop_pagecache":
                return int(value)
    return 0


def fincore_bytes(path: Path) -> int:
    """Bytes of `path` resident in the page cache (util-linux fincore)."""
    out = harness.run("fincore", "--bytes", "--noheadings", "--output", "RES", path)
    return int(out.split()[0])


def timed(argv: Sequence[str]) -> float:
    """Run a shell pipeline, failing loudly; its wall-clock seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    return dt


def tar_pipeline(
    directory: Path, cgroup: Path | None = None, tar_options: tuple[str, ...] = ()
) -> list[str]:
    """`tar -cf - DIR | cat >/dev/null`: GNU tar skips reading files with -f /dev/null.

    With `cgroup`, the pipeline runs in that memory cgroup, so the page cache
    its reads bring in is charged there and can be told apart from whatever
    else the machine caches meanwhile.  `tar_options` go before -cf
    (--xattrs, say).
    """
    enter = 'echo $$ > "$3/cgroup.procs" && ' if cgroup is not None else ""
    return [
        "bash",
        "-o",
        "pipefail",
        "-c",
        enter + 'tar -C "$1" "${@:4}" -cf - "$2" | cat >/dev/null',
        "tar",
        os.fspath(directory.parent),
        directory.name,
        os.fspath(cgroup) if cgroup is not None else "",
        *tar_options,
    ]


MEMCG_V1 = Path("/sys/fs/cgroup/memory")
MEMCG_V2 = Path("/sys/fs/cgroup")


@dataclass
class MemcgUsage:
    peak: int
    cache: int


@contextlib.contextmanager
def memcg(name: str) -> Iterator[tuple[Path, Callable[[], MemcgUsage]]]:
    """A fresh memory cgroup (v1 or v2); yields it and a reader of its usage.

    The usage is the peak of everything charged (the pipeline's page cache
    and its small anonymous memory) and the page cache charged right now.
    """
    if (MEMCG_V1 / "memory.usage_in_bytes").exists():
        cg = MEMCG_V1 / name
        peak_file, stat_key = "memory.max_usage_in_bytes", "cache"
    else:
        cg = MEMCG_V2 / name
        peak_file, stat_key = "memory.peak", "file"
    cg.mkdir()

    def usage() -> MemcgUsage:
        stat = {}
        for line in (cg / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            stat[k] = int(v)
        return MemcgUsage(int((cg / peak_file).read_text()), stat.get(stat_key, 0))

    try:
        yield cg, usage
    finally:
        # After an interruption the pipeline we started may still run in it.
        with contextlib.suppress(OSError):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def tree_label(tree: Path) -> str:
    """A code tree named by its commit, for tables that compare trees."""
    r = subprocess.run(
        ["git", "-C", tree, "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return r.stdout.strip()[:40] or os.fspath(tree)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = False, direct_io: bool = True) -> Iterator[str]:
    """A loop device over `image`, with direct I/O to the backing file by default.

    Without it the loop driver reads the image through the host's page cache,
    which would hide the disk behind RAM in every cold-cache figure and
    count the image's pages as cache growth of whatever reads the device.
    """
    argv = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if read_only:
        argv.append("--read-only")
    dev = harness.run(*argv, image).strip()
    try:
        yield dev
    finally:
        harness.detach_loop(dev)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind through every finally block, then exit."""


def exit_with(main: Callable[[], int]) -> None:
    """Exit with main()'s status; after SIGTERM or SIGHUP, once every finally has run."""
    try:
        sys.exit(main())
    except Interrupted as e:
        sys.exit(f"interrupted by {e}; mounts and loop devices released")


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so that mounts and loops are released."""

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], out: Callable, *, text_columns: int = 2
) -> None:
    """A Markdown table (readable as plain text too): text left, figures right.

    A "|" inside a cell (a shell pipeline naming a workload) is escaped, or
    Markdown would split the cell there.
    """
    headers = [h.replace("|", "\\|") for h in headers]
    rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i < text_columns else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    out(line(headers))
    out("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        out(line(r))


class Report:
    """The report a benchmark prints, kept to append to --results at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def out(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @staticmethod
    def log(line: str) -> None:
        """Progress, on stderr: not part of the report."""
        print(line, file=sys.stderr, flush=True)

    def save(self, path: Path | None) -> None:
        if path is not None:
            with open(path, "a") as f:
                f.write("\n".join(self.lines) + "\n\n")


def write_chart(
    path: Path | None,
    title: str,
    groups: dict[str, dict[str, float]],
    ylabel: str,
    log=None,
) -> bool:
    """A grouped bar chart (PNG): one group per workload, one bar per reader.

    matplotlib is an optional extra (`pip install -e '.[bench]'`): without
    it the benchmark still prints its tables and says that no chart was made.
    """
    log = log or Report.log
    if path is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no chart written to {path}")
        return False
    readers: list[str] = []
    for bars in groups.values():
        readers += [r for r in bars if r not in readers]
    panel = max(4.2, 1.25 * max(len(bars) for bars in groups.values()))
    size = (panel * len(groups) + 0.8, 4.4)
    fig, axes = plt.subplots(1, len(groups), figsize=size, squeeze=False, layout="constrained")
    colours = plt.get_cmap("tab10")
    for ax, (group, bars) in zip(axes[0], groups.items(), strict=True):
        names = [r for r in readers if r in bars]
        values = [bars[r] for r in names]
        positions = range(len(names))
        rects = ax.bar(positions, values, color=[colours(readers.index(r)) for r in names])
        ax.bar_label(rects, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=9)
        labels = [textwrap.fill(n, 16) for n in names]
        ax.set_xticks(list(positions), labels, fontsize=9)
        ax.set_title(group, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(values) * 1.18 if values else 1)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"chart written to {path}")
    return True


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes."""
    p.add_argument("--runs", type=int, default=3, help="runs per measurement; median reported")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="writer threads")
    p.add_argument("--results", type=Path, help="also append the report to this file")
    p.add_argument(
        "--chart",
        type=Path,
        metavar="PNG",
        help="also draw the timings as a bar chart into PNG (needs matplotlib)",
    )


@contextlib.contextmanager
def gocryptfs_reverse(plain: Path, mnt: Path, conf: Path) -> Iterator[Path]:
    """`gocryptfs -reverse` of `plain` on `mnt`: its encrypted view, for backups.

    The peer admins would otherwise use.  `conf` is created (with a
    throwaway password) when missing and kept otherwise: the reverse view's
    names and contents follow from its master key, so a destination made
    through it stays identical only under the same config.
    """
    mnt.mkdir(exist_ok=True)
    password = ["-extpass", "echo ctfs-bench", "-config", os.fspath(conf), "-q"]
    if not conf.exists():
        # -scryptn 10: the key derivation is not what is measured.
        harness.run("gocryptfs", "-init", "-reverse", "-scryptn", "10", *password, plain)
    harness.run("gocryptfs", "-reverse", *password, plain, mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", os.fspath(mnt)], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mnt)], check=False)


def fuse_daemon_pid(mountpoint: Path, program: bytes) -> int | None:
    """The process whose command line names `program` and ends with `mountpoint`."""
    wanted = os.fspath(mountpoint).encode()
    for pid, argv in harness_view.live_processes():
        if argv and program in os.path.basename(argv[0]) and argv[-1] == wanted:
            return pid
    return None


# -- FUSE requests, counted by the kernel -------------------------------------

#: tracefs mounts an instance here when the machine has none mounted.
TRACEFS_FALLBACK = Path("/tmp/scale-tracefs")
_FUSE_OPCODE = re.compile(rb"\(FUSE_(\w+)\)")


def _mounted_tracefs() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "tracefs":
                return Path(fields[1].replace("\\040", " "))
    return None


@contextlib.contextmanager
def tracefs() -> Iterator[Path | None]:
    """A tracefs with the fuse request tracepoint (kernel 6.16 on), or None.

    Mounted under /tmp for the block when the machine has none mounted, so
    nothing is left behind.
    """
    base, ours = _mounted_tracefs(), False
    if base is None:
        TRACEFS_FALLBACK.mkdir(exist_ok=True)
        if subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS_FALLBACK]).returncode == 0:
            base, ours = TRACEFS_FALLBACK, True
    try:
        ok = base is not None and (base / "events/fuse/fuse_request_send").is_dir()
        yield base if ok else None
    finally:
        if ours:
            harness.unmount(TRACEFS_FALLBACK)
            with contextlib.suppress(OSError):
                TRACEFS_FALLBACK.rmdir()


def fuse_connection(mountpoint: Path) -> int:
    """The connection number the fuse tracepoints report: the kernel's dev_t of the mount."""
    dev = os.stat(mountpoint).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


@contextlib.contextmanager
def fuse_requests(base: Path | None, mountpoint: Path) -> Iterator[collections.Counter]:
    """Count the requests the kernel sends to the FUSE mount at `mountpoint`, by opcode.

    The kernel's own `fuse_request_send` tracepoint, filtered to this one
    connection in a tracefs instance of our own: it costs the daemon nothing
    (unlike libfuse's debug trace, which formats every request), so the
    counts come from the timed run itself.  Events the ring buffer had to
    drop are counted under "(lost)".  With `base` None, counts nothing.
    """
    counts: collections.Counter = collections.Counter()
    if base is None:
        yield counts
        return
    inst = base / "instances" / f"scale-{os.getpid()}"
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("8192")
        event = inst / "events/fuse/fuse_request_send"
        (event / "filter").write_text(f"connection == {fuse_connection(mountpoint)}\n")
        stop = threading.Event()
        fd = os.open(inst / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)

        def drain() -> None:
            tail = b""
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    if stop.is_set():
                        break
                    time.sleep(0.05)
                    continue
                if not chunk:
                    break
                chunk = tail + chunk
                cut = chunk.rfind(b"\n") + 1
                tail = chunk[cut:]
                counts.update(m.decode() for m in _FUSE_OPCODE.findall(chunk, 0, cut))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        (event / "enable").write_text("1")
        try:
            yield counts
        finally:
            (event / "enable").write_text("0")
            stop.set()
            reader.join(30)
            os.close(fd)
            lost = 0
            for stats in inst.glob("per_cpu/cpu*/stats"):
                for line in stats.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() == "overrun":
                        lost += int(value)
            if lost:
                counts["(lost)"] = lost
    finally:
        for _ in range(50):
            try:
                inst.rmdir()
                break
            except OSError:
                time.sleep(0.1)
