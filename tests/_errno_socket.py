"""A socket double for errnos Linux cannot produce (macOS's and the BSDs' answers).

The only kernel double the project allows: it wraps a real socket, passes
every call through, and makes chosen ``sendmsg``/``recvmsg_into`` calls
fail with a chosen errno instead, the way another kernel would answer.
Everything else (the bytes, the fds, the waiting) is the real kernel's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


class ErrnoSocket:
    """Wrap *sock*; ``fail_send(call) -> errno | None`` and ``fail_recv`` choose the failing calls.

    ``call`` is the 1-based number of that method's call; a send counts
    only when it carries fds (the other kernels fail only those).
    """

    def __init__(
        self,
        sock: socket.socket,
        fail_send: Callable[[int], int | None] = lambda n: None,
        fail_recv: Callable[[int], int | None] = lambda n: None,
        connect_answer: int | None = None,
    ) -> None:
        self._sock = sock
        self._connect_answer = connect_answer
        self._fail_send = fail_send
        self._fail_recv = fail_recv
        self.sends_with_fds = 0
        self.recvs = 0
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendmsg(self, bufs: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        if ancdata:
            self.sends_with_fds += 1
            err = self._fail_send(self.sends_with_fds)
            if err is not None:
                self.failed += 1
                raise OSError(err, os.strerror(err))
        return self._sock.sendmsg(bufs, ancdata, flags)

    def connect_ex(self, address: Any) -> int:
        if self._connect_answer is not None:
            self.failed += 1
            return self._connect_answer
        return self._sock.connect_ex(address)

    def close(self) -> None:
        self._sock.close()

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> Any:
        self.recvs += 1
        err = self._fail_recv(self.recvs)
        if err is not None:
            self.failed += 1
            raise OSError(err, os.strerror(err))
        return self._sock.recvmsg_into(buffers, ancbufsize, flags)


def install(channel: Any, double: ErrnoSocket) -> None:
    """Make *channel* do its socket calls through *double* (same fd, same kernel socket).

    The branches such errnos reach are the Python path's (the platforms that
    produce them have no compiled path), and the compiled path calls the
    kernel itself: the channel takes the Python path from now on.
    """
    channel._sock = double
    channel._fast = None
