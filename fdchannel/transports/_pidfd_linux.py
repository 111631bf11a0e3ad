"""The Linux half of `PidfdGetfd`: ``pidfd_getfd``, ``kcmp``, sealed memfd leases.

Python has ``os.pidfd_open`` but no ``pidfd_getfd`` or ``kcmp`` wrapper, so
both are called through ``syscall(2)`` with ctypes.  Imported only on Linux
(`fdchannel.transports._pidfd` holds the platform-neutral transport class;
`._peerproof_linux` the proof that a sender is the connection's peer).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import resource
import select
import socket
import struct
import sys
from typing import Any, Final

from .._errors import ProtocolError, UnverifiedSender
from . import _peerproof_linux as proof
from ._pull import TOKEN_SIZE, PullSession

assert sys.platform == "linux"  # the rest is Linux only; mypy skips it elsewhere too

__all__ = ["PidfdSession", "pack_refs", "pidfd_getfd", "unavailable_reason"]

#: syscall numbers: (pidfd_getfd, kcmp).  pidfd_getfd is 438 on every
#: architecture using the generic table; kcmp is not.
_SYSCALLS: Final = {"x86_64": (438, 312), "aarch64": (438, 272)}
_KCMP_FILE: Final = 0
_REF: Final = struct.Struct("<I")
_LEASE_NAME: Final = "fdchannel-lease"

_syscall: Any = None
_NR_GETFD = 0
_NR_KCMP = 0
_SEALS: Final = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_nrs = _SYSCALLS.get(platform.machine())
if _nrs is not None:
    _NR_GETFD, _NR_KCMP = _nrs
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long


def _call(nr: int, *args: int) -> int:
    """Run a system call; raise the `OSError` subclass errno names."""
    result: int = _syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Return a close-on-exec copy of fd *targetfd* of the process *pidfd* names.

    The caller owns the result.  Raises `PermissionError` without ptrace
    rights over the target, `ProcessLookupError` if it exited, `OSError`
    (``EBADF``) if it has no such fd.
    """
    return _call(_NR_GETFD, pidfd, targetfd, 0)


#: Whether kcmp(2) works here; None until first tried.  Kernels built
#: without CONFIG_KCMP return ENOSYS, and then a lease is compared by pulling
#: it again.
_kcmp_works: bool | None = None


def unavailable_reason() -> str | None:
    """Why `PidfdGetfd` cannot work in this process, or None if it can.

    Probes the kernel each time (a seccomp filter or a container can remove
    a system call the kernel has).
    """
    if _syscall is None:
        return f"PidfdGetfd does not know the syscall numbers for {platform.machine()}"
    if not hasattr(os, "pidfd_open") or not hasattr(os, "memfd_create"):
        return "PidfdGetfd needs a Python with os.pidfd_open and os.memfd_create (3.9+ on Linux)"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"PidfdGetfd: pidfd_open failed ({exc.strerror}); it needs Linux >= 5.6"
    try:
        # An fd that is not a pidfd: a kernel with pidfd_getfd says EBADF.
        _call(_NR_GETFD, -1, 0, 0)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            return f"PidfdGetfd: the kernel refuses pidfd_getfd ({exc.strerror}); it needs Linux >= 5.6"
    return None


def pack_refs(sock_fd: int, refs: list[int]) -> bytes:
    """The wire form of a message's references: the sender's socket fd, then each fd number."""
    return struct.pack(f"<{len(refs) + 1}I", sock_fd, *refs)


class PidfdSession(PullSession):
    """One channel's `PidfdGetfd` state over *sock* (borrowed: the channel owns it).

    Every frame with fds names, besides the sender's pid, the fd number of
    the sender's own socket: the receiver pulls it once per sender process
    to prove that process holds the other end of this connection (unless
    the kernel's ``SO_PEERPIDFD`` already names it).
    """

    transport_name = "PidfdGetfd"

    def __init__(self, sock: socket.socket, window: int | None) -> None:
        self.window = window
        self._sock = sock
        # The number this process knows its end by (a forked child shares it).
        self._sock_fd = sock.fileno()
        #: The pidfd `_os_open_peer` last got from SO_PEERPIDFD, if any.
        super().__init__()

    # -- sending side
    def _os_fd_budget(self) -> int:
        # Half the fd table, whatever the number of channels: the rest of
        # the process keeps the other half.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return sys.maxsize if soft == resource.RLIM_INFINITY else soft // 2

    def _os_export(self, fd: int) -> tuple[int, int]:
        # A private close-on-exec duplicate: the caller may close its fd as
        # soon as send() returns, and the receiver pulls this number.
        dup = os.dup(fd)
        return dup, dup

    def _os_release(self, kept: int) -> None:
        os.close(kept)

    def _os_new_lease(self) -> tuple[int, bytes, int]:
        # A sealed memfd holding a random token: only this session's lease
        # holds it, so a pulled lease proves the pid is really the sender.
        lease = os.memfd_create(_LEASE_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            token = os.urandom(TOKEN_SIZE)
            os.write(lease, token)
            fcntl.fcntl(lease, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(lease)
            raise
        return lease, token, lease

    def _os_pack_refs(self, refs: list[int]) -> bytes:
        return pack_refs(self._sock_fd, refs)

    def _os_unpack_refs(self, nfds: int, data: bytes) -> tuple[int, list[int]]:
        expected = (nfds + 1) * _REF.size
        if len(data) != expected:
            raise ProtocolError(
                f"PidfdGetfd: {len(data)} bytes of fd numbers for {nfds} fds (expected {expected})"
            )
        sock_fd, *refs = struct.unpack(f"<{nfds + 1}I", data)
        return sock_fd, refs

    # -- receiving side
    def _os_open_peer(self, pid: int) -> int:
        sock = self._sock
        if sock.family == socket.AF_UNIX and pid != os.getpid() and pid == proof.peer_cred_pid(sock):
            # The kernel's own record of who connected: a pidfd that keeps
            # naming that process (a pid could be reused once it exits).
            pidfd = proof.kernel_peer_pidfd(sock)
            if pidfd is not None:
                return pidfd
        return os.pidfd_open(pid)  # always close-on-exec

    def _os_prove_peer(self, proc: int, pid: int, proof_ref: int) -> None:
        # Always proven, also when SO_PEERPIDFD named the process: that is
        # who connected, which may since have handed the socket on.
        if pid == os.getpid():
            # The frame names this very process: look at the fd in place,
            # never pull a copy of our own fds.
            self._require(pid, proof_ref, self._is_other_end(pid, proof_ref))
            return
        # Look before pulling: only a socket is copied for the proof (a copy
        # of a file, closed again, would drop this process's POSIX locks on
        # it), and an AF_UNIX socket is proven by its inode without a copy.
        link = proof.fd_link(pid, proof_ref)
        if link is not None:
            inode = proof.socket_inode(link)
            if inode is None:
                raise UnverifiedSender(self._not_peer(pid, proof_ref, f"that fd is not a socket ({link!r})"))
            if self._sock.family == socket.AF_UNIX:
                try:
                    peer_inode = proof.unix_peer_inode(self._sock)
                except OSError as exc:
                    raise UnverifiedSender(self._cannot_prove(pid, exc)) from exc
                self._require(pid, proof_ref, inode == peer_inode)
                return
        try:
            theirs = pidfd_getfd(proc, proof_ref)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise  # EPERM, ESRCH: classified as for the lease
            raise UnverifiedSender(self._not_peer(pid, proof_ref, "it has no such fd")) from exc
        try:
            self._require(pid, proof_ref, self._is_other_end(pid, theirs))
        finally:
            os.close(theirs)

    def _is_other_end(self, pid: int, fd: int) -> bool:
        try:
            return proof.is_other_end(fd, self._sock)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return False
            raise UnverifiedSender(self._cannot_prove(pid, exc)) from exc

    def _require(self, pid: int, ref: int, proven: bool) -> None:
        if not proven:
            raise UnverifiedSender(
                self._not_peer(pid, ref, "that fd is not the other end of this connection")
            )

    def _os_lease_gone(self, proc: int, pid: int, lease_num: int, token: bytes) -> bool:
        if pid == os.getpid():
            return False  # never pulled from ourselves
        link = proof.fd_link(pid, lease_num)
        if link is None:
            return False  # cannot look: unsure
        if not link.startswith(f"/memfd:{_LEASE_NAME}"):
            return True  # the number names something else now: the lease was closed
        try:
            lease = pidfd_getfd(proc, lease_num)  # a memfd: copying it has no side effect
        except OSError:
            return True
        try:
            return self._os_lease_token(lease) != token
        finally:
            os.close(lease)

    def _cannot_prove(self, pid: int, exc: OSError) -> str:
        return (
            f"PidfdGetfd: cannot prove that process {pid} holds the other end of this connection "
            f"({exc.strerror or exc}); refusing to copy fds out of it, nothing was taken"
        )

    def _not_peer(self, pid: int, ref: int, why: str) -> str:
        me = " (this process itself)" if pid == os.getpid() else ""
        return (
            f"PidfdGetfd: the frame names process {pid}{me} and its fd {ref} as the sender's socket, "
            f"but {why}: only the process at the other end of this connection may be copied from; "
            "nothing was taken"
        )

    def _os_close_peer(self, proc: int) -> None:
        os.close(proc)

    def _os_pull(self, proc: int, ref: int) -> int:
        return pidfd_getfd(proc, ref)

    def _os_pull_lease(self, proc: int, num: int) -> int:
        return pidfd_getfd(proc, num)

    def _os_lease_token(self, lease: int) -> bytes | None:
        try:
            seals = fcntl.fcntl(lease, fcntl.F_GET_SEALS)
        except OSError:  # EINVAL: not a memfd, so not a lease
            return None
        if seals & _SEALS != _SEALS or os.fstat(lease).st_size != TOKEN_SIZE:
            return None
        return os.pread(lease, TOKEN_SIZE, 0)

    def _os_close_lease(self, lease: int) -> None:
        os.close(lease)

    def _os_same_lease(self, peer: Any) -> bool:
        global _kcmp_works
        if _kcmp_works is not False:
            try:
                same = _call(_NR_KCMP, peer.pid, os.getpid(), _KCMP_FILE, peer.lease_num, peer.lease) == 0
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    return False  # EBADF: the number is closed; ESRCH: the sender is gone
                _kcmp_works = False
            else:
                _kcmp_works = True
                return same
        # No kcmp: pull the number again and compare inodes.  A memfd's inode
        # cannot be reused while this process holds its copy of the lease.
        try:
            again = pidfd_getfd(peer.proc, peer.lease_num)
        except OSError:
            return False
        try:
            a, b = os.fstat(again), os.fstat(peer.lease)
            return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        finally:
            os.close(again)

    def _os_close_fd(self, fd: int) -> None:
        os.close(fd)

    def _os_exited(self, proc: int) -> bool:
        # A pidfd polls readable once its process has exited.
        poller = select.poll()
        poller.register(proc, select.POLLIN)
        return bool(poller.poll(0))
