"""The pull-duplication protocol shared by `PidfdGetfd` and `WinDuplicate`.

The sender puts *references* (its pid and its own fd or handle numbers) into
the frame's transport data; the receiver copies each fd out of the sender
with a system call (``pidfd_getfd`` on Linux, ``DuplicateHandle`` on
Windows).  This module holds the protocol; subclasses supply the few
operating-system calls it needs.  docs/transports.md explains why each step
is there.

Transport data of a frame with fds (fixed-width, little-endian)::

    offset size  field
         0    4  sender pid
         4    4  lease number (fd or handle in the sender)
         8    8  sequence number of the message (from 1, increasing)
        16   16  lease token (random, also stored in the lease object)
        32       the references, as the transport packs them

A frame without fds carries no transport data.  Control frames (from the
receiver's session back to the sender's): ``<BQ`` kind 1 = acknowledge every
message up to and including that sequence number; kind 2 with the sender's
pid in the second field = hello (only sessions that need the peer's pid
send it).

Why each message is safe from misdelivery: the sender keeps a private
duplicate of each fd until the receiver acknowledges the message, and holds
a *lease* object whose number travels in every message.  Whenever the
sender releases duplicates that were not acknowledged (it closes its
channel), it closes the lease *first*.  The receiver pulls a copy of the
lease once, checks the token in it, and after pulling a message's fds
checks that the sender's lease number still names that same object.  If it
does, the lease was open when the pulls finished, so no duplicate had been
released before them and every pulled fd is the one the sender meant.  If
it does not, the pulled fds are closed and `FdsWithdrawn` is raised.
"""

from __future__ import annotations

import abc
import errno
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Final

from .._errors import FdsWithdrawn, ProtocolError, UnverifiedSender
from ._base import Outgoing, Session

__all__ = ["HEAD", "PullSession"]

#: pid, lease number, sequence number, lease token
HEAD: Final = struct.Struct("<IIQ16s")
TOKEN_SIZE: Final = 16
_CONTROL: Final = struct.Struct("<BQ")
_ACK: Final = 1
_HELLO: Final = 2


class _ProcessHeld:
    """How many duplicates all pull sessions of this process hold for their peers.

    Each session's window bounds one channel; this count lets a session
    also respect a bound for the whole process (`PullSession._os_fd_budget`),
    so many peers that never acknowledge cannot together fill the fd table.
    """

    count = 0
    lock = threading.Lock()

    @classmethod
    def add(cls, n: int) -> None:
        with cls.lock:
            cls.count += n

    @classmethod
    def _after_fork(cls) -> None:
        # A thread that held the lock does not exist in the child.
        cls.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ProcessHeld._after_fork)


class _Peer:
    """What the receiving side holds of one sender process."""

    __slots__ = ("lease", "lease_num", "pid", "proc", "token")

    def __init__(self, pid: int, proc: Any, lease_num: int, lease: Any, token: bytes) -> None:
        self.pid = pid
        self.proc = proc  # the OS's process reference (a pidfd, a HANDLE)
        self.lease_num = lease_num
        self.lease = lease  # this process's copy of the sender's lease
        self.token = token


class PullSession(Session):
    """Both directions of one channel's pull-duplication protocol.

    Subclasses implement the ``_os_*`` methods.  Every method here takes the
    session lock: the channel calls sending-side methods under its send lock
    and receiving-side ones under its receive lock, and both sides share the
    acknowledgement state.
    """

    in_band = False
    #: Send a hello with this process's pid when the session starts.
    greet: ClassVar[bool] = False
    #: The transport's name, for error messages.
    transport_name: ClassVar[str] = "pull transport"
    #: The most fds the sending side holds for its peer unacknowledged
    #: (None: unbounded).  A message that would go over it waits for
    #: acknowledgements (`waits_for_peer`), unless nothing is held: a single
    #: message may carry more.
    window: int | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        # -- sending side
        self._owner = 0  # the pid the sending state below belongs to
        self._lease: Any = None
        self._lease_num = 0
        self._token = b""
        self._seq = 0
        # seq -> what outgoing() kept for that message; insertion-ordered,
        # so acknowledgements release from the front.
        self._unacked: dict[int, list[Any]] = {}
        self._held = 0  # how many duplicates _unacked holds
        # -- receiving side
        self._peer: _Peer | None = None
        self._ack = 0  # highest sequence number to acknowledge, 0 = none
        self._control: list[bytes] = []
        #: The peer's pid once its hello arrived (sessions with ``greet``).
        self.peer_pid: int | None = None
        if self.greet:
            self._control.append(_CONTROL.pack(_HELLO, self._os_pid()))

    # -- operating-system hooks -------------------------------------------

    def _os_pid(self) -> int:
        """This process's id (asked each time: a forked child has its own)."""
        return os.getpid()

    def _os_fd_budget(self) -> int | None:
        """The most duplicates all sessions of this process may hold for their peers (None: no bound)."""
        return None

    @abc.abstractmethod
    def _os_export(self, fd: int) -> tuple[Any, Any]:
        """Validate *fd* and duplicate it privately: return (reference, kept)."""

    @abc.abstractmethod
    def _os_release(self, kept: Any) -> None:
        """Close something `_os_export` or `_os_new_lease` kept."""

    @abc.abstractmethod
    def _os_new_lease(self) -> tuple[int, bytes, Any]:
        """Create a lease holding a fresh token: return (number, token, kept)."""

    @abc.abstractmethod
    def _os_pack_refs(self, refs: list[Any]) -> bytes:
        """The wire form of a message's references."""

    @abc.abstractmethod
    def _os_unpack_refs(self, nfds: int, data: bytes) -> tuple[Any, list[Any]]:
        """Parse *nfds* references: return (proof for `_os_prove_peer`, references).

        Raise `ProtocolError` if malformed.
        """

    def _os_prove_peer(self, proc: Any, pid: int, proof: Any) -> None:
        """Raise `UnverifiedSender` unless *proc* is proven to hold the other end of this connection.

        Called once per sender process and lease, after its lease checked
        out and before anything is pulled for a message.  `OSError` from the
        kernel is classified like a failed lease pull.  The default proves
        nothing (a transport without a proof yet).
        """

    @abc.abstractmethod
    def _os_open_peer(self, pid: int) -> Any:
        """Open the sender process for duplication (`OSError` on failure)."""

    @abc.abstractmethod
    def _os_close_peer(self, proc: Any) -> None:
        """Close what `_os_open_peer` returned."""

    @abc.abstractmethod
    def _os_pull(self, proc: Any, ref: Any) -> int:
        """Copy one fd out of the sender; the result is owned by the caller."""

    @abc.abstractmethod
    def _os_pull_lease(self, proc: Any, num: int) -> Any:
        """Copy the sender's lease object; the result is owned by the caller."""

    @abc.abstractmethod
    def _os_lease_token(self, lease: Any) -> bytes | None:
        """The token in a pulled lease, or None if it is no lease at all."""

    @abc.abstractmethod
    def _os_close_lease(self, lease: Any) -> None:
        """Close a pulled lease copy."""

    @abc.abstractmethod
    def _os_same_lease(self, peer: _Peer) -> bool:
        """True if the sender's lease number still names ``peer.lease``'s object."""

    @abc.abstractmethod
    def _os_close_fd(self, fd: int) -> None:
        """Close an fd `_os_pull` returned."""

    @abc.abstractmethod
    def _os_exited(self, proc: Any) -> bool:
        """True if the process behind *proc* has exited."""

    # -- sending side ---------------------------------------------------------

    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        if not fds:
            return Outgoing()
        with self._lock:
            if self._closed:
                raise ValueError("the session is closed")
            pid = self._os_pid()
            if pid != self._owner:
                self._adopt(pid)
            refs: list[Any] = []
            kept: list[Any] = []
            try:
                for fd in fds:
                    ref, keep = self._os_export(fd)
                    kept.append(keep)
                    refs.append(ref)
                if self._lease is None:
                    self._lease_num, self._token, self._lease = self._os_new_lease()
                aux = HEAD.pack(pid, self._lease_num, self._seq + 1, self._token) + self._os_pack_refs(refs)
            except BaseException:
                for keep in kept:
                    self._os_release(keep)
                raise
            self._seq += 1
            self._unacked[self._seq] = kept
            self._held += len(kept)
            _ProcessHeld.add(len(kept))
            return Outgoing(aux=aux, token=self._seq)

    def waits_for_peer(self, fds: Sequence[int]) -> bool:
        # The window: the sender holds a duplicate of every fd in flight
        # until the peer acknowledges it, so a peer that never does would
        # fill this process's fd table.  Messages without fds never wait.
        window = self.window
        if window is None or not fds:
            return False
        with self._lock:
            if self._owner != self._os_pid() or not self._held:
                # Nothing held (a forked child starts afresh, `_adopt`):
                # this channel's next message always goes, so every
                # channel makes progress whatever the others hold.
                return False
            if self._held + len(fds) > window:
                return True
            budget = self._os_fd_budget()
            return budget is not None and _ProcessHeld.count + len(fds) > budget

    @property
    def held(self) -> int:
        """How many fd duplicates the sending side holds for its peer, unacknowledged."""
        return self._held

    def _adopt(self, pid: int) -> None:
        """Start the sending state afresh in process *pid*.

        After ``fork()`` a child inherits the parent's lease and duplicates
        as copies of its own; they guard the parent's messages, not the
        child's, so the child closes its copies and makes its own lease.
        """
        if self._owner:
            if self._lease is not None:
                self._os_release(self._lease)
            self._lease = None
            self._release_unacked(None)
        self._owner = pid

    def discard(self, out: Outgoing) -> None:
        if not isinstance(out.token, int):
            return
        with self._lock:
            kept = self._unacked.pop(out.token, ())
            self._held -= len(kept)
            _ProcessHeld.add(-len(kept))
            for keep in kept:
                self._os_release(keep)

    def _release_unacked(self, upto: int | None) -> None:
        unacked = self._unacked
        while unacked:
            seq = next(iter(unacked))
            if upto is not None and seq > upto:
                break
            kept = unacked.pop(seq)
            self._held -= len(kept)
            _ProcessHeld.add(-len(kept))
            for keep in kept:
                self._os_release(keep)

    def control(self, payload: bytes) -> None:
        if len(payload) != _CONTROL.size:
            raise ProtocolError(f"malformed {self.transport_name} control frame ({len(payload)} bytes)")
        kind, value = _CONTROL.unpack(payload)
        with self._lock:
            if kind == _ACK:
                self._release_unacked(value)
            elif kind == _HELLO:
                self.peer_pid = value
            else:
                raise ProtocolError(f"unknown {self.transport_name} control frame kind {kind}")

    def peer_closed(self) -> None:
        # The peer's channel is closed: it will never pull these.
        with self._lock:
            self._release_unacked(None)

    # -- receiving side -------------------------------------------------------

    def take_control(self) -> list[bytes]:
        with self._lock:
            out, self._control = self._control, []
            if self._ack:
                out.append(_CONTROL.pack(_ACK, self._ack))
                self._ack = 0
            return out

    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        if in_band:  # the decoder refuses these already; never leak them
            for fd in in_band:
                os.close(fd)
            raise ProtocolError(f"{self.transport_name} carries no in-band fds, but some arrived")
        if not nfds:
            if aux:
                raise ProtocolError(f"{self.transport_name}: transport data on a frame without fds")
            return []
        if len(aux) < HEAD.size:
            raise ProtocolError(f"{self.transport_name}: transport data too short ({len(aux)} bytes)")
        pid, lease_num, seq, token = HEAD.unpack_from(aux)
        proof, refs = self._os_unpack_refs(nfds, aux[HEAD.size :])
        with self._lock:
            if self._closed:
                raise ValueError("I/O operation on a closed channel")
            # Whatever happens below, this end is done with the message:
            # the sender may release its copies.
            self._ack = max(self._ack, seq)
            return self._pull_all(self._attach(pid, lease_num, token, proof), refs)

    def _pull_all(self, peer: _Peer, refs: list[Any]) -> list[int]:
        """Pull every referenced fd out of *peer*; all of them, or none and an error."""
        pulled: list[int] = []
        try:
            for ref in refs:
                pulled.append(self._os_pull(peer.proc, ref))
            if not self._os_same_lease(peer):
                raise self._withdrawn(peer, "closed its channel")
        except OSError as exc:
            for fd in pulled:
                self._os_close_fd(fd)
            if isinstance(exc, FdsWithdrawn):
                raise
            raise self._pull_error(peer, exc) from exc
        except BaseException:
            for fd in pulled:
                self._os_close_fd(fd)
            raise
        return pulled

    def _attach(self, pid: int, lease_num: int, token: bytes, proof: Any) -> _Peer:
        """Return the sender *pid*, opening it, pulling its lease and proving it the peer if new."""
        peer = self._peer
        if peer is not None and peer.pid == pid and peer.lease_num == lease_num and peer.token == token:
            return peer
        if pid == 0:
            raise ProtocolError(f"{self.transport_name}: the sender named pid 0")
        try:
            proc = self._os_open_peer(pid)
        except ProcessLookupError as exc:
            raise FdsWithdrawn(
                errno.ECONNRESET, f"the sending process {pid} exited before this message's fds were taken"
            ) from exc
        except PermissionError as exc:
            raise self._denied(pid, exc) from exc
        lease: Any = None
        try:
            # Proven first: nothing is copied out of a process, this one
            # included, before it is shown to hold the other end of this
            # connection (a pulled and closed copy has side effects: closing
            # any fd of a file drops the process's POSIX locks on it).
            self._prove(pid, proc, lease_num, token, proof)
            lease = self._os_pull_lease(proc, lease_num)
            self._check_lease(_Peer(pid, proc, lease_num, lease, token))
        except BaseException as exc:
            if lease is not None:
                self._os_close_lease(lease)
            exited = self._os_exited(proc)
            self._os_close_peer(proc)
            error = self._lease_error(pid, exc, exited) if isinstance(exc, OSError) else exc
            if error is exc:
                raise
            raise error from exc
        self._drop_peer()
        self._peer = peer = _Peer(pid, proc, lease_num, lease, token)
        return peer

    def _prove(self, pid: int, proc: Any, lease_num: int, token: bytes, proof: Any) -> None:
        """Raise unless the process *proc* (pid *pid*) is proven to hold the other end of this connection."""
        try:
            self._os_prove_peer(proc, pid, proof)
        except UnverifiedSender as exc:
            # A sender that closes its channel drops its lease before its
            # socket: the proof may have failed for that reason alone.
            if self._os_exited(proc) or self._os_lease_gone(proc, pid, lease_num, token):
                raise FdsWithdrawn(
                    errno.ECONNRESET,
                    f"the sending process {pid} closed its channel or exited before this message's fds "
                    "were taken; nothing was taken",
                ) from exc
            raise

    def _os_lease_gone(self, proc: Any, pid: int, lease_num: int, token: bytes) -> bool:
        """True if the sender's lease is provably gone (it closed its channel); False if unsure."""
        return False

    def _check_lease(self, candidate: _Peer) -> None:
        """Raise unless *candidate* (a proven peer) holds the lease its message names."""
        if self._os_lease_token(candidate.lease) != candidate.token:
            # The number names another object: the sender closed its
            # lease (and so its channel), or the pid is not the sender's.
            raise FdsWithdrawn(
                errno.ECONNRESET,
                f"process {candidate.pid} no longer holds the lease this message names: the sender closed "
                "its channel or exited before the fds were taken (or the pid is not the sender's)",
            )

    def _lease_error(self, pid: int, exc: OSError, exited: bool) -> OSError:
        """What to raise when pulling *pid*'s lease failed with *exc* (itself if nothing better)."""
        if isinstance(exc, FdsWithdrawn):
            return exc
        if isinstance(exc, PermissionError):
            return self._denied(pid, exc)
        if exited or isinstance(exc, ProcessLookupError):
            return FdsWithdrawn(
                errno.ECONNRESET, f"the sending process {pid} exited before this message's fds were taken"
            )
        if exc.errno == errno.EBADF:
            return FdsWithdrawn(
                errno.ECONNRESET,
                f"process {pid} no longer holds the lease this message names: the sender closed "
                "its channel before the fds were taken",
            )
        return exc

    def _withdrawn(self, peer: _Peer, what: str) -> FdsWithdrawn:
        if self._os_exited(peer.proc):
            what = "exited"
        return FdsWithdrawn(
            errno.ECONNRESET,
            f"the sending process {peer.pid} {what} before this message's fds were taken; "
            "any fds pulled were closed",
        )

    def _denied(self, pid: int, exc: OSError) -> PermissionError:
        return PermissionError(
            exc.errno,
            f"{self.transport_name}: not allowed to copy fds out of process {pid} ({exc.strerror}); "
            "the message was dropped, the channel stays usable",
        )

    def _pull_error(self, peer: _Peer, exc: OSError) -> Exception:
        """Classify a failed pull: the sender went away, refused, or lied."""
        if isinstance(exc, PermissionError):
            return self._denied(peer.pid, exc)
        if isinstance(exc, ProcessLookupError) or self._os_exited(peer.proc):
            return self._withdrawn(peer, "exited")
        if not self._os_same_lease(peer):
            return self._withdrawn(peer, "closed its channel")
        if exc.errno == errno.EBADF:
            # The lease is intact, so nothing was released: the peer named
            # an fd it does not have.
            return ProtocolError(
                f"{self.transport_name}: the sender named an fd it does not have ({exc.strerror})"
            )
        return exc

    def _drop_peer(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            try:
                self._os_close_lease(peer.lease)
            finally:
                self._os_close_peer(peer.proc)

    def after_fork(self) -> None:
        if self._lock.locked():
            self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                # The lease goes first: a receiver pulling from now on sees it
                # gone and discards what it pulled, so releasing the
                # unacknowledged duplicates next can never be misdelivered.
                if self._lease is not None:
                    lease, self._lease = self._lease, None
                    self._os_release(lease)
                self._release_unacked(None)
            finally:
                self._drop_peer()
