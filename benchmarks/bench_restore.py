"""How fast `ciphertextfs decrypt` restores a backup of large files.

Writes N MiB of 4 MiB files through the kernel into an fscrypt v2
directory, locks it, backs the view up with tar (archive and extracted
tree), then times, from a cold page cache each time and including the final
sync of what was written:

  * `ciphertextfs decrypt` from the extracted tree and from the archive,
  * `ciphertextfs decrypt --verify` of both (decrypts, writes nothing),
  * `cp -a` of the extracted tree: the plain copy speed of this machine,

and the raw throughput of `decrypt_contents` (AES-256-XTS, 4 KiB data
units) on one core, against OpenSSL's AES-256-XTS over the same bytes as
one unit, the ceiling of the per-unit loop.

Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_restore --mib 1024
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchmarks import common
from benchmarks.bench_view import LARGE_FILE, write_file
from benchmarks.common import MIB
from ciphertextfs.fscrypt import kernel
from ciphertextfs.fscrypt.crypto import decrypt_contents
from ciphertextfs.fscrypt.keysetup import IV_RULE_INDEX, FileKey
from ciphertextfs.fscrypt.policy import FSCRYPT_MODE_AES_256_XTS
from tests import harness, harness_view, trees

TAR_XATTRS = ("--xattrs", "--xattrs-include=*")


def build_backup(work: Path, mib: int, threads: int, log) -> dict[str, float]:
    """Encrypted files through the kernel, then a tar of their view; build timings."""
    timings = {}
    image = work / "restore.img"
    harness.mkfs(image, size_mb=mib * 11 // 10 + 256, features=("encrypt",))
    mnt, vmnt = work / "mnt", work / "view"
    mnt.mkdir(exist_ok=True)
    count = mib * MIB // LARGE_FILE
    try:
        with common.loop_device(image) as dev:
            harness.run("mount", "-t", "ext4", dev, mnt)
            try:
                ident = kernel.add_key(mnt, trees.TEST_KEY_V2)
                try:
                    (mnt / "enc").mkdir()
                    kernel.set_policy_v2(mnt / "enc", ident)
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                        jobs = [
                            pool.submit(
                                write_file,
                                mnt / "enc" / f"f{i:05d}",
                                common.file_data(i, LARGE_FILE),
                            )
                            for i in range(count)
                        ]
                        for j in jobs:
                            j.result()
                    os.sync()
                    timings["kernel write (encrypting)"] = time.perf_counter() - t0
                finally:
                    os.sync()
                    with contextlib.suppress(OSError):
                        kernel.remove_key(mnt, ident, all_users=True)
            finally:
                harness.unmount(mnt)
            with harness_view.view_mount(dev, vmnt):
                t0 = time.perf_counter()
                harness.run("tar", *TAR_XATTRS, "-cf", work / "backup.tar", "-C", vmnt, "enc")
                timings["tar of the view"] = time.perf_counter() - t0
    finally:
        image.unlink(missing_ok=True)
    tree = work / "tree"
    tree.mkdir()
    harness.run("tar", *TAR_XATTRS, "-xf", work / "backup.tar", "-C", tree)
    (work / "key").write_bytes(trees.TEST_KEY_V2)
    log("built: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return timings


def timed_cold(argv: list[str], dest: Path | None) -> float:
    if dest is not None:
        shutil.rmtree(dest, ignore_errors=True)
    harness.drop_caches()
    t0 = time.perf_counter()
    common.timed(argv)
    os.sync()
    return time.perf_counter() - t0


def raw_decrypt(mib: int) -> tuple[float, float]:
    """(decrypt_contents, OpenSSL XTS ceiling) seconds for `mib` MiB on one core."""
    key = FileKey(
        bytes(range(64)),
        mode=FSCRYPT_MODE_AES_256_XTS,
        iv_rule=IV_RULE_INDEX,
        padding=32,
        data_unit_size=4096,
    )
    chunk = common.file_data(7, 4 * MIB)
    rounds = max(1, mib // 4)
    t0 = time.perf_counter()
    for r in range(rounds):
        decrypt_contents(key, chunk, r * 1024)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(rounds):
        d = Cipher(algorithms.AES(key.key), modes.XTS(bytes(16))).decryptor()
        d.update(chunk)
        d.finalize()
    return ours, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=int, default=1024, help="MiB of 4 MiB files (default 1024)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/ctfs-bench-restore"))
    p.add_argument("--keep", action="store_true", help="keep the backup and restored trees")
    common.add_common_arguments(p)
    args = p.parse_args(argv)
    harness.require_fuse()

    printed = common.Report()
    out, log = printed.out, printed.log

    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cli = list(harness_view.CLI)
    key = ["--key", os.fspath(work / "key"), "-q"]
    tree, tar = work / "tree", work / "backup.tar"
    nbytes = args.mib * MIB // LARGE_FILE * LARGE_FILE
    cases = [
        ("cp -a of the extracted tree (baseline)", ["cp", "-a", tree, work / "copy"], "copy"),
        ("decrypt tree -> dest", [*cli, "decrypt", *key, tree, work / "out1"], "out1"),
        ("decrypt archive -> dest", [*cli, "decrypt", *key, tar, work / "out2"], "out2"),
        ("decrypt --verify tree", [*cli, "decrypt", "--verify", *key, tree], None),
        ("decrypt --verify archive", [*cli, "decrypt", "--verify", *key, tar], None),
    ]
    samples: dict[str, list[float]] = {}
    with common.cleanup_on_signals():
        try:
            build = build_backup(work, args.mib, args.threads, log)
            for r in range(args.runs):
                for name, argv_, dest in cases:
                    d = work / dest if dest else None
                    s = timed_cold([os.fspath(a) for a in argv_], d)
                    samples.setdefault(name, []).append(s)
                    log(f"  run {r + 1} {name}: {s:.2f} s")
            ours, ceiling = raw_decrypt(256)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)

    out(f"## bench_restore ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    out("")
    for k, v in common.machine().items():
        out(f"- {k}: {v}")
    out(
        f"- configuration: {nbytes // LARGE_FILE} x 4 MiB files ({nbytes // MIB} MiB), "
        "fscrypt v2 AES-256-XTS, 4 KiB blocks; backup on the host filesystem"
    )
    out("- build: " + ", ".join(f"{k} {v:.1f} s" for k, v in build.items()))
    out("")
    out(f"Median of {args.runs} run(s), cold page cache, including the final sync:")
    out("")
    rows = []
    base = common.median(samples[cases[0][0]])
    for name, sec_list in samples.items():
        sec = common.median(sec_list)
        rows.append([name, f"{nbytes // MIB} MiB", f"{sec:.2f}", f"{nbytes / sec / 1e6:.0f}",
                     f"{sec / base:.2f}x"])  # fmt: skip
    common.print_table(
        ["operation", "bytes", "seconds", "MB/s", "vs cp"], rows, out, text_columns=1
    )
    out("")
    out("Raw contents decryption on one core (256 MiB, in 4 MiB calls):")
    out("")
    raw = 256 * MIB
    common.print_table(
        ["function", "seconds", "MB/s"],
        [
            ["decrypt_contents (per 4 KiB unit)", f"{ours:.2f}", f"{raw / ours / 1e6:.0f}"],
            [
                "OpenSSL XTS, one 4 MiB unit (ceiling)",
                f"{ceiling:.2f}",
                f"{raw / ceiling / 1e6:.0f}",
            ],
        ],  # fmt: skip
        out,
        text_columns=1,
    )
    printed.save(args.results)
    common.write_chart(
        args.chart,
        f"restore of {nbytes // MIB} MiB: seconds, median of {args.runs} cold-cache run(s)",
        {"restore": {name: common.median(s) for name, s in samples.items()}},
        "seconds (lower is better)",
    )
    return 0


if __name__ == "__main__":
    common.exit_with(main)
