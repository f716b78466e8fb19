"""How fast `ciphertextfs restore-image` rebuilds a filesystem from a backup.

Builds two backups in the view format on the host filesystem (no kernel
encryption needed: restore-image copies ciphertext as it is): N MiB of
4 MiB encrypted files, and M small encrypted files (1 to 8 KiB) under
no-key names, each with its user.fscrypt.* xattrs.  Next to each it
writes the same bytes as plain files under plain names.  Then times, from
a cold page cache and including the final sync:

  * `restore-image` of each backup (tree, tar archive, the archive piped on
    standard input) into a new image,
  * `mke2fs -d` of the plain copy into an image of the same size: the
    e2fsprogs baseline for writing the same amount of data.

Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_restore_image --mib 1024 --small 20000
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import MIB
from ciphertextfs.fscrypt.nokey import nokey_name
from ciphertextfs.fscrypt.policy import build_context
from ciphertextfs.viewformat import encode_dir_xattrs, encode_inode_xattrs
from tests import harness, harness_view

LARGE = 4 * MIB


def _set(path: Path, xattrs: dict[bytes, bytes]) -> None:
    for k, v in xattrs.items():
        os.setxattr(path, k, v)


def build(work: Path, name: str, sizes: list[int]) -> tuple[Path, Path]:
    """A view-format backup of encrypted files of `sizes`, and a plain copy."""
    view, plain = work / f"{name}-view", work / f"{name}-plain"
    enc = view / "enc"
    enc.mkdir(parents=True)
    (plain / "enc").mkdir(parents=True)
    ctx = build_context(2, bytes(16), os.urandom(16)).to_bytes()
    _set(enc, encode_inode_xattrs(ctx) | encode_dir_xattrs(4096))
    for i, size in enumerate(sizes):
        data = common.file_data(i, size)
        ct = os.urandom(32)
        p = enc / nokey_name(ct)
        p.write_bytes(data)
        file_ctx = build_context(2, bytes(16), os.urandom(16)).to_bytes()
        _set(p, encode_inode_xattrs(file_ctx, size=size))
        (plain / "enc" / f"f{i:06d}").write_bytes(data)
    return view, plain


def timed_cold(argv: list[str]) -> float:
    harness.drop_caches()
    t0 = time.perf_counter()
    common.timed(argv)
    os.sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=1024, help="MiB of 4 MiB files (default 1024)")
    p.add_argument("--small", type=int, default=20000, help="small files (default 20000)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ctfs-bench-rimage"))
    common.add_common_arguments(p)
    args = p.parse_args(argv)

    printed = common.Report()
    out, log = printed.out, printed.log
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cli = [*harness_view.CLI, "restore-image", "-q"]
    sets = {
        "large": [LARGE] * (args.mib * MIB // LARGE),
        "small": [1024 + (i * 7919) % 7168 for i in range(args.small)],
    }
    samples: dict[str, list[float]] = {}
    volume: dict[str, int] = {}
    try:
        for name, sizes in sets.items():
            view, plain = build(work, name, sizes)
            tar = work / f"{name}.tar"
            harness.run("tar", "--xattrs", "--xattrs-include=*", "-cf", tar, "-C", view, ".")
            volume[name] = sum(sizes)
            log(f"built {name}: {len(sizes)} files, {sum(sizes) // MIB} MiB")
            img = work / "out.img"
            for _r in range(args.runs):
                for label, src in (("tree", view), ("tar archive", tar), ("tar on stdin", tar)):
                    img.unlink(missing_ok=True)
                    restore = [*map(os.fspath, cli), os.fspath(src), os.fspath(img)]
                    if label == "tar on stdin":
                        # A pipe: restore-image copies it to $TMPDIR first.
                        restore[-2] = "-"
                        restore = ["sh", "-c", f'cat "$0" | {shlex.join(restore)}', os.fspath(tar)]
                    s = timed_cold(restore)
                    samples.setdefault(f"restore-image {name} ({label})", []).append(s)
                size = img.stat().st_size
                img.unlink()
                s = timed_cold(
                    ["mke2fs", "-q", "-F", "-t", "ext4", "-d", os.fspath(plain), os.fspath(img),
                     f"{size // 1024}k"]
                )  # fmt: skip
                samples.setdefault(f"mke2fs -d {name} (plain, baseline)", []).append(s)
                img.unlink()
            shutil.rmtree(view)
            shutil.rmtree(plain)
            tar.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out(f"## bench_restore_image ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    out("")
    for k, v in common.machine().items():
        out(f"- {k}: {v}")
    out(
        f"- configuration: {len(sets['large'])} x 4 MiB files; {args.small} files of "
        "1-8 KiB; 4 KiB blocks; backups and images on the host filesystem"
    )
    out("")
    out(f"Median of {args.runs} run(s), cold page cache, including the final sync:")
    out("")
    rows = []
    for name, secs in samples.items():
        kind = "large" if " large " in name else "small"
        n = len(sets[kind])
        sec = common.median(secs)
        rows.append([name, f"{n}", f"{volume[kind] // MIB} MiB", f"{sec:.2f}",
                     f"{volume[kind] / sec / 1e6:.0f}", f"{n / sec:.0f}"])  # fmt: skip
    common.print_table(
        ["operation", "files", "bytes", "seconds", "MB/s", "files/s"], rows, out, text_columns=1
    )
    printed.save(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
