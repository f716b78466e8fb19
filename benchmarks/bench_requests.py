"""FUSE requests, by type, and time per small encrypted file under find, rsync and tar.

Builds an ext4 image with small files written through the kernel into a
fscrypt v2 directory, locks it, then for each ciphertextfs code tree given
(`--tree`, e.g. a checkout of main and this branch):

  * counts the FUSE requests each tool (`find`, `rsync -aHAX --dry-run`
    into an empty directory, `rsync -aHAX`, `tar --xattrs`) makes, from libfuse's own trace
    (`ciphertextfs mount -f -o debug` prints one `opcode:` line per request
    the kernel sends), per opcode and per file;
  * times each tool over a view mounted without tracing, from a cold page
    cache, median of --runs.

The trace slows the daemon, so requests and time come from separate runs.
Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_requests --tree /work/main --tree .
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from tests import harness, trees

DIRS = 10
SIZE_MIN, SIZE_MAX = 512, 4096
TOOLS = {
    "find": "find {m} >/dev/null",
    "rsync -aHAX --dry-run": "rsync -aHAX --dry-run {m}/ {dst}/",
    "rsync -aHAX": "rsync -aHAX {m}/ {dst}/",
    "tar --xattrs": "tar --xattrs --xattrs-include='*' --acls -cf - -C {m} . | cat >/dev/null",
}
_OPCODE = re.compile(rb"opcode: (\w+)")


def build(image: Path, files: int) -> None:
    image = image.resolve()
    harness.mkfs(image, size_mb=max(64, files // 40), features=("encrypt",))
    with harness.mounted(image, image.parent / "build.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            enc = mnt / "enc"
            enc.mkdir()
            trees.POLICY["v2"].apply(enc, keys)
            for d in range(DIRS):
                (enc / f"d{d}").mkdir()
            for i in range(files):
                size = SIZE_MIN + (i * 7919) % (SIZE_MAX - SIZE_MIN)
                (enc / f"d{i % DIRS}" / f"file-{i:06d}").write_bytes(common.file_data(i, size))
            os.sync()
            trees.lock(mnt, keys)


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.fspath(tree.resolve()))


def _wait_mounted(mnt: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("ciphertextfs mount exited")
        if time.monotonic() > deadline:
            raise RuntimeError("view not mounted after 30 s")
        time.sleep(0.05)


def _tool(cmd: str, m: Path, work: Path) -> float:
    dst = work / "rsync-dst"
    shutil.rmtree(dst, ignore_errors=True)
    start = time.monotonic()
    subprocess.run(cmd.format(m=m, dst=dst), shell=True, check=True, capture_output=True)
    return time.monotonic() - start


def count_requests(tree: Path, image: Path, work: Path, cmd: str) -> collections.Counter:
    mnt = work / "trace.mnt"
    mnt.mkdir(exist_ok=True)
    log = work / "trace.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ciphertextfs.cli", "mount", "-f", "-o", "debug", image, mnt],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(tree),
            cwd=tree,
        )
        try:
            _wait_mounted(mnt, proc)
            harness.drop_caches()
            before = log.read_bytes().count(b"opcode:")
            _tool(cmd, mnt, work)
            text = log.read_bytes()
        finally:
            harness.unmount(mnt)
            proc.wait(timeout=30)
    counts = collections.Counter(m.decode() for m in _OPCODE.findall(text[_nth(text, before) :]))
    return counts


def _nth(text: bytes, n: int) -> int:
    """Offset just after the n-th trace line (the requests of the mount itself)."""
    pos = 0
    for _ in range(n):
        pos = text.index(b"opcode:", pos) + 1
    return pos


def time_tool(tree: Path, image: Path, work: Path, cmd: str, runs: int) -> float:
    mnt = work / "time.mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "ciphertextfs.cli", "mount", image, mnt],
        check=True,
        env=_env(tree),
        cwd=tree,
    )
    try:
        _wait_mounted(mnt)
        samples = []
        for _ in range(runs):
            harness.drop_caches()
            samples.append(_tool(cmd, mnt, work))
    finally:
        harness.unmount(mnt)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=5000, help="small files (default 5000)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-time", action="store_true", help="count requests only")
    p.add_argument(
        "--tree",
        type=Path,
        action="append",
        required=True,
        help="a ciphertextfs checkout whose code serves the view (repeatable)",
    )
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ctfs-bench-req-", dir="/var/tmp"))
    try:
        image = work / "src.img"
        build(image, args.files)
        print(
            f"Configuration: {args.files} files of {SIZE_MIN}-{SIZE_MAX} bytes in "
            f"{DIRS} fscrypt v2 directories; median of {args.runs} cold-cache runs"
        )
        for k, v in common.machine().items():
            print(f"- {k}: {v}")
        print()
        print(
            "| code | tool | requests/file | getxattr/file | listxattr/file | seconds | us/file |"
        )
        print("|---|---|---|---|---|---|---|")
        by_type: dict[tuple[str, str], collections.Counter] = {}
        for tree in args.tree:
            label = common.tree_label(tree)
            for tool, cmd in TOOLS.items():
                counts = count_requests(tree, image, work, cmd)
                secs = 0.0 if args.no_time else time_tool(tree, image, work, cmd, args.runs)
                n = args.files
                print(
                    f"| {label} | {tool} | {sum(counts.values()) / n:.2f} | "
                    f"{counts['GETXATTR'] / n:.2f} | {counts['LISTXATTR'] / n:.2f} | "
                    f"{secs:.2f} | {secs / n * 1e6:.0f} |",
                    flush=True,
                )
                by_type[label, tool] = counts
        n = args.files
        ops = sorted({op for c in by_type.values() for op in c})
        print()
        print("Requests per file, by type:")
        print()
        print("| code | tool | " + " | ".join(ops) + " |")
        print("|---|---|" + "---|" * len(ops))
        for (label, tool), counts in by_type.items():
            cells = " | ".join(f"{counts[op] / n:.2f}" if counts[op] else "" for op in ops)
            print(f"| {label} | {tool} | {cells} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
