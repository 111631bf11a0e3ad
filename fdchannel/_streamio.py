"""Socket I/O for streams that carry no fds: ``send``/``recv_into``.

The duplication transports (`PidfdGetfd` over TCP, `WinDuplicate`) move fds
by reference in the frames' bytes, so their channels need nothing but a
byte stream; this module is all the socket API they use, and it exists on
every platform (Windows has no ``sendmsg``).  The functions mirror
`fdchannel._posixio`: one system call each, never waiting.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Final

from typing_extensions import Buffer

from ._codec import Decoder

__all__ = ["DONTWAIT", "SEND_FLAGS", "landed_fds", "read", "write"]

#: Makes one call non-blocking whatever the socket's mode; 0 where the
#: platform has no such flag (Windows): channels then keep the socket
#: non-blocking and wait in select() instead.
DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0))
#: Never raise SIGPIPE where the flag exists (Windows has no SIGPIPE).
SEND_FLAGS: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))
#: Frames up to this size are joined and go out in one ``send``; a larger
#: one is written buffer by buffer (no copy of a big payload).
_JOIN_LIMIT: Final = 64 * 1024


def write(sock: socket.socket, bufs: Sequence[Buffer], fds: Sequence[int], flags: int = SEND_FLAGS) -> int:
    """Send as much of *bufs* as the socket takes now; the bytes that left (0 when full).

    *fds* must be empty: this stream carries none.  `OSError` from the
    kernel propagates when nothing was sent.
    """
    if fds:
        raise ValueError("a plain byte stream cannot carry fds in band")
    if len(bufs) == 1:
        data: Buffer = bufs[0]
    else:
        size = sum(memoryview(b).nbytes for b in bufs)
        if size > _JOIN_LIMIT:
            return _write_each(sock, bufs, flags)
        data = b"".join(bufs)
    try:
        return sock.send(data, flags)
    except BlockingIOError:
        return 0


def _write_each(sock: socket.socket, bufs: Sequence[Buffer], flags: int) -> int:
    sent = 0
    for buf in bufs:
        try:
            n = sock.send(buf, flags)
        except BlockingIOError:
            return sent
        except OSError:
            if sent:
                return sent  # report what left; the next write meets the error again
            raise
        sent += n
        if n < memoryview(buf).nbytes:
            break
    return sent


def read(sock: socket.socket | Any, decoder: Decoder, flags: int = 0) -> tuple[bytes, Sequence[int]] | None:
    """Do one ``recv_into`` straight into *decoder*, as `fdchannel._posixio.read` does.

    Returns ``(payload, ())`` for a lone plain frame the decoder let skip its
    queue, else None (at end of stream the decoder is told).  Raises
    `BlockingIOError` when nothing is ready and other `OSError` from the
    kernel; a connection reset counts as end of stream.
    """
    try:
        n = sock.recv_into(decoder.get_buffer(), 0, flags)
    except ConnectionResetError:
        n = 0
    if n:
        return decoder.buffer_updated_one(n, ())
    decoder.receive_eof()
    return None


def landed_fds(landed: list[Any]) -> list[int]:
    """No fds land on a plain byte stream (`fdchannel._posixio.landed_fds` has some)."""
    return []
