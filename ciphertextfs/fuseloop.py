"""pyfuse3's main loop, without an epoll wait or a task switch per request.

pyfuse3 answers requests with a pool of trio tasks.  Each takes a lock
(the "read turn"), waits with `trio.lowlevel.wait_readable` until
/dev/fuse has a request, gives the turn up, reads the request and runs its
handler.  For a backup that sends millions of small requests one after
another (rsync's listxattr and getxattr), the loop around the handler
costs more than the handler:

* trio's lock hands the turn to the next waiting task on release, so with
  two tasks in the pool every request is a task switch, even when no
  handler ever waits;
* every wait registers /dev/fuse with epoll, parks the task, polls and
  unregisters it again, although a sequential reader such as rsync sends
  its next request a few microseconds after the reply;
* the kernel then has to wake a sleeping thread for each request.

pyfuse3 looks its event loop up as the module attribute `pyfuse3.trio`
(`pyfuse3.asyncio.enable()` replaces it the same way).  `enable()` puts
there a stand-in that is trio in every respect but two:

* `Lock()` makes a `_ReadTurn`, which the task holding it keeps until its
  handler is about to wait (`hand_over()`, called by the adapter before a
  read goes to a worker thread): only then is a waiting task woken to
  take the next request;
* `lowlevel.wait_readable` first asks poll(2), without waiting, whether a
  request is queued, and keeps asking for `SPIN` seconds before it parks
  on epoll.  A queued request is taken without a trip through trio's
  scheduler, except every `YIELD_EVERY` requests, so cancellation,
  signals, a live source's change watcher and finished worker threads
  still get their turn.

A handler that waits without `hand_over()` still works: the other
requests wait for it, as with a pool of one task.  When /dev/fuse reports
an error (the filesystem was unmounted or the connection aborted) or the
wait fails (pyfuse3.terminate, cancellation), every waiting task is
released so that each can see the session end and finish.
"""

from __future__ import annotations

import select
import time
import types
from typing import Any

import pyfuse3
import trio

SPIN = 10e-6
"""Seconds to keep polling /dev/fuse after a reply before parking on epoll:
longer than a sequential reader takes to send its next request."""

YIELD_EVERY = 16
"""Queued requests taken in a row before the loop passes trio a checkpoint."""

_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Session:
    """What the stand-in knows of one FUSE session: made anew by each `enable()`."""

    def __init__(self) -> None:
        self.closing = False
        self.turn: _ReadTurn | None = None
        self.in_a_row = 0
        self._pollers: dict[Any, Any] = {}

    def ready(self, fd: Any) -> int:
        """The poll(2) events of `fd` now, without waiting (0: nothing queued)."""
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, _POLLIN)
        events = poller.poll(0)
        if not events:
            return 0
        if events[0][1] & _GONE:
            self.closing = True
        return events[0][1]

    async def wait_readable(self, fd: Any) -> None:
        if not self.ready(fd):
            deadline = time.perf_counter() + SPIN
            while not self.ready(fd):
                if time.perf_counter() >= deadline:
                    self.in_a_row = 0
                    await trio.lowlevel.wait_readable(fd)
                    self.ready(fd)  # for what it says of the session's end
                    return
        self.in_a_row += 1
        if self.in_a_row >= YIELD_EVERY:
            self.in_a_row = 0
            await trio.lowlevel.checkpoint()

    def make_turn(self) -> _ReadTurn:
        self.turn = _ReadTurn(self)
        return self.turn


class _ReadTurn:
    """pyfuse3's read lock, kept by the task that has it until its handler waits.

    Used by pyfuse3 only as `async with`; held only around the wait for a
    request, never while a handler runs.  A task that finds it held parks
    until `hand_over()` (or the session's end) wakes it; one woken task at
    a time, which parks again if the holder took the turn back first.
    """

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._holder: Any = None
        self._waiting = trio.lowlevel.ParkingLot()
        self._woken = False

    async def __aenter__(self) -> None:
        while self._holder is not None and not self._session.closing:
            try:
                await self._waiting.park()
            finally:
                self._woken = False
        self._holder = trio.lowlevel.current_task()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._holder = None
        if exc_type is not None:
            self._session.closing = True
        if self._session.closing:
            self._waiting.unpark_all()

    def hand_over(self) -> None:
        """Wake a waiting task to take the next request: this one is about to wait."""
        if self._waiting and not self._woken:
            self._woken = True
            self._waiting.unpark(count=1)


class _Lowlevel(types.SimpleNamespace):
    """trio.lowlevel, with the session's wait_readable."""

    def __init__(self, session: _Session) -> None:
        super().__init__(wait_readable=session.wait_readable)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _Trio(types.ModuleType):
    """The trio module as pyfuse3 sees it."""

    def __init__(self, session: _Session) -> None:
        super().__init__("ciphertextfs.fuseloop.trio")
        self.lowlevel = _Lowlevel(session)
        self.Lock = session.make_turn

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


_session: _Session | None = None


def enable() -> None:
    """Put the stand-in in place for the session `pyfuse3.init` just opened."""
    global _session
    _session = _Session()
    pyfuse3.trio = _Trio(_session)  # type: ignore[attr-defined]


def hand_over() -> None:
    """Let another task take the requests while the caller's handler waits.

    For handlers that are about to await something slow (a worker thread);
    a no-op before pyfuse3 has made its read lock.
    """
    if _session is not None and _session.turn is not None:
        _session.turn.hand_over()
