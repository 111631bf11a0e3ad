"""One fd per call, on the wire of the Perl module IO::FDPass.

`send` writes one NUL byte carrying one fd as ``SCM_RIGHTS``; `recv` reads
one byte and returns the fd that rode on it.  A Perl process using
``IO::FDPass::send``/``IO::FDPass::recv`` on the other end of the socket
interoperates in both directions.  There is no framing and no payload: for
messages use `fdchannel.Channel`, which has its own wire format.

Differences from IO::FDPass, all deliberate: errors raise `OSError` (never
``-1``/false); the received fd is close-on-exec; extra fds in one control
message are closed rather than leaked; a truncated control message
(``MSG_CTRUNC``) is an error; sending to a vanished peer raises
`BrokenPipeError` rather than raising ``SIGPIPE``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from ._fdutil import close_all
from ._ownedfd import fileno_of
from ._sockio import HAVE_ANCILLARY

__all__ = ["recv", "send"]

if sys.platform != "win32":
    import fcntl

if HAVE_ANCILLARY:
    # Room for a whole sendmsg's worth of fds (ANCBUF), so a peer that sends
    # several gets them closed here, not silently dropped as MSG_CTRUNC.
    from . import _posixio


# The Unix definitions come last so that documentation tools, which read the
# source without running it, describe them rather than the Windows import.
if sys.platform == "win32":  # pragma: no cover - the Windows flavour lives in its own module
    from ._fdpass_win import recv, send
else:

    @contextlib.contextmanager
    def _as_socket(sock: int | Any) -> Iterator[socket.socket]:
        """Yield *sock* as a `socket.socket` without taking ownership of it."""
        if isinstance(sock, socket.socket):
            yield sock  # keeps its own timeout/blocking mode
            return
        fd = fileno_of(sock)
        # Wrapping an fd must not change it: socket() makes it non-blocking when
        # a default timeout is set, so the flags are put back afterwards.
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) if socket.getdefaulttimeout() is not None else None
        # Family and type are given so that wrapping costs no syscalls; a fd
        # that is not a socket fails in sendmsg/recvmsg with ENOTSOCK.
        wrapper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        try:
            if flags is not None:
                wrapper.setblocking(not flags & os.O_NONBLOCK)
            yield wrapper
        finally:
            wrapper.detach()
            if flags is not None:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)

    def send(sock: int | Any, fd: int | Any) -> None:
        """Send *fd* over *sock* as IO::FDPass does: one NUL byte with one fd.

        Args:
            sock: A connected ``AF_UNIX`` stream socket: an int fd, a
                `socket.socket` (its timeout applies) or any object with
                ``fileno()``.
            fd: An int or an object with ``fileno()``; it stays the caller's
                and may be closed as soon as this returns (the kernel holds
                its own reference while the fd is in flight).

        Raises:
            BlockingIOError: A non-blocking socket cannot take the byte now
                (nothing was sent: call again when writable).
            TimeoutError: A socket object's timeout expired.
            BrokenPipeError: The peer has gone.
            OSError: From the kernel: ``EBADF`` for a bad *fd*,
                ``ENOTSOCK``, ``ETOOMANYREFS`` when too many fds are in
                flight.
        """
        num = fileno_of(fd)
        with _as_socket(sock) as s:
            # One byte either leaves whole (with its fd) or not at all.
            s.sendmsg([b"\0"], _posixio.rights([num]), _posixio.SEND_FLAGS)

    def recv(sock: int | Any) -> int:
        """Receive one fd sent by IO::FDPass (or `send`); the caller owns it.

        If the peer attached several fds to the byte, the first is returned
        and the others are closed.  Nothing is returned or left open on any
        error.

        Args:
            sock: As for `send`.

        Returns:
            The received fd, non-inheritable (close-on-exec), owned by the
                caller.

        Raises:
            EOFError: The peer closed the connection.
            ConnectionResetError: Where the kernel reports a reset instead.
            BlockingIOError: A non-blocking socket has nothing to read.
            TimeoutError: A socket object's timeout expired.
            OSError: ``errno.EBADMSG`` when a byte arrived without an fd or
                the byte was not NUL (any fd is closed); ``errno.EMSGSIZE``
                when the kernel truncated the control message
                (``MSG_CTRUNC``, usually this process is at its
                ``RLIMIT_NOFILE``; every fd that did arrive is closed).
        """
        with _as_socket(sock) as s:
            data, ancdata, flags, _ = s.recvmsg(1, _posixio.ANCBUF, _posixio.RECV_FLAGS)
        fds = _posixio.ancillary_fds(ancdata)
        try:
            if _posixio.truncated(flags):
                raise OSError(
                    errno.EMSGSIZE,
                    "the kernel truncated the control message (MSG_CTRUNC); is this process at its "
                    "RLIMIT_NOFILE?  The fds that arrived were closed",
                )
            if not data:
                raise EOFError("the peer closed the socket")
            if not fds:
                raise OSError(errno.EBADMSG, "a byte arrived without an fd: the peer is not sending fds")
            if data != b"\0":
                raise OSError(errno.EBADMSG, f"expected the NUL byte of IO::FDPass, got {data!r}; fd closed")
        except BaseException:
            close_all(fds)
            raise
        close_all(fds[1:])
        return fds[0]
