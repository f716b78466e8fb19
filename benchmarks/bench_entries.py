"""Daemon CPU per directory entry: listing a directory and building its entries' attributes.

Builds an ext4 image through the kernel with a few large directories, in a
fscrypt v2 directory (locked afterwards) and unencrypted, then for each
ciphertextfs code tree given (`--tree`, e.g. a checkout of main and this
branch) runs, in a fresh process over a fresh `Filesystem` and `View`, what
a readdirplus of every directory asks of the view: the listing, then the
attributes of each entry; and what `rsync -aHAX` then asks per entry: its
xattr names and the value of each.  Time is process CPU time, best of
--runs.  `--profile` prints the top of a cProfile of the listing pass.

Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_entries --tree /work/main --tree .
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from tests import harness, trees

DIRS = 3

#: Runs inside the code tree measured: the API both old and new trees have.
_PROBE = r"""
import cProfile, io, json, pstats, sys, time
from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.view.model import View

image, top, what, profile = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

def run():
    fs = Filesystem.open(image)
    view = View(fs)
    root = view.lookup(view.root_ino, top.encode())
    n = 0
    dirs = [view.lookup(root, e.name) for e in view.entries(root)]
    for d in dirs:
        for e in view.entries(d):
            view.attr(e.ino)
            n += 1
            if what == "xattrs":
                for name in view.xattr_names(e.ino):
                    view.xattr(e.ino, name)
    fs.close()
    return n

prof = cProfile.Profile() if profile else None
t0 = time.process_time()
if prof:
    prof.enable()
n = run()
if prof:
    prof.disable()
cpu = time.process_time() - t0
out = {"entries": n, "cpu": cpu}
if prof:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    out["profile"] = s.getvalue()
print(json.dumps(out))
"""


def build(image: Path, per_dir: int) -> None:
    image = image.resolve()
    harness.mkfs(
        image,
        size_mb=max(128, per_dir * DIRS * 2 * 6 // 1024),
        features=("encrypt",),
        extra=("-N", str(per_dir * DIRS * 2 + 1024)),
    )
    with harness.mounted(image, image.parent / "build.mnt") as (_dev, mnt):
        with trees.keys_added(mnt) as keys:
            enc = mnt / "enc"
            enc.mkdir()
            trees.POLICY["v2"].apply(enc, keys)
            for top in (enc, mnt / "plain"):
                top.mkdir(exist_ok=True)
                for d in range(DIRS):
                    sub = top / f"d{d}"
                    sub.mkdir()
                    for i in range(per_dir):
                        p = sub / f"entry-{i:06d}"
                        if i % 50 == 0:
                            os.symlink(f"target-of-{i}", p)
                        else:
                            p.write_bytes(common.file_data(i, 64 + i % 3000))
            os.sync()
            trees.lock(mnt, keys)


def probe(tree: Path, image: Path, top: str, what: str, profile: bool) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, image, top, what, "1" if profile else "0"],
        env=dict(os.environ, PYTHONPATH=os.fspath(tree.resolve())),
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-dir", type=int, default=20000, help="entries per directory")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print a cProfile of each pass")
    p.add_argument("--image", type=Path, help="reuse (or keep) the image at this path")
    p.add_argument("--tree", type=Path, action="append", required=True)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ctfs-bench-entries-", dir="/var/tmp"))
    try:
        image = args.image or work / "src.img"
        if not image.exists():
            build(image, args.per_dir)
        print(
            f"Configuration: {DIRS} directories of {args.per_dir} entries (1 in 50 a symlink, "
            f"the rest files of 64-3064 bytes), fscrypt v2 (locked) and unencrypted; "
            f"process CPU, best of {args.runs}"
        )
        for k, v in common.machine().items():
            print(f"- {k}: {v}")
        print()
        print("| code | tree | pass | entries | CPU s | us/entry |")
        print("|---|---|---|---|---|---|")
        for tree in args.tree:
            label = common.tree_label(tree)
            for top in ("enc", "plain"):
                for what in ("attrs", "xattrs"):
                    best = min(
                        (probe(tree, image, top, what, False) for _ in range(args.runs)),
                        key=lambda r: r["cpu"],
                    )
                    n, cpu = best["entries"], best["cpu"]
                    print(
                        f"| {label} | {top} | {what} | {n} | {cpu:.2f} | {cpu / n * 1e6:.1f} |",
                        flush=True,
                    )
                    if args.profile:
                        prof = probe(tree, image, top, what, True)["profile"]
                        print(f"<!-- {label} {top} {what}\n{prof}\n-->", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
