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
from collections.abc import Collection
from typing import Any, Final, Self

import attrs

from ._ownedfd import OwnedFd
from ._platform import FACTS, Facts

__all__ = [
    "CONNECT_RETRY_FIRST",
    "CONNECT_RETRY_MAX",
    "SUN_PATH_MAX",
    "PeerCredentials",
    "backlog_full",
    "check_server",
    "connect_step",
    "connect_unix",
    "is_abstract",
    "parse_credentials",
    "peer_credentials",
    "peer_groups",
    "peer_pidfd",
    "refuse_fds",
    "unix_address",
    "unix_socket",
]

#: The longest AF_UNIX path (in bytes, the NUL excluded): 107 on Linux,
#: 103 on macOS and the BSDs (sun_path is 104 bytes there).
SUN_PATH_MAX: Final = FACTS.sun_path_max


@attrs.frozen
class PeerCredentials:
    """Who is at the other end of an AF_UNIX socket, as the kernel recorded it.

    The values are those of the process when it called ``connect()`` (or
    created the socketpair), not of whoever holds the socket now: the ends
    of `Channel.pair` both report the process that created the pair, even
    after one end was handed to a child.

    Attributes:
        pid: The peer's process id, or ``None`` where the OS does not report
            it.  On macOS it comes from ``LOCAL_PEERPID``, which names the
            process that last used the peer's socket rather than the one that
            connected.
        uid: The peer's effective user id.
        gid: The peer's primary (effective) group only.
        pidfd: An `OwnedFd` of the peer process when it was asked for
            (``peer_credentials(pidfd=True)``, Linux 6.5+ ``SO_PEERPIDFD``):
            it names that very process even after it exited and its pid was
            reused, so signalling it (``signal.pidfd_send_signal``) or
            waiting for it never reaches another process.  The caller owns
            it: close it, or use the credentials as a context manager.  It
            takes no part in ``==``.
    """

    pid: int | None
    uid: int
    gid: int
    pidfd: OwnedFd | None = attrs.field(default=None, eq=False, kw_only=True)

    def close(self) -> None:
        """Close ``pidfd`` if there is one.  Idempotent."""
        if self.pidfd is not None:
            self.pidfd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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


def peer_credentials(sock: socket.socket, *, pidfd: bool = False) -> PeerCredentials:
    """Read the peer's credentials of connected AF_UNIX *sock* from the kernel.

    With *pidfd*, the result also carries a pidfd of the peer process
    (caller-owned; see `PeerCredentials`).  Raises `OSError` from the kernel
    (``ENOTCONN``, ``EOPNOTSUPP`` for a socket of another family;
    ``ENOPROTOOPT`` naming the need for Linux 6.5+ when *pidfd* was asked
    for and the kernel has no ``SO_PEERPIDFD``) and `NotImplementedError`
    on an OS with no known way to ask.
    """
    if pidfd:
        creds = peer_credentials(sock)
        return attrs.evolve(creds, pidfd=OwnedFd(peer_pidfd(sock)))
    kind = FACTS.credentials
    if kind is None:
        raise NotImplementedError(f"fdchannel knows no way to read a peer's credentials on {sys.platform}")
    raw = sock.getsockopt(*_CRED_OPTION[kind], _CRED_SIZE[kind])
    pid: int | None = None
    if kind == "xucred" and sys.platform == "darwin":  # pragma: no cover - macOS
        pid = struct.unpack("i", sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, 4))[0]
    return parse_credentials(kind, raw, pid=pid)


# Where each layout is read: (level, option).  SOL_LOCAL is 0 on the BSDs
# and macOS; LOCAL_PEERCRED is 1 there, NetBSD's LOCAL_PEEREID is 3.
_SOL_LOCAL: Final = 0
_LOCAL_PEERPID: Final = 2  # macOS
_CRED_OPTION: Final[dict[str, tuple[int, int]]] = {
    "ucred": (socket.SOL_SOCKET, int(getattr(socket, "SO_PEERCRED", 17))),
    "sockpeercred": (socket.SOL_SOCKET, int(getattr(socket, "SO_PEERCRED", 0x1022))),
    "xucred": (_SOL_LOCAL, 1),
    "unpcbid": (_SOL_LOCAL, 3),
}
# struct ucred (Linux): pid_t pid; uid_t uid; gid_t gid.
_UCRED: Final = struct.Struct("=iII")
# struct sockpeercred (OpenBSD): uid_t uid; gid_t gid; pid_t pid.
_SOCKPEERCRED: Final = struct.Struct("=IIi")
# struct unpcbid (NetBSD): pid_t unp_pid; uid_t unp_euid; gid_t unp_egid.
_UNPCBID: Final = struct.Struct("=iII")
# struct xucred (macOS, FreeBSD): u_int cr_version; uid_t cr_uid;
# short cr_ngroups; gid_t cr_groups[XU_NGROUPS = 16]; FreeBSD 13+ then has
# a union of a pointer and pid_t cr_pid, aligned to 8 (offset 80).
_XUCRED_HEAD: Final = struct.Struct("=IIh")
_XUCRED_GROUPS_AT: Final = 12
_XUCRED_PID_AT: Final = 80
_XUCRED_SIZE: Final = 88
_XUCRED_VERSION: Final = 0
_CRED_SIZE: Final = {
    "ucred": _UCRED.size,
    "sockpeercred": _SOCKPEERCRED.size,
    "xucred": _XUCRED_SIZE,
    "unpcbid": _UNPCBID.size,
}


def parse_credentials(kind: str, raw: bytes, *, pid: int | None = None) -> PeerCredentials:
    """Decode one credentials record of layout *kind* (see `fdchannel._platform.Facts`).

    *pid* is the peer's pid where the OS reports it apart from the record
    (macOS's LOCAL_PEERPID).  Raises `OSError` (``EPROTO``) for a record
    that is too short or of an unknown ``xucred`` version.
    """
    size = _CRED_SIZE.get(kind)
    if size is None:
        raise ValueError(f"unknown credentials layout {kind!r}")
    # macOS's xucred ends after the groups; FreeBSD's pid is optional here.
    need = _XUCRED_GROUPS_AT + 4 * 16 if kind == "xucred" else size
    if len(raw) < need:
        raise OSError(errno.EPROTO, f"peer credentials ({kind}): {len(raw)} bytes, expected {need}")
    if kind == "ucred":
        cpid, uid, gid = _UCRED.unpack_from(raw)
        return PeerCredentials(cpid, uid, gid)
    if kind == "sockpeercred":
        uid, gid, cpid = _SOCKPEERCRED.unpack_from(raw)
        return PeerCredentials(cpid, uid, gid)
    if kind == "unpcbid":
        cpid, uid, gid = _UNPCBID.unpack_from(raw)
        return PeerCredentials(cpid, uid, gid)
    version, uid, ngroups = _XUCRED_HEAD.unpack_from(raw)
    if version != _XUCRED_VERSION:
        raise OSError(errno.EPROTO, f"peer credentials: struct xucred version {version}, expected 0")
    if ngroups < 1:
        raise OSError(errno.EPROTO, "peer credentials: struct xucred lists no group")
    # cr_groups[0] is the effective gid, as getpeereid() reports it.
    (gid,) = struct.unpack_from("=I", raw, _XUCRED_GROUPS_AT)
    if pid is None and len(raw) >= _XUCRED_SIZE:
        pid = struct.unpack_from("=i", raw, _XUCRED_PID_AT)[0] or None
    return PeerCredentials(pid, uid, gid)


#: Linux's SO_PEERPIDFD (6.5+) and SO_PASSRIGHTS (6.16+), numbered as on
#: every architecture but sparc, parisc and alpha, where they do not apply.
_SO_PEERPIDFD: Final = int(getattr(socket, "SO_PEERPIDFD", 77))
_SO_PASSRIGHTS: Final = int(getattr(socket, "SO_PASSRIGHTS", 83))
_LINUX_SOCKOPTS: Final = sys.platform == "linux" and not platform.machine().startswith(
    ("sparc", "parisc", "alpha")
)


def peer_pidfd(sock: socket.socket) -> int:
    """A close-on-exec pidfd of the peer of connected AF_UNIX *sock*, owned by the caller.

    Raises `OSError` ``ENOPROTOOPT`` where the kernel has no
    ``SO_PEERPIDFD`` (before Linux 6.5, and off Linux).
    """
    if not _LINUX_SOCKOPTS:
        raise OSError(
            errno.ENOPROTOOPT, f"a peer's pidfd needs Linux 6.5+ (SO_PEERPIDFD), not {sys.platform}"
        )
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            raise OSError(exc.errno, "a peer's pidfd needs Linux 6.5+ (SO_PEERPIDFD)") from exc
        raise
    os.set_inheritable(fd, False)  # the kernel makes it O_CLOEXEC; say so anyway
    return fd


def refuse_fds(sock: socket.socket) -> bool:
    """Make the kernel refuse fds sent to AF_UNIX *sock* (``SO_PASSRIGHTS`` off, Linux 6.16+).

    A sender's ``sendmsg`` with SCM_RIGHTS then fails with ``EPERM`` and no
    fd ever enters this process.  Returns False where the kernel cannot
    (older kernels, other systems): fds then arrive and the channel closes
    them (a frame declaring fds is over ``max_fds=0``).
    """
    if not _LINUX_SOCKOPTS or sock.family != getattr(socket, "AF_UNIX", None):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


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


def connect_unix(
    path: str | bytes | os.PathLike[Any],
    timeout: float | None,
    expect_uid: int | Collection[int] | None = None,
) -> socket.socket:
    """A stream socket connected to the AF_UNIX *path*, owned by the caller.

    *timeout* bounds the connect and stays the socket's timeout: while the
    listener's backlog is full the connect is retried until it is accepted
    or *timeout* passes (`TimeoutError`; `BlockingIOError` for ``0.0``).
    ``None`` waits as long as it takes.  Raises `OSError` as
    ``socket.connect`` does (`FileNotFoundError` and
    `ConnectionRefusedError` naming the path), and `PermissionError` when
    the server is not one of *expect_uid* (`check_server`), with nothing
    left open.
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
        check_server(sock, expect_uid, address)
    except FileNotFoundError as exc:
        sock.close()
        raise FileNotFoundError(errno.ENOENT, "no socket there: is the Listener running?", address) from exc
    except ConnectionRefusedError as exc:
        sock.close()
        raise ConnectionRefusedError(
            errno.ECONNREFUSED, "nothing listens on that socket (a stale socket file?)", address
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def check_server(sock: socket.socket, expect_uid: int | Collection[int] | None, address: object) -> None:
    """Raise `PermissionError` unless the peer of connected *sock* runs as one of *expect_uid*.

    For clients: a filesystem socket is protected by its directory's and its
    own permissions, but anyone may bind an abstract name (or a path in a
    world-writable directory) first; checking who serves it before sending
    anything keeps a client from handing its fds to a squatter.  None checks
    nothing.  The socket is left to the caller.
    """
    if expect_uid is None:
        return
    allowed = {expect_uid} if isinstance(expect_uid, int) else set(expect_uid)
    uid = peer_credentials(sock).uid
    if uid not in allowed:
        raise PermissionError(
            errno.EPERM,
            f"the server is uid {uid}, not {sorted(allowed)} as expect_uid requires: refusing to use it "
            "(another user may have bound this name first); nothing was sent",
            address,
        )


def unix_address(path: str | bytes | os.PathLike[Any], facts: Facts = FACTS) -> str | bytes:
    """*path* as the socket module takes it; raises `ValueError` or `OSError` naming the problem.

    Abstract names (a leading NUL) exist only on Linux: elsewhere they are
    refused with ``EAFNOSUPPORT`` rather than left to a puzzling bind error.
    """
    address = os.fspath(path)
    if not address:
        raise ValueError("an AF_UNIX address must not be empty")
    if is_abstract(address) and not facts.abstract_names:
        raise OSError(
            errno.EAFNOSUPPORT,
            f"abstract AF_UNIX names (a leading NUL) exist only on Linux, not on {facts.label}; "
            "use a filesystem path",
            address,
        )
    return address


def is_abstract(address: str | bytes) -> bool:
    return address[:1] in ("\0", b"\0")
