"""Where the serving process's warnings go, and how many of them.

In the foreground (`-f`) they go to stderr, with `--log FILE` to that file,
otherwise to syslog (the journal on systemd machines) under the name
`ciphertextfs`, facility daemon.  A machine without a syslog socket
(/dev/log) gets the warnings and errors in the kernel log (/dev/kmsg, which
dmesg shows and journald also reads) when the daemon may write there (root);
otherwise they are discarded.

A badly damaged disk must not flood the log: a message repeated word for
word is logged once (one line per damaged object, however often a backup
touches it), and at most `BURST` warnings per `INTERVAL` seconds are logged,
followed by one line counting those suppressed.  Informational lines (the
summary at unmount) are not limited.

The environment variable CIPHERTEXTFS_SYSLOG_SOCKET replaces /dev/log, so
that tests can listen on a socket of their own.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import time

from ciphertextfs import PROG
from ciphertextfs.commands import CommandError

SYSLOG_SOCKET = "/dev/log"
KMSG = "/dev/kmsg"

#: At most BURST warnings or errors per INTERVAL seconds reach the log.
BURST = 20
INTERVAL = 60.0

#: Distinct messages remembered to drop repetitions; beyond that, repetitions
#: are only rate-limited.
REMEMBERED = 100_000

SYSLOG_FORMAT = f"{PROG}[%(process)d]: %(message)s"
FILE_FORMAT = f"%(asctime)s {PROG}[%(process)d]: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Every record on one line: a name read from a damaged disk may hold newlines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r", "\\r").replace("\n", "\\n")


class Limiter(logging.Handler):
    """Passes records to `target`, dropping repetitions and bursts of warnings."""

    def __init__(
        self,
        target: logging.Handler,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock=time.monotonic,
    ) -> None:
        super().__init__(logging.NOTSET)
        self.target = target
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.window_start = clock()
        self.in_window = 0
        self.suppressed = 0
        self.repeated = 0
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            self.target.handle(record)
            return
        text = record.getMessage()
        if text in self.seen:
            self.repeated += 1
            return
        if len(self.seen) < REMEMBERED:
            self.seen.add(text)
        now = self.clock()
        if now - self.window_start >= self.interval:
            self.report_suppressed()
            self.window_start = now
            self.in_window = 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        self.target.handle(record)

    def report_suppressed(self) -> None:
        if self.suppressed:
            record = logging.LogRecord(
                "ciphertextfs",
                logging.WARNING,
                __file__,
                0,
                "%d more warnings suppressed (at most %d per %g s are logged)",
                (self.suppressed, self.burst, self.interval),
                None,
            )
            self.target.handle(record)
            self.suppressed = 0

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        self.report_suppressed()
        self.target.close()
        super().close()


class SyslogSocketHandler(logging.handlers.SysLogHandler):
    """SysLogHandler whose sends never block the daemon.

    A datagram to a syslog daemon that does not keep up (its queue holds
    net.unix.max_dgram_qlen datagrams) would block the event loop, and with
    it every FUSE request: such a message is dropped and counted instead.
    """

    dropped = 0

    def _connect_unixsocket(self, address: str) -> None:
        super()._connect_unixsocket(address)
        self.socket.setblocking(False)

    def handleError(self, record: logging.LogRecord) -> None:
        self.dropped += 1


class KmsgHandler(logging.Handler):
    """One write per record to /dev/kmsg, with the syslog priority prefix."""

    def __init__(self, fd: int) -> None:
        super().__init__(logging.WARNING)
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = logging.handlers.SysLogHandler.LOG_DAEMON << 3
            priority |= 3 if record.levelno >= logging.ERROR else 4
            line = f"<{priority}>{self.format(record)}"
            os.write(self.fd, line.encode("utf-8", "replace")[:1000])
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def syslog_listening(address: str) -> bool:
    """Whether a syslog daemon answers at `address` (SysLogHandler ignores a missing one)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(address)
            except OSError:
                continue
            return True
    return False


def syslog_handler() -> logging.Handler:
    """syslog through /dev/log; else the kernel log; else nothing."""
    address = os.environ.get("CIPHERTEXTFS_SYSLOG_SOCKET", SYSLOG_SOCKET)
    handler: logging.Handler
    if syslog_listening(address):
        handler = SyslogSocketHandler(address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    else:
        try:
            fd = os.open(KMSG, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return logging.NullHandler()
        handler = KmsgHandler(fd)
    handler.setFormatter(OneLineFormatter(SYSLOG_FORMAT))
    return handler


def configure(log: logging.Logger, foreground: bool, debug: bool, log_file: str | None) -> None:
    """Send `log`'s records where the mode says; debug traces everything, unlimited."""
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if foreground or debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter(FILE_FORMAT))
    elif log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as e:
            raise CommandError(f"{log_file}: {e.strerror}") from None
        handler.setFormatter(OneLineFormatter(FILE_FORMAT))
    else:
        handler = syslog_handler()
    if not debug:
        handler = Limiter(handler)
    log.addHandler(handler)


def finish(log: logging.Logger) -> None:
    """Write what the limiters still hold (the count of suppressed lines)."""
    for handler in log.handlers:
        if isinstance(handler, Limiter):
            handler.report_suppressed()
        handler.flush()
