"""Cold lookups in big directories, and the daemon's memory after listing several of them.

For each source tree given with --tree (say /work/main and this checkout),
mounts the view of one image and times `stat DIR/NAME` from a fresh mount
and a dropped page cache (the view's caches empty): one name in a
directory of --entries entries, plain and encrypted (v2).  The kernel's ext4
mount of the same image is timed the same way.  Then, in a fresh mount,
lists every directory (`ls -f`, the biggest ones included) and reports the
daemon's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from tests import harness, trees

SIZES = (50_000, 100_000, 200_000, 300_000)
"""The directories listed for the memory figure (plain, 40-byte names)."""


def _name(i: int) -> str:
    return f"entry-{i:07d}-{'x' * 26}"


def build(image: Path, entries: int, big: int, many: tuple[int, int]) -> None:
    """One plain and one encrypted directory of `entries`, `big` bigger plain ones,
    and many[0] plain directories of many[1] entries."""
    image = image.resolve()
    total = 2 * entries + sum(SIZES[:big]) + many[0] * many[1]
    harness.mkfs(
        image,
        size_mb=max(256, total // 1500),
        features=("encrypt",),
        extra=("-N", str(total + 10_000)),
    )
    with harness.mounted(image, image.parent / "lookup-build.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            for name in ("plain", "enc"):
                d = mnt / name
                d.mkdir()
                if name == "enc":
                    trees.POLICY["v2"].apply(d, keys)
                for i in range(entries):
                    os.close(os.open(d / _name(i), os.O_CREAT | os.O_WRONLY, 0o644))
            for n in SIZES[:big]:
                d = mnt / f"big{n}"
                d.mkdir()
                for i in range(n):
                    os.close(os.open(d / _name(i), os.O_CREAT | os.O_WRONLY, 0o644))
            for k in range(many[0]):
                d = mnt / f"many{k:04d}"
                d.mkdir()
                for i in range(many[1]):
                    os.close(os.open(d / _name(i), os.O_CREAT | os.O_WRONLY, 0o644))
            os.sync()
            trees.lock(mnt, keys)


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.fspath(tree.resolve()))


class Daemon:
    """`ciphertextfs mount -f` of one source tree, its pid at hand."""

    def __init__(self, tree: Path, image: Path, mnt: Path) -> None:
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciphertextfs.cli", "mount", "-f", image, mnt],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(tree),
            cwd=tree,
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("ciphertextfs mount failed")
            time.sleep(0.05)

    def vm_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def close(self) -> None:
        harness.unmount(self.mnt)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _one_name(root: Path, sub: str) -> str:
    """The name of the middle entry (in an encrypted directory, its no-key name)."""
    names = sorted(os.listdir(root / sub))
    return names[len(names) // 2]


def _cold_stat(path: Path) -> float:
    harness.drop_caches()
    start = time.perf_counter()
    os.lstat(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--big", type=int, default=len(SIZES), help="how many of the big directories")
    p.add_argument(
        "--many",
        default="0:0",
        help="N:M, also N directories of M entries, listed for the memory figure",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tree", type=Path, action="append", help="source trees to compare")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/lookup-bench"))
    p.add_argument("--reuse", action="store_true", help="keep an image built before")
    args = p.parse_args(argv)
    tree_list = args.tree or [Path(".")]
    many_dirs, many_entries = (int(x) for x in args.many.split(":"))
    args.work.mkdir(parents=True, exist_ok=True)
    image = args.work / "fs.img"
    if not (args.reuse and image.exists()):
        start = time.monotonic()
        build(image, args.entries, args.big, (many_dirs, many_entries))
        print(f"built in {time.monotonic() - start:.0f} s")

    kmnt = args.work / "lookup-kernel.mnt"
    with harness.mounted(image, kmnt, read_only=True) as (_dev, k):
        kernel = {
            sub: statistics.median(
                _cold_stat(k / sub / _one_name(k, sub)) for _ in range(args.runs)
            )
            for sub in ("plain",)
        }
    rows = [("kernel ext4", f"{kernel['plain'] * 1000:.1f} ms", "n/a", "n/a")]
    for tree in tree_list:
        times: dict[str, list[float]] = {"plain": [], "enc": []}
        names = {}
        d = Daemon(tree, image, args.work / "lookup-view.mnt")
        try:
            for sub in times:
                names[sub] = _one_name(d.mnt, sub)
        finally:
            d.close()
        for _ in range(args.runs):
            for sub in times:
                d = Daemon(tree, image, args.work / "lookup-view.mnt")
                try:
                    os.lstat(d.mnt / sub)  # the top directory: not what is measured
                    times[sub].append(_cold_stat(d.mnt / sub / names[sub]))
                finally:
                    d.close()
        d = Daemon(tree, image, args.work / "lookup-view.mnt")
        try:
            subs = ["plain", "enc", *(f"big{n}" for n in SIZES[: args.big])]
            subs += [f"many{k:04d}" for k in range(many_dirs)]
            for sub in subs:
                subprocess.run(["ls", "-f", d.mnt / sub], check=True, stdout=subprocess.DEVNULL)
            hwm = d.vm_hwm_kib()
        finally:
            d.close()
        rows.append(
            (
                f"view ({tree})",
                f"{statistics.median(times['plain']) * 1000:.1f} ms",
                f"{statistics.median(times['enc']) * 1000:.1f} ms",
                f"{hwm / 1024:.0f} MiB",
            )
        )
    listed = 2 * args.entries + sum(SIZES[: args.big]) + many_dirs * many_entries
    print()
    print(f"## bench_lookup ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print()
    for k, v in common.machine().items():
        print(f"- {k}: {v}")
    print(
        f"- cold `stat DIR/NAME` in directories of {args.entries} entries (median of "
        f"{args.runs}, fresh mount, page cache dropped); VmHWM after `ls -f` of "
        f"{listed} entries in {2 + args.big + many_dirs} directories"
    )
    print()
    print("| source | plain lookup | encrypted lookup | daemon VmHWM |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
