"""Who holds the other end of a connection (Linux): the proofs `PidfdGetfd` relies on.

A receiver must pull fds only out of a process proven to be its
connection's peer (docs/transports.md, "Threat model").  Two proofs:

* the kernel's word, for ``AF_UNIX``: ``SO_PEERPIDFD`` (Linux >= 6.5) is a
  pidfd of the process that connected (or made the socketpair), race-free;
* a held socket, for any stream: the process holds, at the fd number it
  names, the socket at the other end of this very connection.  For
  ``AF_UNIX`` the kernel's socket diagnostics (``NETLINK_SOCK_DIAG``,
  ``UDIAG_SHOW_PEER``) name the peer socket's inode; for TCP the pulled
  socket's own address must be this socket's peer address and the other
  way round, in the same network namespace (a four-tuple names one
  connection per namespace).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
from typing import Final

assert sys.platform == "linux"

__all__ = ["is_other_end", "kernel_peer_pidfd", "peer_cred_pid"]

#: Not in every Python's socket module (3.11 lacks both).
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
SO_NETNS_COOKIE: Final = getattr(socket, "SO_NETNS_COOKIE", 71)

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLMSG_ERROR: Final = 2
_NLM_F_REQUEST: Final = 1
_UDIAG_SHOW_PEER: Final = 4
_UNIX_DIAG_PEER: Final = 2
_NLMSGHDR: Final = struct.Struct("=IHHII")
#: struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_REQ: Final = struct.Struct("=BBHIIIII")
#: struct unix_diag_msg: family, type, state, pad, ino, cookie[2]
_UNIX_DIAG_MSG: Final = struct.Struct("=BBBBIII")
_RTATTR: Final = struct.Struct("=HH")
_NO_COOKIE: Final = 0xFFFFFFFF

_PEERCRED: Final = struct.Struct("3i")

#: Whether SO_PEERPIDFD works here; None until first tried.
_peerpidfd_works: bool | None = None


def peer_cred_pid(sock: socket.socket) -> int:
    """The pid the kernel recorded for *sock*'s peer at connect time (``SO_PEERCRED``); 0 if none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return 0
    pid: int = _PEERCRED.unpack(raw)[0]
    return pid


def kernel_peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd (the caller owns it) of *sock*'s peer process per the kernel, or None where unsupported.

    Unlike a pid, it cannot come to name another process once the peer exits.
    """
    global _peerpidfd_works
    if _peerpidfd_works is False:
        return None
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            _peerpidfd_works = False
        return None
    _peerpidfd_works = True
    os.set_inheritable(fd, False)
    return fd


def unix_peer_inode(sock: socket.socket) -> int:
    """The inode of the socket at the other end of AF_UNIX *sock*, from the kernel's socket diagnostics.

    Raises `OSError` where the kernel has no ``unix_diag`` or refuses it,
    `ConnectionError` when *sock* has no peer.
    """
    ino = os.fstat(sock.fileno()).st_ino
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE)
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)  # the kernel answers at once; never hang on a broken netlink
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSGHDR.size:
        raise OSError(errno.EPROTO, "short unix_diag reply")
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        raise OSError(-err, f"unix_diag: {os.strerror(-err)}")
    pos = _NLMSGHDR.size + _UNIX_DIAG_MSG.size
    if (
        kind != _SOCK_DIAG_BY_FAMILY
        or len(data) < pos
        or _UNIX_DIAG_MSG.unpack_from(data, _NLMSGHDR.size)[4] != ino
    ):
        raise OSError(errno.EPROTO, "unexpected unix_diag reply")
    end = min(length, len(data))
    while pos + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(data, pos)
        if alen < _RTATTR.size:
            break
        if atype == _UNIX_DIAG_PEER and alen >= _RTATTR.size + 4:
            peer: int = struct.unpack_from("=I", data, pos + _RTATTR.size)[0]
            return peer
        pos += (alen + 3) & ~3
    raise ConnectionError(errno.ENOTCONN, "the socket has no peer")


def _netns_cookie(sock: socket.socket) -> bytes | None:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:  # before Linux 5.14
        return None


def fd_link(pid: int, fd: int) -> str | None:
    """What fd *fd* of process *pid* names (``/proc/PID/fd/FD``), looked at without copying it.

    ``""`` when the process has no such fd (or is gone); None where /proc
    cannot tell (not mounted, or not allowed to look).
    """
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return ""  # no such fd (or no such process): not a socket, not a lease
    except OSError:
        return None  # no /proc, or not allowed to look: pull and check instead


def socket_inode(link: str) -> int | None:
    """The inode of a ``socket:[N]`` fd link, or None for anything else."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


def is_other_end(fd: int, sock: socket.socket) -> bool:
    """True if *fd* is the socket at the other end of *sock*'s connection (and not *sock* itself).

    *fd* is borrowed.  Raises `OSError` when the kernel cannot tell (no
    ``unix_diag``); False for anything else: not a socket, another socket.
    """
    theirs = os.fstat(fd)
    mine = os.fstat(sock.fileno())
    if not stat.S_ISSOCK(theirs.st_mode) or (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
        return False
    if sock.family == socket.AF_UNIX:
        return theirs.st_dev == mine.st_dev and theirs.st_ino == unix_peer_inode(sock)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return _inet_other_end(fd, sock)
    return False


def _inet_other_end(fd: int, sock: socket.socket) -> bool:
    """True if socket *fd* (borrowed) has *sock*'s addresses swapped, in *sock*'s network namespace."""
    other = socket.socket(fileno=fd)
    try:
        if other.family != sock.family or other.type != sock.type:
            return False
        try:
            swapped = other.getsockname() == sock.getpeername() and other.getpeername() == sock.getsockname()
        except OSError:  # ENOTCONN: not (or no longer) connected
            return False
        return swapped and _netns_cookie(other) == _netns_cookie(sock)
    finally:
        other.detach()  # borrowed
