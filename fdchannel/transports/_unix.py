"""`UnixRights`: fds ride inside the socket message as SCM_RIGHTS."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .._codec import HEADER_SIZE, SCM_MAX_FD
from .._errors import ProtocolError
from .._fdutil import close_all
from ._base import Outgoing, Session, Transport

__all__ = ["SCM_MAX_FD", "UnixRights"]


class _UnixSession(Session):
    in_band = True
    passthrough = True

    def outgoing(self, fds: Sequence[int]) -> Outgoing:
        batches = -(-len(fds) // SCM_MAX_FD)
        # A frame needs one byte per batch of fds to ride on; pad when it has fewer.
        pad = max(0, batches - HEADER_SIZE)
        return Outgoing(aux=bytes(pad), in_band=fds)

    def incoming(self, nfds: int, aux: bytes, in_band: list[int]) -> list[int]:
        if aux.count(0) != len(aux):
            close_all(in_band)
            raise ProtocolError("UnixRights frames carry only zero padding as transport data")
        return in_band


_SESSION = _UnixSession()


class UnixRights(Transport):
    """The kernel carries each fd inside the message (SCM_RIGHTS).

    Needs an ``AF_UNIX`` stream socket.  Fds arrive close-on-exec
    (``MSG_CMSG_CLOEXEC``) and batches over the kernel's per-call limit are
    split across several ``sendmsg`` calls transparently.
    """

    wire_id = 0
    name = "UnixRights"

    def check_socket(self, sock: socket.socket) -> None:
        if sock.family != getattr(socket, "AF_UNIX", None):
            raise ValueError(f"UnixRights needs an AF_UNIX socket, got {sock.family!r}")

    def max_aux(self, max_fds: int) -> int:
        return max(0, -(-max_fds // SCM_MAX_FD) - HEADER_SIZE)

    def session(self, sock: socket.socket) -> Session:
        # Stateless: one shared session serves every channel.
        return _SESSION

    def __repr__(self) -> str:
        return "UnixRights()"
