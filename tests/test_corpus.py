"""Hostile input: walk every e2fsprogs test image with the ext4 reader.

Each image is walked in its own subprocess with a memory limit and a
timeout, so a crash, a hang or runaway memory in the reader is caught and
named per image.  The only acceptable errors are CorruptError (one damaged
object) and NotExt4Error (not an ext2/3/4 image at all).
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "e2fsprogs"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus/e2fsprogs")
IMAGES = sorted(p.name for p in CORPUS.glob("*.img.gz")) if CORPUS.is_dir() else []

MEMORY_LIMIT = 1 << 30  # address space per worker
# A hang is a loop that keeps the CPU busy: counted in the walker's own CPU
# seconds, so that a loaded machine does not turn a slow walk into a "hang".
# The wall-clock timeout only catches a walker stuck without using the CPU.
WALK_DEADLINE = 60.0  # CPU seconds of walking per image before it counts as a hang
PROCESS_TIMEOUT = 600.0
FILE_CAP = 64 << 20
TOTAL_CAP = 512 << 20
READ_CHUNK = 8 << 20
WORKERS = min(3, os.cpu_count() or 1)


class Hang(Exception):
    """The walk of one image used more than WALK_DEADLINE seconds of CPU."""


def walk(image: str) -> dict[str, object]:
    """Walk everything reachable from the root; return counters.

    Any exception other than the ext4 layer's own propagates.
    """
    from ciphertextfs.ext4.errors import CorruptError, NotExt4Error
    from ciphertextfs.ext4.fs import Filesystem

    deadline = time.process_time() + WALK_DEADLINE
    stats = {"dirs": 0, "files": 0, "symlinks": 0, "corrupt": 0, "bytes": 0, "warnings": 0}
    try:
        fs = Filesystem.open(image)
    except NotExt4Error as e:
        return {"outcome": "not-ext4", "reason": str(e)}
    with fs:
        seen: set[int] = set()
        queue: deque[int] = deque([2])
        total = 0

        def check_time() -> None:
            if time.process_time() > deadline:
                raise Hang(f"walk still running after {WALK_DEADLINE} CPU s: {stats}")

        while queue:
            check_time()
            ino_nr = queue.popleft()
            if ino_nr in seen:
                continue
            seen.add(ino_nr)
            try:
                inode = fs.inode(ino_nr)
                fs.xattrs(inode)
                fs.mappings(inode)
                if inode.is_dir:
                    stats["dirs"] += 1
                    fs.is_dx_dir(inode)
                    for entry in fs.read_dir(inode):
                        assert isinstance(entry.name, bytes) and entry.name
                        queue.append(entry.inode)
                elif inode.is_symlink:
                    stats["symlinks"] += 1
                    body = fs.symlink_body(inode)
                    assert len(body) == inode.i_size
                elif inode.is_reg:
                    stats["files"] += 1
                    want = min(inode.i_size, FILE_CAP, max(TOTAL_CAP - total, 0))
                    off = 0
                    while off < want:
                        check_time()
                        n = min(READ_CHUNK, want - off)
                        data = fs.read(inode, off, n)
                        assert len(data) == n
                        off += n
                    total += want
            except CorruptError:
                stats["corrupt"] += 1
        stats["bytes"] = total
        stats["warnings"] = len(fs.warnings)
        stats.update(walk_view(fs, deadline))
    return {"outcome": "walked", **stats}


def walk_view(fs, deadline: float) -> dict[str, int]:
    """Walk the same image through the view model, as the FUSE adapter would.

    The view adds its own parsing on top of the reader (fscrypt contexts,
    no-key names and their hashes, ACL conversion, symlink targets); the
    only acceptable errors are those the adapter turns into EIO, ENOENT
    and ENODATA.
    """
    import stat

    from ciphertextfs.ext4.errors import CorruptError
    from ciphertextfs.fscrypt.errors import FscryptError
    from ciphertextfs.view.model import View, ViewNoAttr, ViewNotFound
    from ciphertextfs.view.readahead import SMALL_FILE

    view = View(fs)
    stats = {"view_entries": 0, "view_eio": 0}
    seen: set[int] = set()
    queue: deque[int] = deque([view.root_ino])
    budget = TOTAL_CAP
    while queue:
        if time.process_time() > deadline:
            raise Hang(f"view walk still running after {WALK_DEADLINE} CPU s: {stats}")
        ino = queue.popleft()
        if ino in seen:
            continue
        seen.add(ino)
        stats["view_entries"] += 1
        try:
            attr = view.attr(ino)
            for name in view.xattr_names(ino):
                assert isinstance(view.xattr(ino, name), bytes)
            if stat.S_ISDIR(attr.st_mode):
                for entry in view.entries(ino):
                    assert view.lookup(ino, entry.name) == entry.ino
                    queue.append(entry.ino)
            elif stat.S_ISLNK(attr.st_mode):
                assert len(view.readlink(ino)) == attr.st_size
            elif stat.S_ISREG(attr.st_mode):
                want = min(attr.st_size, FILE_CAP, budget)
                if 0 < want == attr.st_size <= SMALL_FILE:
                    # Read ahead with its directory: must equal a read of its own.
                    whole = view.read(ino, 0, want)
                    try:
                        alone = fs.read(fs.inode(ino), 0, want)
                    except CorruptError:
                        alone = None
                    assert alone is None or whole == alone, ino
                for off in range(0, want, READ_CHUNK):
                    n = min(READ_CHUNK, want - off)
                    assert len(view.read(ino, off, n)) == n
                budget -= want
        except (CorruptError, FscryptError, ViewNotFound, ViewNoAttr):
            stats["view_eio"] += 1
    return stats


def _worker(path: str) -> None:
    """Subprocess entry: limit memory, gunzip if needed, walk, print one JSON line."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    if not path.endswith(".gz"):
        print(json.dumps(walk(path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "image")
        with gzip.open(path, "rb") as src, open(image, "wb") as dst:
            shutil.copyfileobj(src, dst)
        result = walk(image)
    print(json.dumps(result))


def _run_one(name: str) -> dict[str, object]:
    return run_walker(CORPUS / name)


def run_walker(image: Path) -> dict[str, object]:
    """Walk one image (plain or .gz) in a subprocess with memory and time limits."""
    cmd = [sys.executable, "-m", "tests.test_corpus", str(image)]
    root = Path(__file__).resolve().parents[1]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=PROCESS_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout"}
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        return {"outcome": "crash", "rc": proc.returncode, "stderr": proc.stderr[-4000:]}
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"outcome": "crash", "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}
    result["elapsed"] = round(elapsed, 2)
    return result


@pytest.fixture(scope="module")
def corpus_results() -> dict[str, dict[str, object]]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(IMAGES, pool.map(_run_one, IMAGES), strict=True))


def test_corpus_present() -> None:
    assert len(IMAGES) > 200, f"e2fsprogs corpus missing or incomplete at {CORPUS}"


@pytest.mark.parametrize("name", IMAGES)
def test_image(name: str, corpus_results: dict[str, dict[str, object]]) -> None:
    result = corpus_results[name]
    assert result["outcome"] in ("walked", "not-ext4"), json.dumps(result, indent=1)


def test_most_images_are_walked(corpus_results: dict[str, dict[str, object]]) -> None:
    """The reader must not give up on whole images that are plainly ext2/3/4."""
    walked = [n for n, r in corpus_results.items() if r["outcome"] == "walked"]
    files = sum(int(r.get("files", 0)) for r in corpus_results.values())
    assert len(walked) >= 0.9 * len(IMAGES), sorted(set(IMAGES) - set(walked))
    assert files > 500
    assert sum(int(r.get("view_entries", 0)) for r in corpus_results.values()) > 1000


if __name__ == "__main__":
    _worker(sys.argv[1])
