"""Serve a view whose large reads wait at a gate: python -m tests.gated_view IMAGE MOUNTPOINT GATE.

A device that stalls (a failing disk retrying, a busy SAN) is what makes
the adapter send large reads to worker threads: the loop must keep
answering everyone else meanwhile.  This stalls the view's own large reads
on purpose, from a test, over a real mount: each one creates GATE/reading
and waits until GATE/go exists (at most a minute, then EIO).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ciphertextfs.ext4.fs import Filesystem
from ciphertextfs.fuse import SMALL_READ, CiphertextOperations, fuse_options, serve
from ciphertextfs.view.model import View

GATE_TIMEOUT = 60.0


class GatedView(View):
    gate: Path

    def read(self, ino: int, off: int, size: int) -> bytes:
        if size > SMALL_READ:
            (self.gate / "reading").touch()
            deadline = time.monotonic() + GATE_TIMEOUT
            while not (self.gate / "go").exists():
                if time.monotonic() > deadline:
                    raise OSError("the gate never opened")
                time.sleep(0.01)
        return super().read(ino, off, size)


def main(image: str, mountpoint: str, gate: str) -> None:
    with Filesystem.open(image) as fs:
        view = GatedView(fs)
        view.gate = Path(gate)
        ops = CiphertextOperations(view)
        serve(ops, mountpoint, fuse_options(image), on_ready=lambda: (view.gate / "ready").touch())


if __name__ == "__main__":
    main(*sys.argv[1:4])
