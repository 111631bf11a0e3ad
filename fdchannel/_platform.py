"""What differs between the Unix kernels fdchannel runs on, in one table.

Every branch that depends on the operating system's behaviour (rather than
on whether a constant exists) reads a `Facts` record, so that tests can run
each branch on Linux by handing a function another platform's record.  Each
fact says where it comes from; docs/portability.md lists them, and which
were never run on the platform itself.
"""

from __future__ import annotations

import errno
import sys
from typing import Final

import attrs

__all__ = ["FACTS", "Facts", "facts_for"]

#: BSD-derived kernels copy a sendmsg's control data into one mbuf cluster
#: (``sockargs``: more than MCLBYTES is EINVAL), so no peer can send more
#: than this many bytes of ancillary data in one call.
_MCLBYTES: Final = 2048


@attrs.frozen
class Facts:
    """One platform's socket behaviour, as its kernel source defines it."""

    #: ``sys.platform``-style name, for messages.
    name: str
    #: How the platform names itself in error messages.
    label: str
    #: The UnixRights transport keeps duplicates of sent fds until the peer
    #: acknowledges them: XNU can drop an in-flight fd its sender closed
    #: (bpo-14669; multiprocessing acknowledges on darwin only).
    ack_fds: bool = False
    #: ``sendmsg`` with fds fails with EMSGSIZE when the peer's buffer cannot
    #: take the control data although the socket is writable: backpressure,
    #: not an error (XNU; libuv PR 1739).
    emsgsize_is_backpressure: bool = False
    #: errnos with which ``recvmsg`` fails when the receiver cannot install
    #: the fds (its fd table is full), mapped to the wording of the kernel.
    #: Linux sets MSG_CTRUNC instead and fails nothing.
    recv_fd_errors: tuple[tuple[int, str], ...] = ()
    #: The most fd bytes a peer can put in one sendmsg, when the kernel
    #: installs fds that do not fit the receiver's buffer instead of closing
    #: them (XNU's copyout_control): the receive buffer must hold them all.
    recv_fd_bytes_max: int | None = None
    #: A non-blocking connect to a listener with a full backlog answers
    #: EAGAIN (Linux); elsewhere it answers ECONNREFUSED, as a dead one does.
    refused_means_dead: bool = False
    #: Bytes of ``sun_path`` usable for a path (the NUL excluded).
    sun_path_max: int = 103
    #: Abstract AF_UNIX names (a leading NUL) exist.
    abstract_names: bool = False
    #: How the peer's credentials are read: "ucred" (SO_PEERCRED as pid,
    #: uid, gid), "sockpeercred" (OpenBSD's SO_PEERCRED as uid, gid, pid),
    #: "xucred" (LOCAL_PEERCRED), "unpcbid" (NetBSD's LOCAL_PEEREID) or None.
    credentials: str | None = None


_LINUX = Facts(
    name="linux",
    label="Linux",
    refused_means_dead=True,
    sun_path_max=107,
    abstract_names=True,
    credentials="ucred",
)
_DARWIN = Facts(
    name="darwin",
    label="macOS",
    ack_fds=True,
    emsgsize_is_backpressure=True,
    recv_fd_errors=(
        (errno.EMSGSIZE, "macOS failed recvmsg with EMSGSIZE and dropped the fds"),
        (errno.EMFILE, "macOS failed recvmsg with EMFILE and dropped the fds"),
    ),
    recv_fd_bytes_max=_MCLBYTES,
    credentials="xucred",
)
_FREEBSD = Facts(
    name="freebsd",
    label="FreeBSD",
    recv_fd_errors=(
        (errno.EMFILE, "FreeBSD aborted the read with EMFILE and disposed of the fds"),
        (errno.EMSGSIZE, "FreeBSD aborted the read with EMSGSIZE and disposed of the fds"),
    ),
    credentials="xucred",
)
_OPENBSD = Facts(
    name="openbsd",
    label="OpenBSD",
    recv_fd_errors=(
        (errno.EMSGSIZE, "OpenBSD failed recvmsg with EMSGSIZE and closed the fds"),
        (errno.EMFILE, "OpenBSD failed recvmsg with EMFILE and closed the fds"),
    ),
    credentials="sockpeercred",
)
_NETBSD = Facts(
    name="netbsd",
    label="NetBSD",
    recv_fd_errors=(
        (errno.EMSGSIZE, "NetBSD failed recvmsg with EMSGSIZE and closed the fds"),
        (errno.EMFILE, "NetBSD failed recvmsg with EMFILE and closed the fds"),
    ),
    credentials="unpcbid",
)
_OTHER = Facts(name="unknown", label="this OS")

_BY_PREFIX: Final = (
    ("linux", _LINUX),
    ("darwin", _DARWIN),
    ("freebsd", _FREEBSD),
    ("dragonfly", _FREEBSD),
    ("openbsd", _OPENBSD),
    ("netbsd", _NETBSD),
)


def facts_for(platform: str) -> Facts:
    """The facts of a ``sys.platform`` value (an unknown Unix gets the cautious defaults)."""
    for prefix, facts in _BY_PREFIX:
        if platform.startswith(prefix):
            return facts
    return attrs.evolve(_OTHER, name=platform)


#: This platform's facts.
FACTS: Final = facts_for(sys.platform)
