"""Which socket I/O a channel uses, chosen once per channel, and the loop over its queue.

`fdchannel._posixio` (``sendmsg``/``recvmsg_into`` with SCM_RIGHTS) where the
platform has it and the socket is ``AF_UNIX``; `fdchannel._streamio`
(``send``/``recv_into``) for every other stream.  Both have the same
functions, so the channels never test the platform themselves, and nothing
POSIX-only is touched at import time outside `fdchannel._posixio`.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from typing import Any, Final, Protocol

from typing_extensions import Buffer

from . import _streamio
from ._codec import Decoder
from ._outbox import Outbox

__all__ = ["HAVE_ANCILLARY", "SocketIO", "io_for", "stall_delay", "write_pending"]


class SocketIO(Protocol):
    """What `fdchannel._posixio` and `fdchannel._streamio` both provide (modules are the implementations)."""

    @property
    def DONTWAIT(self) -> int:
        """The flag that makes one call non-blocking, 0 where none exists."""

    @property
    def SEND_FLAGS(self) -> int:
        """The flags of every write (``MSG_NOSIGNAL`` where it exists)."""

    def write(
        self, sock: socket.socket, bufs: Sequence[Buffer], fds: Sequence[int], flags: int = ..., /
    ) -> int:
        """One write of *bufs* (fds on the first byte); the bytes that left, 0 when full."""

    def read(
        self, sock: socket.socket | Any, decoder: Decoder, flags: int = ..., /
    ) -> tuple[bytes, Sequence[int]] | None:
        """One read into *decoder*; a lone frame's ``(payload, fds)`` or None."""

    def landed_fds(self, landed: list[Any], /) -> list[int]:
        """The fds a read left in ``Decoder.landed`` that nothing else owns yet."""


#: True where the platform passes fds in band (``sendmsg`` with SCM_RIGHTS).
HAVE_ANCILLARY: Final = hasattr(socket.socket, "sendmsg") and hasattr(socket, "SCM_RIGHTS")

_ancillary_io: SocketIO = _streamio
if sys.platform != "win32" and HAVE_ANCILLARY:
    from . import _posixio

    _ancillary_io = _posixio


def io_for(sock: socket.socket) -> SocketIO:
    """The I/O module for *sock*: ancillary data on AF_UNIX where the platform has it."""
    if HAVE_ANCILLARY and sock.family == getattr(socket, "AF_UNIX", None):
        return _ancillary_io
    return _streamio


def stall_delay(stalls: int) -> float:
    """Seconds to pause after *stalls* writes in a row that took nothing although the socket polled writable.

    macOS answers ``sendmsg`` with fds by EMSGSIZE while the peer's buffer
    cannot take the control data, and the socket still polls writable: the
    wait would spin (libuv does).  The first retry is at once, then 1 ms,
    doubling to 50 ms.  Elsewhere a write after a wait almost always takes
    something, so this is 0.
    """
    if stalls < 2:
        return 0.0
    return float(min(0.001 * 2 ** (stalls - 2), 0.05))


def write_pending(io: SocketIO, sock: socket.socket, outbox: Outbox, flags: int) -> int:
    """Write *outbox*'s chunks with *io* until none is left or the socket is full.

    Returns the bytes written.  `OSError` from the kernel propagates, with
    the bytes this call wrote before it as ``fdchannel_written``.
    """
    write = io.write
    written = 0
    while True:
        chunk = outbox.head()
        if chunk is None:
            return written
        try:
            n = write(sock, chunk.bufs, chunk.fds, flags)
        except OSError as exc:
            # What this call wrote before the error counts for characters_written.
            exc.fdchannel_written = written  # type: ignore[attr-defined]
            raise
        if not n:
            return written
        written += n
        if not outbox.wrote(n):
            return written  # a short write: the socket is full
