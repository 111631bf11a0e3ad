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

__all__ = ["PidfdGetfd"]

#: One fd reference on the wire: the sender's fd number.
_REF_SIZE: Final = struct.calcsize("<I")


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

    The sender keeps a private duplicate of each fd until the receiver
    acknowledges the message (acknowledgements ride back as control frames
    and are handled during later ``send``/``recv``/``close`` calls, never
    waited for).  If the sender closes its channel or exits before a
    message's fds were taken, ``recv()`` raises `FdsWithdrawn` for that
    message: a released fd number is never pulled (docs/transports.md).

    Construction of a channel raises `OSError` (``ENOSYS``) where the kernel
    or Python lacks the system calls.
    """

    wire_id = 1
    name = "PidfdGetfd"

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
        return HEAD.size + max_fds * _REF_SIZE

    def session(self, sock: socket.socket) -> Session:
        if sys.platform == "linux":
            from ._pidfd_linux import PidfdSession

            return PidfdSession()
        raise OSError(errno.ENOSYS, unavailable_reason())

    def __repr__(self) -> str:
        return "PidfdGetfd()"
