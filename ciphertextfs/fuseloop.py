"""pyfuse3's main loop, without an epoll round trip per request.

pyfuse3 waits for every request with `trio.lowlevel.wait_readable` on
/dev/fuse: trio registers the descriptor with epoll, parks the task, polls,
and unregisters it again, two epoll_ctl calls and a trip through the
scheduler for each request even while the kernel has the next one queued.
For a backup that sends millions of small requests (getxattr, listxattr)
one after another, that is the largest part of what each costs.

pyfuse3 looks its event loop up as the module attribute `pyfuse3.trio`
(`pyfuse3.asyncio.enable()` replaces it the same way).  `enable()` puts
there a stand-in that is trio in every respect but one: `wait_readable`
first asks poll(2), without waiting, whether a request is already queued,
and if so only passes a checkpoint (so cancellation, signals and the other
tasks still get their turn) instead of parking on epoll.  Nothing else of
the loop changes.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class _Lowlevel(types.SimpleNamespace):
    """trio.lowlevel, with a wait_readable that does not wait for what is there."""

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    @staticmethod
    async def wait_readable(fd: Any) -> None:
        if _queued(fd):
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_readable(fd)


def _queued(fd: Any) -> bool:
    """Whether `fd` can be read now (poll(2) with no timeout; one poller per descriptor)."""
    poller = _pollers.get(fd)
    if poller is None:
        poller = _pollers[fd] = select.poll()
        poller.register(fd, _POLLIN)
    return bool(poller.poll(0))


_pollers: dict[Any, Any] = {}


class _Trio(types.ModuleType):
    """The trio module as pyfuse3 sees it."""

    def __init__(self) -> None:
        super().__init__("ciphertextfs.fuseloop.trio")
        self.lowlevel = _Lowlevel()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def enable() -> None:
    """Make pyfuse3's loop skip the epoll wait when a request is already queued."""
    pyfuse3.trio = _Trio()  # type: ignore[attr-defined]
