"""Waiting for a socket against a deadline: ``poll`` where it exists, ``select`` otherwise.

Used by the blocking `Channel` and by `Listener`; the asyncio channel waits
on its event loop instead.  Deadlines are `time.monotonic` values covering a
whole call, so a call that waits several times still ends on time.
"""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Sequence

__all__ = ["ready_among", "wait_ready"]

_HAVE_POLL = hasattr(select, "poll")


def wait_ready(fds: Sequence[int], *, write: bool = False, deadline: float | None = None) -> bool:
    """Wait until one of *fds* is readable (or writable, with *write*).

    An error or hang-up on an fd counts as ready: the next call on it says
    what happened.  Returns False if *deadline* passed first (at once when it
    already has), True otherwise.
    """
    while True:
        if deadline is None:
            timeout = None
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
        if sys.platform != "win32" and _HAVE_POLL:
            ready = _poll(fds, write, timeout)
        else:
            ready = _select(fds, write, timeout)
        # select() may wake a clock tick early (15.6 ms on Windows): look again.
        if ready or deadline is None:
            return ready


def ready_among(fds: Sequence[int], timeout: float | None) -> list[int]:
    """The fds of *fds* that are readable (or in error, or hung up) within *timeout* seconds.

    ``select.select`` refuses fd numbers from 1024 on (``FD_SETSIZE``), which
    a busy server reaches: poll where it exists.  Returns ``[]`` when the
    time passed first.
    """
    if sys.platform == "win32" or not _HAVE_POLL:
        ready: list[int] = select.select(list(fds), [], [], timeout)[0]
        return ready
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _events in poller.poll(ms)]


if sys.platform != "win32":

    def _poll(fds: Sequence[int], write: bool, timeout: float | None) -> bool:
        poller = select.poll()
        events = select.POLLOUT if write else select.POLLIN
        for fd in fds:
            poller.register(fd, events)
        # Milliseconds rounded up, so a wait never returns before its deadline.
        return bool(poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 0.999))))


def _select(fds: Sequence[int], write: bool, timeout: float | None) -> bool:
    # Windows: select() only, on sockets only; errors show as "exceptional".
    rlist: list[int] = [] if write else list(fds)
    wlist: list[int] = list(fds) if write else []
    return any(select.select(rlist, wlist, list(fds), timeout))
