"""Who is at the other end of an AF_UNIX socket, and how to reach a named one.

Below `fdchannel.Channel` (whose `peer_credentials` and `connect` use it) and
`fdchannel.Listener` (which checks peers with it).
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import platform
import socket
import struct
import sys
import time
from typing import Any, Final

import attrs

__all__ = [
    "CONNECT_RETRY_FIRST",
    "CONNECT_RETRY_MAX",
    "SUN_PATH_MAX",
    "PeerCredentials",
    "backlog_full",
    "connect_step",
    "connect_unix",
    "is_abstract",
    "peer_credentials",
    "peer_groups",
    "unix_address",
    "unix_socket",
]

#: sun_path holds 108 bytes including the terminating NUL on Linux.
SUN_PATH_MAX: Final = 107


@attrs.frozen
class PeerCredentials:
    """Who is at the other end of an AF_UNIX socket, as the kernel recorded it.

    The values are those of the process when it called ``connect()`` (or
    created the socketpair), not of whoever holds the socket now: the ends
    of `Channel.pair` both report the process that created the pair, even
    after one end was handed to a child.  ``pid`` is ``None`` where the OS
    does not report it.  ``gid`` is the primary (effective) group only.
    """

    pid: int | None
    uid: int
    gid: int


def _so_peergroups() -> int | None:
    """Linux's SO_PEERGROUPS (4.13+), where its number is known."""
    value = getattr(socket, "SO_PEERGROUPS", None)
    if value is not None:
        return int(value)
    if not sys.platform.startswith("linux"):
        return None
    # Python 3.11 lacks the constant.  59 is the generic Linux number; sparc
    # and parisc number their socket options differently.
    return None if platform.machine().startswith(("sparc", "parisc")) else 59


_SO_PEERGROUPS: Final = _so_peergroups()


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The supplementary groups of *sock*'s peer as recorded at connect time.

    Empty where the OS cannot tell (only Linux 4.13+ can, with
    ``SO_PEERGROUPS``).
    """
    if _SO_PEERGROUPS is None:  # pragma: no cover - not Linux
        return frozenset()
    try:
        # 1024 bytes (256 groups) is the most socket.getsockopt() reads.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return frozenset()  # a kernel without SO_PEERGROUPS
        try:
            raw = _getsockopt_large(sock.fileno(), _SO_PEERGROUPS, 4 * 65536)  # NGROUPS_MAX
        except OSError:
            return frozenset()
    return frozenset(array.array("I", raw[: len(raw) - len(raw) % 4]))


def _getsockopt_large(fd: int, option: int, size: int) -> bytes:
    """``getsockopt(SOL_SOCKET, option)`` into a buffer larger than Python allows."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(fd, socket.SOL_SOCKET, option, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[: length.value]


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read the peer's credentials of connected AF_UNIX *sock* from the kernel.

    Raises `OSError` from the kernel (``ENOTCONN``, ``EOPNOTSUPP`` for a
    socket of another family) and `NotImplementedError` on an OS with no
    known way to ask.
    """
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        # struct ucred: pid_t pid; uid_t uid; gid_t gid.  The ids are
        # unsigned: containers map users to ids of 2**31 and more.
        size = struct.calcsize("iII")
        pid, uid, gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
        return PeerCredentials(pid, uid, gid)
    if sys.platform == "darwin" or sys.platform.startswith(("freebsd", "dragonfly")):  # pragma: no cover
        # struct xucred: u_int version; uid_t uid; short ngroups; gid_t groups[16];
        # FreeBSD >= 13 adds the pid after the groups.  Level 0 is SOL_LOCAL,
        # option 1 LOCAL_PEERCRED (getpeereid() reads the same record).
        raw = sock.getsockopt(0, 1, 256)
        _version, uid, ngroups = struct.unpack_from("IIh", raw)
        gid = struct.unpack_from("I", raw, 12)[0] if ngroups > 0 else -1
        peer_pid: int | None = None
        if sys.platform == "darwin":
            peer_pid = struct.unpack("i", sock.getsockopt(0, 2, 4))[0]  # LOCAL_PEERPID
        elif len(raw) >= 12 + 64 + 4 + 4:
            peer_pid = struct.unpack_from("i", raw, 80)[0] or None
        return PeerCredentials(peer_pid, uid, gid)
    raise NotImplementedError(f"peer credentials are not supported on {sys.platform}")


def unix_socket() -> socket.socket:
    """A new AF_UNIX stream socket, owned by the caller.

    Raises `OSError` (``EAFNOSUPPORT``) naming the platform where Python has
    no AF_UNIX (Windows): named endpoints need it, channels do not.
    """
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        raise OSError(
            errno.EAFNOSUPPORT,
            f"AF_UNIX sockets are not available to Python on {sys.platform}: Listener, connect() "
            "and start_server() need them (Channel.pair(), spawn() and Channel(sock) over TCP do not)",
        )
    return socket.socket(family, socket.SOCK_STREAM)


#: A listener whose backlog is full gives no readiness to wait for: the
#: connect is tried again after this long, doubling up to `CONNECT_RETRY_MAX`.
CONNECT_RETRY_FIRST: Final = 0.001
CONNECT_RETRY_MAX: Final = 0.05


def connect_step(sock: socket.socket, address: str | bytes) -> bool:
    """One non-blocking connect of *sock*: True once connected, False while the listener's backlog is full.

    On Linux a full backlog makes a non-blocking AF_UNIX connect fail with
    ``EAGAIN`` and leaves the socket unconnected (it is no connect in
    progress, so waiting for writability would report a connection that
    does not exist).  ``EINPROGRESS`` (other systems) is waited for by the
    caller like ``EAGAIN``; a connection that then failed raises its error.
    Other `OSError` propagates.
    """
    try:
        sock.connect(address)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        if exc.errno == errno.EALREADY:  # an earlier EINPROGRESS attempt is still going
            return False
        if exc.errno != errno.EISCONN:  # (EISCONN: that attempt completed)
            raise
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise
    return True


def backlog_full(address: str | bytes, timeout: float) -> TimeoutError:
    """The error a connect that waited *timeout* seconds for a full listener raises."""
    return TimeoutError(
        errno.ETIMEDOUT,
        f"timed out after {timeout:g} s waiting for the listener at {address!r} to accept "
        "the connection (its backlog is full)",
    )


def connect_unix(path: str | bytes | os.PathLike[Any], timeout: float | None) -> socket.socket:
    """A stream socket connected to the AF_UNIX *path*, owned by the caller.

    *timeout* bounds the connect and stays the socket's timeout: while the
    listener's backlog is full the connect is retried until it is accepted
    or *timeout* passes (`TimeoutError`; `BlockingIOError` for ``0.0``).
    ``None`` waits as long as it takes.  Raises `OSError` as
    ``socket.connect`` does, with nothing left open.
    """
    address = unix_address(path)
    sock = unix_socket()
    try:
        sock.setblocking(False)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = CONNECT_RETRY_FIRST
        while not connect_step(sock, address):
            if timeout == 0.0:
                raise BlockingIOError(
                    errno.EAGAIN, f"the listener at {address!r} cannot take the connection now (backlog full)"
                )
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise backlog_full(address, timeout or 0.0)
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_address(path: str | bytes | os.PathLike[Any]) -> str | bytes:
    address = os.fspath(path)
    if not address:
        raise ValueError("an AF_UNIX address must not be empty")
    return address


def is_abstract(address: str | bytes) -> bool:
    return address[:1] in ("\0", b"\0")
