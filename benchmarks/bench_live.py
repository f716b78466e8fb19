"""A backup over a live source: the view of a mounted filesystem, two code versions side by side.

Builds an ext4 image, mounts it, writes into an fscrypt v2 directory (key
present) a tree of small files (0.5-8 KiB, SMALL_DIRS directories) and one
directory of many small files, then, from a cold page cache each time, times
`tar --xattrs -cf - DIR | cat >/dev/null` and `rsync -aHAX --dry-run DIR/ EMPTY/`

  * through the kernel's ext4 mount itself (plaintext, the key present),
  * through the view of that mounted filesystem (`ciphertextfs mount MNT VIEW`,
    ciphertext) served by the code of this tree,
  * and through the same view served by another source tree (--baseline,
    e.g. /work/main: the one-second cache expiry this tree replaces).

Runs that exceed --timeout are killed and reported as such.  Run as root
from the repository root:

    .venv/bin/python -m benchmarks.bench_live --baseline /work/main
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from tests import harness, harness_view, trees

SMALL_DIRS = 20
SMALL_MIN, SMALL_MAX = 512, 8192
WIDE_MIN, WIDE_MAX = 512, 2048


def build(mnt: Path, keys: dict[int, bytes], small: int, wide: int) -> None:
    vault = mnt / "vault"
    vault.mkdir()
    trees.POLICY["v2"].apply(vault, keys)
    rnd = random.Random(11)
    for d in range(SMALL_DIRS):
        (vault / "small" / f"d{d:02}").mkdir(parents=True)
    for i in range(small):
        size = rnd.randint(SMALL_MIN, SMALL_MAX)
        (vault / "small" / f"d{i % SMALL_DIRS:02}" / f"f{i:06}").write_bytes(
            common.file_data(i, size)
        )
    (vault / "wide").mkdir()
    for i in range(wide):
        size = rnd.randint(WIDE_MIN, WIDE_MAX)
        (vault / "wide" / f"entry-{i:06}").write_bytes(common.file_data(small + i, size))
    os.sync()


def timed(argv: str, timeout: float) -> float | None:
    """Seconds the shell pipeline `argv` took, None when killed at `timeout`."""
    harness.drop_caches()
    start = time.monotonic()
    proc = subprocess.Popen(["sh", "-c", argv], start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return None
    return time.monotonic() - start


def workloads(top: Path, plain: Path, empty: Path) -> dict[str, str]:
    """The commands, over `top` (the vault, in the kernel's or the view's names)."""
    # In the view the vault's entries have no-key names: found by inode.
    by_ino = {os.lstat(top / n).st_ino: n for n in os.listdir(top)}
    small = by_ino[os.lstat(plain / "small").st_ino]
    wide = by_ino[os.lstat(plain / "wide").st_ino]
    tar = "tar --xattrs --xattrs-include='*' -cf -"
    return {
        "tar small": f"{tar} -C '{top}' '{small}' | cat >/dev/null",
        "tar wide": f"{tar} -C '{top}' '{wide}' | cat >/dev/null",
        "rsync -n wide": f"rsync -aHAX --dry-run '{top}/{wide}/' '{empty}/'",
    }


@contextlib.contextmanager
def view_of(mnt: Path, view: Path, tree: Path | None):
    """The view of `mnt`, served by the source tree `tree` (None: this one)."""
    if tree is None:
        with harness_view.view_mount(mnt, view) as vm:
            yield vm.mountpoint
        return
    view.mkdir(parents=True, exist_ok=True)
    python = tree / ".venv/bin/python"
    proc = subprocess.run(
        [str(python), "-m", "ciphertextfs.cli", "mount", str(mnt), str(view)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    try:
        yield view
    finally:
        harness_view.stop_view(view)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small-files", type=int, default=20000)
    p.add_argument("--wide-entries", type=int, default=50000)
    p.add_argument("--baseline", type=Path, help="another source tree to time the view of")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/live-bench"))
    args = p.parse_args(argv)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    image, mnt, empty = work / "image", work / "mnt", work / "empty"
    mnt.mkdir(exist_ok=True)
    empty.mkdir(exist_ok=True)
    size_mb = 256 + (args.small_files * 6 + args.wide_entries * 3) // 1024
    inodes = args.small_files + args.wide_entries + 4096
    results: dict[str, dict[str, float | None]] = {}
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "encrypt", "-N", str(inodes), str(image)], check=True
    )
    dev = subprocess.run(
        ["losetup", "--show", "-f", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            with trees.keys_added(mnt) as keys:
                t0 = time.monotonic()
                build(mnt, keys, args.small_files, args.wide_entries)
                print(f"built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
                readers: dict[str, Path | None] = {"kernel ext4": None, "view (this tree)": None}
                if args.baseline is not None:
                    readers[f"view ({args.baseline})"] = args.baseline
                for reader, tree in readers.items():
                    if reader == "kernel ext4":
                        ctx = contextlib.nullcontext(mnt)
                    else:
                        ctx = view_of(mnt, work / "view", tree)
                    with ctx as top:
                        for name, cmd in workloads(
                            Path(top) / "vault", mnt / "vault", empty
                        ).items():
                            secs = timed(cmd, args.timeout)
                            results.setdefault(name, {})[reader] = secs
                            shown = "killed" if secs is None else f"{secs:.1f} s"
                            print(f"{name:14} {reader:30} {shown}", file=sys.stderr)
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        image.unlink(missing_ok=True)

    readers_list = list(next(iter(results.values())))
    print(f"| workload | {' | '.join(readers_list)} |")
    print(f"| --- |{' --- |' * len(readers_list)}")
    for name, row in results.items():
        cells = []
        for r in readers_list:
            v = row[r]
            cells.append(f"killed after {args.timeout:.0f} s" if v is None else f"{v:.1f} s")
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
