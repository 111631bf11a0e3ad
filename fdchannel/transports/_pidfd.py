"""`PidfdGetfd`: the receiver copies fds out of the sender (Linux >= 5.6).

The protocol is `._pull`'s; the system calls live in `._pidfd_linux`, which
only Linux imports.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import Final

from ._base import Session, Transport
from ._pull import HEAD

__all__ = ["DEFAULT_WINDOW", "PidfdGetfd"]

#: One fd reference on the wire: the sender's fd number.
_REF_SIZE: Final = struct.calcsize("<I")
#: The default `PidfdGetfd.window`: well below the usual soft RLIMIT_NOFILE
#: of 1024, so a peer that never acknowledges cannot exhaust a process's
#: fd table through one channel.
DEFAULT_WINDOW: Final = 256


def unavailable_reason() -> str | None:
    """Why `PidfdGetfd` cannot work in this process, or None if it can.

    Probes the kernel each time (a seccomp filter or a container can remove
    a system call the kernel has).
    """
    if sys.platform != "linux":
        return f"PidfdGetfd needs Linux >= 5.6; this is {sys.platform}"
    from . import _pidfd_linux

    return _pidfd_linux.unavailable_reason()


class PidfdGetfd(Transport):
    """The receiver copies each fd out of the sender with ``pidfd_getfd``.

    Works over any connected stream socket (TCP on loopback included) between
    processes of one Linux >= 5.6 machine.  The receiving process needs ptrace
    rights over the sender (same uid and not restricted by Yama, or
    ``CAP_SYS_PTRACE``); without them ``recv()`` raises `PermissionError` for
    that message, drops it, and the channel stays usable.  Received fds are
    close-on-exec.

    The receiver copies only from the process proven to hold the other end
    of this connection (the kernel's ``SO_PEERPIDFD`` for the AF_UNIX peer
    that connected, else the sender's own socket, pulled once and compared
    with this socket's peer); a frame naming any other process, this one
    included, raises `UnverifiedSender` and nothing is pulled.

    The sender keeps a private duplicate of each fd until the receiver
    acknowledges the message (acknowledgements ride back as control frames
    and are handled during later ``send``/``recv``/``close`` calls, waited
    for only when the window below is full).  If the sender closes its channel or exits before a
    message's fds were taken, ``recv()`` raises `FdsWithdrawn` for that
    message: a released fd number is never pulled (docs/transports.md).

    *window* bounds what a sender holds for its peer: at most that many
    unacknowledged duplicates per channel (a single message with more fds
    may still go when nothing is held).  A ``send()`` with fds that would
    exceed it waits for the peer's acknowledgements like a write waits for
    a full socket: within the channel's timeout, then `TimeoutError`
    (`BlockingIOError` when non-blocking) with ``characters_written`` 0, the
    message not taken and nothing held for it.  Messages without fds never
    wait.  All channels of the process together likewise hold at most half
    the soft ``RLIMIT_NOFILE`` (a channel holding nothing may always send
    one message).  `ValueError` if *window* is not positive.

    Construction of a channel raises `OSError` (``ENOSYS``) where the kernel
    or Python lacks the system calls.
    """

    wire_id = 1
    name = "PidfdGetfd"

    def __init__(self, *, window: int = DEFAULT_WINDOW) -> None:
        if window.__class__ is not int or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why this transport cannot work here, or None if it can.

        Returns:
            A sentence naming what is missing (the OS, the kernel version,
                the system call), or ``None``.
        """
        return unavailable_reason()

    def check_socket(self, sock: socket.socket) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise OSError(errno.ENOSYS, reason)

    def max_aux(self, max_fds: int) -> int:
        return HEAD.size + (max_fds + 1) * _REF_SIZE

    def session(self, sock: socket.socket) -> Session:
        if sys.platform == "linux":
            from ._pidfd_linux import PidfdSession

            return PidfdSession(sock, self.window)
        raise OSError(errno.ENOSYS, unavailable_reason())

    def __repr__(self) -> str:
        if self.window == DEFAULT_WINDOW:
            return "PidfdGetfd()"
        return f"PidfdGetfd(window={self.window})"
