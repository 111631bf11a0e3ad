"""Socket-level pieces shared by the blocking `Channel` and `AsyncChannel`.

The codec (`_codec`) frames messages; this module moves frames through a
socket: one ``recvmsg_into`` into the decoder with the ancillary data parsed
and checked, the bytes and fds still to be sent (`Chunk`), and the split of a
frame whose fds need more than one ``sendmsg``.  Nothing here waits: the
channels decide how to wait (``poll`` or the event loop).
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Any, Final

from typing_extensions import Buffer

from ._codec import Decoder
from ._errors import TruncatedControlData
from ._fdutil import close_all
from .transports._unix import SCM_MAX_FD

__all__ = [
    "ANCBUF",
    "FD_PACK",
    "FD_UNPACK",
    "MAX_FD_BYTES",
    "MSG_CTRUNC",
    "MSG_DONTWAIT",
    "RECV_FLAGS",
    "SEND_FLAGS",
    "Chunk",
    "fds_from_ancillary",
    "finish_read",
    "read_into",
    "rights",
    "set_written",
    "split_batches",
]

_SOL_SOCKET: Final = socket.SOL_SOCKET
_SCM_RIGHTS: Final = socket.SCM_RIGHTS
# Plain ints: combining the socket module's IntFlag members costs an enum
# operation each time, on the hot path.
MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
MSG_DONTWAIT: Final = int(getattr(socket, "MSG_DONTWAIT", 0))
#: Never raise SIGPIPE: a vanished peer is a BrokenPipeError, not a dead process.
SEND_FLAGS: Final = int(getattr(socket, "MSG_NOSIGNAL", 0))
#: Received fds are close-on-exec atomically where the kernel can (Linux, FreeBSD).
RECV_FLAGS: Final = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
#: The kernel hands over at most one sendmsg's batch of fds per recvmsg;
#: CMSG_SPACE (not CMSG_LEN) so the last fd is never cut off on the BSDs.
ANCBUF: Final = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
# Packers and unpackers of 0..SCM_MAX_FD C ints, indexed by count: on the hot
# paths they cost half of what array.array or memoryview.cast do.
_INTS = [struct.Struct(f"{n}i") for n in range(SCM_MAX_FD + 1)]
FD_PACK: Final = [s.pack for s in _INTS]
FD_UNPACK: Final = [s.unpack for s in _INTS]
#: The most fd bytes one SCM_RIGHTS entry carries.
MAX_FD_BYTES: Final = 4 * SCM_MAX_FD


class Chunk:
    """Bytes still to send, and the fds that must ride on the first of them.

    While ``owns_fds`` is false the fds (and the buffers) are borrowed from
    the caller of ``send()``; `detach` makes the chunk independent of both
    before ``send()`` returns with the chunk still queued.
    """

    __slots__ = ("bufs", "fds", "owns_fds")

    def __init__(self, bufs: list[Buffer], fds: list[int], owns_fds: bool = False) -> None:
        self.bufs = bufs
        self.fds = fds
        self.owns_fds = owns_fds

    def release_fds(self) -> None:
        """Forget the fds (they were sent, or never will be), closing owned ones."""
        fds, self.fds = self.fds, []
        if self.owns_fds:
            close_all(fds)

    def detach(self) -> None:
        """Stop borrowing the caller's memory and fds: copy and duplicate them.

        Raises `OSError` (``EMFILE``) if a duplicate cannot be made; the chunk
        then still borrows the caller's fds.
        """
        self.bufs = [b"".join(self.bufs)]
        if self.fds and not self.owns_fds:
            dups: list[int] = []
            try:
                for fd in self.fds:
                    dups.append(os.dup(fd))
            except BaseException:
                close_all(dups)
                raise
            self.fds, self.owns_fds = dups, True

    def consume(self, n: int) -> bool:
        """Drop *n* sent bytes; return True when nothing is left."""
        bufs = self.bufs
        while n:
            first = memoryview(bufs[0]).cast("B")
            if n < len(first):
                bufs[0] = first[n:]
                return False
            n -= len(first)
            del bufs[0]
        while bufs and not memoryview(bufs[0]).nbytes:
            del bufs[0]
        return not bufs


def set_written(exc: BaseException, n: int) -> None:
    """Record on *exc* how many bytes of the message were written (the `io` convention)."""
    # BlockingIOError has the attribute; TimeoutError and CancelledError get
    # it the same way.
    exc.characters_written = n  # type: ignore[attr-defined]


def rights(fds: list[int]) -> list[tuple[int, int, bytes | array.array[int]]]:
    """The ancillary data of a ``sendmsg`` carrying *fds* (none when empty)."""
    if not fds:
        return []
    data = FD_PACK[len(fds)](*fds) if len(fds) <= SCM_MAX_FD else array.array("i", fds)
    return [(_SOL_SOCKET, _SCM_RIGHTS, data)]


def split_batches(bufs: list[Buffer], payload: Buffer, size: int, in_band: list[int]) -> list[Chunk]:
    """Split a frame whose fds need several ``sendmsg`` calls into chunks.

    *bufs* is the whole frame (header, aux, payload of *size* bytes last).
    Every batch of up to `SCM_MAX_FD` fds but the last rides on one byte of
    its own, the last on the rest of the frame, so each batch reaches the
    peer with bytes of its own frame.  The chunks borrow *payload* and the fds.
    """
    total = sum(memoryview(b).nbytes for b in bufs)
    frame = b"".join(bufs) if size <= 4096 else None
    # Sliced by bytes, whatever the payload's item size (an array('i'), say).
    data = memoryview(payload).cast("B")
    lead = frame if frame is not None else b"".join(bufs[:-1]) + bytes(data[:SCM_MAX_FD])
    batches = [in_band[i : i + SCM_MAX_FD] for i in range(0, len(in_band), SCM_MAX_FD)]
    if len(lead) < len(batches):
        raise ValueError("frame too short to carry its fds; the transport must pad it")
    chunks = [Chunk([lead[i : i + 1]], batch) for i, batch in enumerate(batches[:-1])]
    rest = len(batches) - 1
    if frame is not None:
        tail: list[Buffer] = [frame[rest:]]
    else:
        tail = [lead[rest:], data[len(lead) - (total - size) :]]
    chunks.append(Chunk(tail, batches[-1]))
    return chunks


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Return the fds of one ``recvmsg``'s ancillary data, owned by the caller.

    Only ``SOL_SOCKET``/``SCM_RIGHTS`` entries carry fds; each fd is made
    non-inheritable where ``MSG_CMSG_CLOEXEC`` could not do it atomically.
    Raises `TruncatedControlData` after closing every fd that did arrive
    when the kernel set ``MSG_CTRUNC``.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            # Whole ints only: a truncated trailing fragment is no fd.
            fds.extend(memoryview(data)[: len(data) - len(data) % 4].cast("i").tolist())
    if fds and not RECV_FLAGS:
        # No atomic way here: do it before anything else can fork.
        for fd in fds:
            os.set_inheritable(fd, False)
    if flags & MSG_CTRUNC:
        close_all(fds)
        raise TruncatedControlData(
            "the kernel truncated the fds of a message (MSG_CTRUNC); is this "
            "process at its RLIMIT_NOFILE?  The fds that arrived were closed"
        )
    return fds


def read_into(sock: socket.socket | Any, decoder: Decoder, flags: int = 0) -> bool:
    """Do one ``recvmsg_into`` straight into *decoder*; False at end of stream.

    What arrived (bytes and fds) is the decoder's from then on; at EOF the
    decoder is told (`Decoder.receive_eof`) and any fds that came with it are
    closed.  Raises `BlockingIOError` when nothing is ready (nothing
    consumed), `TruncatedControlData` on ``MSG_CTRUNC`` (the stream can no
    longer be trusted) and other `OSError` from the kernel.  A connection
    reset counts as end of stream.
    """
    try:
        n, ancdata, msg_flags, _ = sock.recvmsg_into([decoder.get_buffer()], ANCBUF, RECV_FLAGS | flags)
    except ConnectionResetError:
        # A peer that closed without reading all we sent is reported as a
        # reset once its own data is drained: for us it is its EOF (clean
        # between messages, a ProtocolError inside one).
        n, ancdata, msg_flags = 0, [], 0
    return finish_read(decoder, n, ancdata, msg_flags)


def finish_read(decoder: Decoder, n: int, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> bool:
    """Hand one ``recvmsg_into``'s result to *decoder*; False at end of stream."""
    fds: list[int] | tuple[()]
    if msg_flags & MSG_CTRUNC or len(ancdata) > 1 or not RECV_FLAGS:
        fds = fds_from_ancillary(ancdata, msg_flags)
    elif ancdata:
        # Inlined common case of fds_from_ancillary: one SCM_RIGHTS entry of
        # whole ints, already close-on-exec.
        level, kind, data = ancdata[0]
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS and not len(data) % 4 and len(data) <= MAX_FD_BYTES:
            fds = list(FD_UNPACK[len(data) >> 2](data))
        else:
            fds = fds_from_ancillary(ancdata, msg_flags)
    else:
        fds = ()
    if n:
        decoder.buffer_updated(n, fds)
        return True
    close_all(fds)
    decoder.receive_eof()
    return False
