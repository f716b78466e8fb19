"""The daemon's own work per directory entry, without FUSE.

`find` and `ls -f` over the view send few requests (readdirplus answers a
hundred entries at a time), so their time is what the daemon does for each
entry: read the directory, make the no-key names, read the inode and build
the attributes the reply carries.  This walks a tree of SOURCE (a device or
image, read as the view reads it) exactly that way, through `View` and the
adapter's own entry builder, in this process, and prints wall and CPU time
per entry: the figure to profile (py-spy record -- python -m
benchmarks.bench_walk ...) and to compare between two checkouts, free of
the FUSE round trips and of the kernel's side.  --names walks as the
daemon answers `find` once it no longer sends attributes (readdirplus).

    .venv/bin/python -m benchmarks.bench_walk /dev/loop0 enc enc-big --runs 3
"""

from __future__ import annotations

import argparse
import gc
import stat
import statistics
import time

from benchmarks import common
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.fuse import GC_THRESHOLDS, CiphertextOperations
from ciphertextfs.fusedirent import bare_entry
from ciphertextfs.view.model import View
from tests import harness


def walk(source: str, top: bytes, names: bool = False) -> tuple[int, float, float]:
    """(entries, wall seconds, CPU seconds) of one walk of the view's /`top`.

    With `names`, as the daemon answers `find` once it has guessed that
    nothing listed is stat'ed: the listings, a bare entry for everything
    but directories, the attributes of directories alone.
    """
    if names and bare_entry is None:
        raise RuntimeError("pyfuse3's EntryAttributes layout is not known here: no bare entries")
    gc.set_threshold(*GC_THRESHOLDS)  # as the daemon runs
    with Filesystem.open(source) as fs:
        view = View(fs)
        ops = CiphertextOperations(view)
        start = {e.name: e.ino for e in view.entries(view.root_ino)}[top]
        wall, cpu = time.perf_counter(), time.process_time()
        n = 0
        todo = [start]
        while todo:
            d = todo.pop()
            ops._entry(d)
            entries = view.entries(d)
            if not names:
                view.attrs_ahead(d, entries)
            for e in entries:
                n += 1
                if names and e.ifmt and e.ifmt != stat.S_IFDIR:
                    bare_entry(e.ino, e.ifmt)
                elif stat.S_ISDIR(ops._entry(e.ino).st_mode):
                    todo.append(e.ino)
        return n, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="device or image holding the tree")
    p.add_argument("tops", nargs="+", help="directories at the view's root to walk")
    p.add_argument("--runs", type=int, default=3, help="walks of each; median reported")
    p.add_argument("--warm", action="store_true", help="keep the page cache between runs")
    p.add_argument(
        "--names", action="store_true", help="names alone, as for find (attributes of directories)"
    )
    args = p.parse_args()
    rows = []
    for top in args.tops:
        samples = []
        for _ in range(args.runs):
            if not args.warm:
                harness.drop_caches()
            samples.append(walk(args.source, top.encode(), args.names))
        n = samples[0][0]
        wall = statistics.median(s[1] for s in samples)
        cpu = statistics.median(s[2] for s in samples)
        rows.append([top, f"{n:,}", f"{wall:.2f}", f"{wall / n * 1e6:.1f}", f"{cpu / n * 1e6:.1f}"])
    headers = ["tree", "entries", "seconds", "us/entry (wall)", "us/entry (CPU)"]
    common.print_table(headers, rows, print, text_columns=1)
    return 0


if __name__ == "__main__":
    common.exit_with(main)
