"""Small fd helpers shared by the channel and the transports.

On Windows a process has two kinds of number for what it holds: CRT file
descriptors (small ints the C runtime hands out) and Winsock SOCKET values
(handle values).  The two are numbered independently, so the same int can
name one of each; fdchannel marks every SOCKET it knows to be one as a
`SocketHandle`, and closes each kind its own way.  On POSIX a socket is an
fd like any other and `SocketHandle` never appears.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, cast

__all__ = ["SocketHandle", "close_all", "close_fd"]


class SocketHandle(int):
    """A Windows SOCKET value, told apart from a CRT fd that has the same number.

    An `int`, so it goes wherever an fd number does; `close_fd` closes it
    with ``closesocket``, never ``os.close``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"SocketHandle({int(self)})"


_ws2: Any = None


def _close_socket(sock: int) -> None:
    """``closesocket``: Python cannot wrap every SOCKET in a socket object to close it."""
    global _ws2
    if sys.platform != "win32":  # pragma: no cover - never built elsewhere
        raise OSError(f"SocketHandle({sock}) outside Windows")
    import ctypes

    if _ws2 is None:
        _ws2 = ctypes.WinDLL("ws2_32", use_last_error=True)
    if _ws2.closesocket(ctypes.c_size_t(sock)) != 0:
        raise ctypes.WinError(ctypes.get_last_error(), "closesocket")


def close_fd(fd: int) -> None:
    """Close *fd*: an fd with ``os.close``, a `SocketHandle` with ``closesocket``."""
    if fd.__class__ is SocketHandle:
        _close_socket(fd)
    else:
        os.close(fd)


def close_listed(fds: list[Any], empty: bool = True) -> OSError | None:
    """Close every fd of *fds*, each slot struck (-1) just before its close, then empty it; the first error.

    No point where a signal handler (or another thread) runs lies between a
    strike and its close: cut short anywhere, each number is either still
    listed or closed, never both, so whoever closes what the list holds (a
    queued frame's list, a message's numbers) closes nothing twice.  With
    *empty* false the struck list is left as it is (its length unchanged,
    for whoever walks it by index meanwhile).  Errors (``EBADF`` and the
    like) do not stop it: the first is returned.
    """
    first: OSError | None = None
    i = 0
    while i < len(fds):
        n = fds[i]
        if n.__class__ is not int or n >= 0:  # -1: closed, moved, or taken out (`adopt_all`)
            fds[i] = -1
            try:
                if n.__class__ is int:
                    os.close(n)  # not close_fd(): its first instruction would be such a point
                else:  # a Windows SOCKET
                    close_fd(n)
            except OSError as exc:
                first = first or exc
        i += 1
    if empty:
        del fds[:]
    return first


#: Lists that a close loop (`close_listed`) is going through in some thread
#: and that no object owns any more (a finalizer's), by the object they were
#: taken from.  A close can block, and a fork in another thread meanwhile
#: copies the fds not yet closed into a child where nothing would ever close
#: them: the child closes what is still listed (each is struck just before
#: its close, so the one being closed as the fork came is not; it may have
#: left the fd table).
closing: dict[object, list[Any]] = {}


def _close_pending_in_child() -> None:
    for fds in list(closing.values()):
        close_listed(fds, empty=False)
    closing.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_pending_in_child)


def close_all(fds: Iterable[int]) -> None:
    """Close every fd in *fds* (`close_fd`), ignoring ones already gone (EBADF) and negative ones.

    A list or tuple is walked by index, which allocates nothing (for fewer
    than 257 fds): error paths call this, maybe out of memory.
    """
    if fds.__class__ is list or fds.__class__ is tuple:
        seq = cast("list[int]", fds)
        i = 0
        while i < len(seq):
            try:
                close_fd(seq[i])
            except OSError:
                pass
            i += 1
        return
    for fd in fds:
        try:
            close_fd(fd)
        except OSError:
            pass
