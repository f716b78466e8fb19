"""What a restore tells its user: problems, the keys it lacked, progress, a summary.

Nothing is dropped silently: every entry that is not restored is either
named on its own line or, when the cause is a missing key, counted under
that key's single line (one line per key rather than thousands).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from ciphertextfs import EXIT_OK, EXIT_PARTIAL, EXIT_SIGNAL_BASE, PROG

from .backup import Path_, show_path

__all__ = ["Report"]


@dataclass
class _MissingKey:
    count: int = 0
    example: Path_ = ()


@dataclass
class Report:
    """Counters and messages of one restore or verify run.

    `progress` draws a status line on `stream` (only sensible on a
    terminal), at most `interval` seconds apart.
    """

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    progress: bool = False
    interval: float = 0.25
    restored: int = 0
    failed: int = 0
    damaged: int = 0
    bytes_done: int = 0
    problems: list[tuple[Path_, str]] = field(default_factory=list)
    missing_keys: dict[str, _MissingKey] = field(default_factory=dict)
    signum: int | None = None
    missing_hint: str = (
        "run 'ciphertextfs keys SOURCE' to see which fscrypt passphrase, login passphrase or "
        "protector key file opens each key above"
    )
    _start: float = field(default_factory=time.monotonic)
    _last_draw: float = 0.0
    _drawn: bool = False

    def _print(self, line: str) -> None:
        self._clear()
        print(line, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        self._print(f"{PROG}: {text}")

    def problem(self, path: Path_, reason: str, below: int = 0) -> None:
        """An entry (and `below` entries under it) not restored for `reason`."""
        self.failed += 1 + below
        self.problems.append((path, reason))
        tail = f" (and {below} entr{'y' if below == 1 else 'ies'} below it)" if below else ""
        self._print(f"{PROG}: not restored: {show_path(path)}: {reason}{tail}")

    def damage(self, text: str) -> None:
        """A region of the archive lost: entries there are gone unnamed."""
        self.damaged += 1
        self._print(f"{PROG}: damaged archive: {text}")

    def missing_key(self, label: str, path: Path_, below: int = 0) -> None:
        """An entry (and `below` under it) that needs a key nobody gave."""
        self.failed += 1 + below
        m = self.missing_keys.get(label)
        if m is None:
            m = self.missing_keys[label] = _MissingKey(example=path)
        m.count += 1 + below

    def done(self, nbytes: int = 0) -> None:
        self.restored += 1
        self.bytes_done += nbytes
        self.tick()

    def add_bytes(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        self.tick()

    def tick(self) -> None:
        if not self.progress or self.quiet:
            return
        now = time.monotonic()
        if now - self._last_draw < self.interval:
            return
        self._last_draw = now
        elapsed = max(now - self._start, 1e-6)
        rate = self.bytes_done / elapsed / 2**20
        self.stream.write(
            f"\r{self.restored} entries, {_human(self.bytes_done)}, {rate:.1f} MiB/s"
            + (f", {self.failed} not restored" if self.failed else "")
            + "\x1b[K"
        )
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def left_out(self, counts: Mapping[str, int], dest_owner: int | None) -> None:
        """Privilege-granting attributes left out by choice (or by the default)."""
        if not counts:
            return
        what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        why = f" (DEST is owned by uid {dest_owner})" if dest_owner not in (None, 0) else ""
        self.note(
            f"left out{why}: {what}; see --same-owner, --setid, --devices, --privileged-xattrs"
        )

    def interrupted(self, signum: int) -> None:
        """The run was stopped by a signal: what follows the summary was never read."""
        self.signum = signum
        self.note(
            f"interrupted by {signal.Signals(signum).name}: the rest of the backup was "
            "not read and is not restored"
        )

    def finish(self, *, verify: bool, unused_keys: list[str] = ()) -> int:
        """Print the per-key lines and the summary; return the exit status."""
        for label, m in sorted(self.missing_keys.items()):
            n = m.count
            self._print(
                f"{PROG}: missing key: {label}: {n} entr{'y' if n == 1 else 'ies'} "
                f"not restored (e.g. {show_path(m.example)})"
            )
        if self.missing_keys and self.missing_hint:
            self.note(self.missing_hint)
        for text in unused_keys:
            self.note(text)
        self._clear()
        if not self.quiet:
            elapsed = max(time.monotonic() - self._start, 1e-6)
            word = "restorable" if verify else "restored"
            print(
                f"{PROG} decrypt{' --verify' if verify else ''}: {self.restored} entries "
                f"{word} ({_human(self.bytes_done)}, {elapsed:.1f} s), "
                f"{self.failed} not {word}"
                + (
                    f", {self.damaged} damaged region{'s' if self.damaged > 1 else ''} "
                    "of the archive"
                    if self.damaged
                    else ""
                )
                + (", the rest not read (interrupted)" if self.signum is not None else ""),
                file=self.stream,
                flush=True,
            )
        if self.signum is not None:
            return EXIT_SIGNAL_BASE + self.signum
        return EXIT_PARTIAL if self.failed or self.damaged else EXIT_OK


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
