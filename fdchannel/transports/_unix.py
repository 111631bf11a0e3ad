"""`UnixRights`: fds ride inside the socket message as SCM_RIGHTS.

Two modes.  The plain one is stateless: the kernel holds every fd in flight,
so the sender may close its own at once.  The acknowledged one (the default
on macOS, selectable everywhere) keeps a duplicate of each sent fd until the
receiver says it has the message: XNU can lose an in-flight fd whose sender
closed it (bpo-14669; CPython's multiprocessing and Node acknowledge there
too).

In that mode every fd-carrying frame's transport data starts with a flags
byte: 2 marks the mode (so ends of different modes fail on the first such
frame, clearly, whichever end is which), plus 1 when the sender asks to be
acknowledged now, which it does once half its window of held fds is used.
The receiver answers with a control frame ``<BQ`` kind 1 (as the pull
transports'): it has every fd-carrying frame up to and including that
count.  Acknowledgements are cumulative, so they coalesce.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Final

import attrs

from .._codec import HEADER_SIZE, SCM_MAX_FD
from .._errors import ProtocolError
from .._fdutil import close_all
from .._platform import FACTS
from ._base import Outgoing, Session, Transport

__all__ = ["SCM_MAX_FD", "UnixRights"]

_CONTROL: Final = struct.Struct("<BQ")
_ACK: Final = 1
_MARK: Final = 2  # flags byte: the acknowledged mode
_URGENT: Final = 1  # flags byte: acknowledge this frame now
_MISMATCH: Final = (
    "both ends must use the same mode: UnixRights(acknowledge=...) "
    "(acknowledged is the default on macOS only)"
)
_PEER_ACKS: Final = f"the peer's UnixRights acknowledges fds and this end's does not: {_MISMATCH}"
_PEER_DOES_NOT_ACK: Final = f"fds arrived from a peer whose UnixRights does not acknowledge them: {_MISMATCH}"


def _pad(nfds: int, taken: int) -> int:
    """Zero bytes needed so each batch of fds has a byte of the frame to ride on."""
    batches = -(-nfds // SCM_MAX_FD)
    return max(0, batches - HEADER_SIZE - taken)


class _UnixSession(Session):
    in_band = True
    passthrough = True

    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        return Outgoing(aux=bytes(_pad(len(fds), 0)), in_band=fds)

    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        if aux.count(0) != len(aux):
            close_all(in_band)
            if aux[0] & _MARK:
                raise ProtocolError(
                    f"the peer's UnixRights acknowledges fds and this end's does not: {_MISMATCH}"
                )
            raise ProtocolError("UnixRights frames carry only zero padding as transport data")
        return in_band

    def control(self, payload: bytes) -> None:
        raise ProtocolError(_PEER_ACKS)


_SESSION = _UnixSession()


class _AckedSession(Session):
    """The acknowledged mode: both directions of one channel."""

    in_band = True

    def __init__(self, window: int) -> None:
        self._lock = threading.Lock()
        self._window = window
        # -- sending side: seq -> duplicates kept for that message
        self._seq = 0
        self._held: dict[int, list[int]] = {}
        self._held_fds = 0
        # -- receiving side
        self._received = 0  # fd-carrying frames received
        self._ack_due = False

    # -- sending side ---------------------------------------------------------

    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        if not fds:
            return Outgoing()
        kept: list[int] = []
        try:
            for fd in fds:
                kept.append(os.dup(fd))
        except BaseException:
            close_all(kept)
            raise
        with self._lock:
            self._seq += 1
            self._held[self._seq] = kept
            self._held_fds += len(kept)
            urgent = self._held_fds >= max(1, self._window // 2)
            seq = self._seq
        aux = bytes((_MARK | _URGENT if urgent else _MARK,)) + bytes(_pad(len(fds), 1))
        return Outgoing(aux=aux, in_band=fds, token=seq)

    def waits_for_peer(self, fds: Sequence[int]) -> bool:
        # A full window waits for acknowledgements, but only once half of it
        # is held: the message that crossed half asked for one, and the
        # acknowledgement is cumulative.  Below half nothing was asked for,
        # so the message goes (it asks itself if it crosses half), and what
        # is held stays below half the window plus one message.
        held = self._held_fds
        return bool(fds) and held >= max(1, self._window // 2) and held + len(fds) > self._window

    def discard(self, out: Outgoing) -> None:
        if not isinstance(out.token, int):
            return
        with self._lock:
            kept = self._held.pop(out.token, [])
            self._held_fds -= len(kept)
            if out.token == self._seq:
                self._seq -= 1  # never sent: the receiver's count will not include it
        close_all(kept)

    def _release(self, upto: int | None) -> None:
        released: list[int] = []
        with self._lock:
            held = self._held
            while held:
                seq = next(iter(held))
                if upto is not None and seq > upto:
                    break
                released += held.pop(seq)
            self._held_fds -= len(released)
        close_all(released)

    def control(self, payload: bytes) -> None:
        if len(payload) != _CONTROL.size:
            raise ProtocolError(f"malformed UnixRights control frame ({len(payload)} bytes)")
        kind, value = _CONTROL.unpack(payload)
        if kind == _ACK:
            if value > self._seq:
                raise ProtocolError(f"the peer acknowledged message {value}, but only {self._seq} were sent")
            self._release(value)
        else:
            raise ProtocolError(f"unknown UnixRights control frame kind {kind}")

    def peer_closed(self) -> None:
        self._release(None)  # nobody will take them now

    def after_fork(self) -> None:
        if self._lock.locked():
            self._lock = threading.Lock()

    def close(self) -> None:
        self._release(None)

    # -- receiving side -------------------------------------------------------

    def take_control(self) -> list[bytes]:
        with self._lock:
            if not self._ack_due:
                return []
            self._ack_due = False
            return [_CONTROL.pack(_ACK, self._received)]

    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        if not nfds:
            if aux.count(0) != len(aux):
                raise ProtocolError("UnixRights frames without fds carry only zero padding")
            return in_band
        if not aux or not aux[0] & _MARK:
            close_all(in_band)
            raise ProtocolError(
                f"fds arrived from a peer whose UnixRights does not acknowledge them: {_MISMATCH}"
            )
        if aux[0] & ~(_MARK | _URGENT) or aux.count(0, 1) != len(aux) - 1:
            close_all(in_band)
            raise ProtocolError("malformed acknowledged UnixRights transport data")
        with self._lock:
            self._received += 1
            if aux[0] & _URGENT:
                self._ack_due = True
        return in_band


def _platform_default(value: bool | None) -> bool:
    return FACTS.ack_fds if value is None else bool(value)


@attrs.frozen
class UnixRights(Transport):
    """The kernel carries each fd inside the message (SCM_RIGHTS).

    Needs an ``AF_UNIX`` stream socket.  Fds arrive close-on-exec (atomically
    with ``MSG_CMSG_CLOEXEC`` on Linux and the BSDs; macOS lacks it, so there
    each fd is marked right after the read) and batches over the kernel's
    per-call limit are split across several ``sendmsg`` calls transparently.

    *acknowledge* (default: true on macOS only) keeps a duplicate of each
    sent fd until the receiver acknowledges the message, so the caller may
    close its fds as soon as ``send()`` returns even where the kernel would
    lose an in-flight fd its sender closed.  A channel holds at most
    *window* such fds, or less than half of it plus one message when a
    message is larger than the window; a send that would hold more first
    waits, within its timeout, for the peer's acknowledgements,
    which the peer sends as it receives.  Both ends must use the same mode:
    a mismatch is a `ProtocolError` on the first message or acknowledgement.
    """

    acknowledge: bool = attrs.field(default=None, converter=_platform_default)
    window: int = attrs.field(default=64, validator=attrs.validators.ge(1))

    wire_id = 0
    name = "UnixRights"

    def check_socket(self, sock: socket.socket) -> None:
        if sock.family != getattr(socket, "AF_UNIX", None):
            raise ValueError(
                f"UnixRights needs an AF_UNIX socket, got {sock.family!r}: over TCP or another stream "
                "use transport=PidfdGetfd() (Linux 5.6+) or transport=WinDuplicate() (Windows)"
            )

    def max_aux(self, max_fds: int) -> int:
        # One byte more in both modes: the acknowledged mode's flags, which a
        # plain end must read to name a mode mismatch.
        return _pad(max_fds, 0) + 1

    def session(self, sock: socket.socket) -> Session:
        if self.acknowledge:
            return _AckedSession(self.window)
        # Stateless: one shared session serves every channel.
        return _SESSION

    def __repr__(self) -> str:
        if self.acknowledge == FACTS.ack_fds and self.window == 64:
            return "UnixRights()"
        return f"UnixRights(acknowledge={self.acknowledge}, window={self.window})"
